"""The modelled dump device: a real storage device's timing and cache, in real time.

A :class:`ModelledDevice` wraps a real :class:`~progdump.device.DumpDevice`
(the dump disk image of a VM, usually) and behaves like the device class a
:class:`DeviceModel` describes (``nvme``, ``sata-ssd``, ``hdd``, ``iscsi-1g``,
``slow``; see ``device-models.toml`` for the values and their sources):

* **Pacing.** Every write costs ``latency`` (+ ``seek`` when it does not start
  where the previous one ended) + ``len / bandwidth`` of modelled time, every
  flush ``flush``; the call sleeps until host time catches up with the
  modelled completion, so the writer really runs at the device's speed and a
  reset at wall-clock time *t* cuts it where the device would be at *t*.
  The writer's own CPU time also passes on the modelled clock (modelled time
  never runs behind host time), so a slow writer is not flattered.
* **Volatile write cache.** Written data is held in this process's memory
  (the drive's write-back cache). It reaches the inner device when the cache
  is full (oldest first, as a drive destages) and on ``flush()``. Kill the
  writer process and whatever was not destaged is lost, exactly what a power
  loss does to a drive's cache.
* **Faults.** A model may declare regions where writes fail with EIO after
  ``error_ms``; the write raises :class:`~progdump.device.MediaError` (the
  writer carries on past it, FORMAT.md R-WR-7).
* **Trace.** Optionally every operation is logged in the manner of
  dm-log-writes: WRITE (with its data), FLUSH, MARK (layer commits),
  DESTAGE (a cached write reached the inner device), with modelled submit and
  completion times and host time. The format is below and in
  ``docs/SCENARIOS.md``; :mod:`harness.crashsim.trace` reads it. Records are
  written with one ``writev`` each and no user-space buffering, so a trace
  cut by SIGKILL is intact up to its last whole record.

The writer must not know it is modelled: it sees only the DumpDevice API.

Trace file format (version 1, all integers little-endian)::

    file header, 4096 bytes:
      0   8   magic b"PDTRACE\\0"
      8   4   u32 version (1)
      12  4   u32 length of the JSON text that follows
      16  n   UTF-8 JSON: model, device size and sector size, host clock at open
      ..      zero padding to 4096
    records, each 72 bytes of header + payload padded to 8 bytes:
      0   4   u32 magic 0x52544450 ("PDTR")
      4   2   u16 kind: 1 WRITE, 2 FLUSH, 3 MARK, 4 DESTAGE, 5 CLOSE
      6   2   u16 flags: 1 FUA, 2 FAILED (write returned EIO; no payload)
      8   8   u64 seq (per device, from 0; DESTAGE reuses the destaged write's seq)
      16  8   u64 device offset (WRITE, DESTAGE)
      24  8   u64 length: write length (WRITE, DESTAGE) or label length (MARK)
      32  8   f64 t_submit, modelled seconds since open
      40  8   f64 t_complete, modelled seconds since open
      48  8   f64 t_host, host seconds since open when the record was written
      56  8   u64 payload length that follows this header (WRITE data, MARK label)
      64  8   u64 xxh64 of bytes 0..63 and the payload
"""

from __future__ import annotations

import json
import os
import struct
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import xxhash

from progdump.device import DeviceError, DumpDevice, FileDevice, MediaError

__all__ = [
    "open_device",
    "DeviceModel",
    "FaultRegion",
    "ModelledDevice",
    "TraceWriter",
    "load_models",
    "get_model",
    "TRACE_MAGIC",
    "TRACE_HEADER_SIZE",
    "REC_MAGIC",
    "REC_HEADER",
    "K_WRITE",
    "K_FLUSH",
    "K_MARK",
    "K_DESTAGE",
    "K_CLOSE",
    "F_FUA",
    "F_FAILED",
]

MODELS_RESOURCE = "device-models.toml"

TRACE_MAGIC = b"PDTRACE\0"
TRACE_VERSION = 1
TRACE_HEADER_SIZE = 4096
REC_MAGIC = 0x52544450
#: magic, kind, flags, seq, offset, length, t_submit, t_complete, t_host, payload_len
REC_HEADER = struct.Struct("<IHHQQQdddQ")
REC_HEADER_SIZE = REC_HEADER.size + 8  # + xxh64
assert REC_HEADER_SIZE == 72

K_WRITE, K_FLUSH, K_MARK, K_DESTAGE, K_CLOSE = 1, 2, 3, 4, 5
F_FUA, F_FAILED = 1, 2

_MIB = 1 << 20


@dataclass(frozen=True)
class FaultRegion:
    """Writes overlapping ``[at * size, at * size + length)`` fail with EIO."""

    at: float  # fraction of the device size
    length: int  # bytes

    def bounds(self, device_size: int, sector: int) -> tuple[int, int]:
        start = int(self.at * device_size) // sector * sector
        return start, min(device_size, start + self.length)


@dataclass(frozen=True)
class DeviceModel:
    """A device class's timing and cache, in SI units (bytes, seconds)."""

    name: str
    bandwidth: float  # bytes/s
    latency: float  # s per write command
    seek: float  # s extra for a non-sequential write
    flush: float  # s per flush
    cache: int  # bytes of volatile write cache
    sector_size: int
    description: str = ""
    error: float = 0.0  # s a failing write takes
    faults: tuple[FaultRegion, ...] = field(default_factory=tuple)

    def write_cost(self, length: int, sequential: bool) -> float:
        """Modelled seconds a write of ``length`` bytes occupies the device."""
        return self.latency + (0.0 if sequential else self.seek) + length / self.bandwidth

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["faults"] = [asdict(f) for f in self.faults]
        return d


def _resolve(name: str, tables: dict[str, dict], depth: int = 0) -> dict[str, object]:
    """A model's raw table with its ``base`` chain merged in (the model's own keys win)."""
    if depth > 8:
        raise ValueError(f"device model {name!r}: 'base' chain too deep")
    table = tables[name]
    base = table.get("base")
    merged: dict[str, object] = {}
    if base is not None:
        if base not in tables or not isinstance(tables[base], dict):
            raise ValueError(f"device model {name!r}: unknown base {base!r}")
        merged.update(_resolve(str(base), tables, depth + 1))
    merged.update({k: v for k, v in table.items() if k != "base"})
    return merged


def _model_from_table(name: str, merged: dict[str, Any]) -> DeviceModel:
    try:
        bw = float(merged["bandwidth_mb_s"]) * 1e6
        lat = float(merged["latency_us"]) * 1e-6
        seek = float(merged.get("seek_ms", 0.0)) * 1e-3
        fl = float(merged["flush_ms"]) * 1e-3
        cache = int(float(merged["cache_mib"]) * _MIB)
        sector = int(merged["sector_size"])
        err = float(merged.get("error_ms", 0.0)) * 1e-3
        faults = []
        for f in merged.get("fail", []) or []:
            at = float(f["at"])
            if not 0.0 <= at < 1.0:
                raise ValueError(f"fail.at {at} not in [0, 1)")
            faults.append(FaultRegion(at, int(float(f["length_mib"]) * _MIB)))
    except KeyError as e:
        raise ValueError(f"device model {name!r}: missing {e.args[0]}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"device model {name!r}: bad value: {e}") from None
    if bw <= 0 or lat < 0 or seek < 0 or fl < 0 or cache < 0 or err < 0:
        raise ValueError(f"device model {name!r}: values must be positive")
    if sector < 512 or sector & (sector - 1):
        raise ValueError(f"device model {name!r}: sector_size {sector} is not a power of two >= 512")
    return DeviceModel(name, bw, lat, seek, fl, cache, sector, str(merged.get("description", "")), err, tuple(faults))


def parse_models(text: str) -> dict[str, DeviceModel]:
    """Parse a device-models TOML document; raises ValueError naming the bad model."""
    try:
        tables = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"device models: {e}") from None
    return {name: _model_from_table(name, _resolve(name, tables)) for name, t in tables.items() if isinstance(t, dict)}


def load_models() -> dict[str, DeviceModel]:
    """The device models shipped with progdump (``progdump/device-models.toml``)."""
    text = resources.files("progdump").joinpath(MODELS_RESOURCE).read_text(encoding="utf-8")
    return parse_models(text)


def get_model(name: str) -> DeviceModel:
    models = load_models()
    try:
        return models[name]
    except KeyError:
        raise ValueError(f"unknown device model {name!r} (known: {', '.join(sorted(models))})") from None


class TraceWriter:
    """Append-only trace file (format in the module docstring), unbuffered."""

    def __init__(self, path: str, header: dict[str, object]) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        text = json.dumps(header, sort_keys=True).encode()
        if 16 + len(text) > TRACE_HEADER_SIZE:
            raise ValueError("trace header JSON too long")
        head = TRACE_MAGIC + struct.pack("<II", TRACE_VERSION, len(text)) + text
        os.write(self._fd, head + b"\0" * (TRACE_HEADER_SIZE - len(head)))

    def record(
        self,
        kind: int,
        seq: int,
        offset: int = 0,
        length: int = 0,
        t_submit: float = 0.0,
        t_complete: float = 0.0,
        t_host: float = 0.0,
        payload: bytes | memoryview = b"",
        flags: int = 0,
    ) -> None:
        h = REC_HEADER.pack(REC_MAGIC, kind, flags, seq, offset, length, t_submit, t_complete, t_host, len(payload))
        x = xxhash.xxh64(h)
        x.update(payload)
        pad = b"\0" * (-len(payload) % 8)
        parts = (
            [h + struct.pack("<Q", x.intdigest()), payload, pad] if payload else [h + struct.pack("<Q", x.intdigest())]
        )
        total = sum(len(p) for p in parts)
        n = os.writev(self._fd, parts)
        while n < total:  # short writes on a regular file are rare; finish them
            rest = b"".join(bytes(p) for p in parts)[n:]
            n += os.write(self._fd, rest)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass
class PacingStats:
    """How faithfully host time followed the model (pacing overhead, made measurable)."""

    sleeps: int = 0
    slept_s: float = 0.0
    #: worst host lateness after a sleep: how far host time overshot a modelled completion
    max_late_s: float = 0.0
    #: sum of lateness over all paced operations
    late_s: float = 0.0
    #: host seconds spent inside write/flush outside sleeping (copies, trace, destage)
    device_cpu_s: float = 0.0
    writes: int = 0
    flushes: int = 0
    bytes: int = 0
    destaged_bytes: int = 0
    failed_writes: int = 0


class ModelledDevice(DumpDevice):
    """A DumpDevice with a device model's timing, volatile cache, faults and trace.

    ``now`` and ``sleep`` are injectable so unit tests can drive a fake clock
    (the tests say when they do); production code uses the host's monotonic
    clock and real sleeps.
    """

    def __init__(
        self,
        inner: DumpDevice,
        model: DeviceModel,
        trace_path: str | None = None,
        *,
        now: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        inner_sync: bool = False,
    ) -> None:
        if model.sector_size % inner.sector_size:
            raise DeviceError(
                f"device model {model.name}: sector size {model.sector_size} is not a multiple of "
                f"{inner.path or 'the device'}'s {inner.sector_size}"
            )
        self.inner = inner
        self.model = model
        self.size = inner.size - inner.size % model.sector_size
        self.sector_size = model.sector_size
        self.path = inner.path
        self._now = now
        self._sleep = sleep
        self._inner_sync = inner_sync
        self._t0 = now()
        self._t = 0.0  # modelled clock: completion of the last operation
        self._seq = 0
        self._next_sequential = -1
        self._cache: list[tuple[int, int, bytes]] = []  # (seq, offset, data), oldest first
        self._cache_head = 0
        self._cache_bytes = 0
        self._faults = [f.bounds(self.size, self.sector_size) for f in model.faults]
        self.stats = PacingStats()
        self._closed = False
        self.trace: TraceWriter | None = None
        if trace_path is not None:
            self.trace = TraceWriter(
                trace_path,
                {
                    "format": "progdump-trace",
                    "model": model.to_json(),
                    "device_size": self.size,
                    "sector_size": self.sector_size,
                    "device_path": inner.path,
                    "open_monotonic_ns": int(self._t0 * 1e9) if now is time.monotonic else None,
                    "open_realtime_ns": time.time_ns(),
                    "pid": os.getpid(),
                },
            )

    # -- clocks ----------------------------------------------------------------
    def _host(self) -> float:
        return self._now() - self._t0

    def clock(self) -> float:
        """Modelled seconds since open (never behind host time)."""
        return max(self._t, self._host())

    def _pace(self, until: float) -> None:
        """Sleep until host time reaches modelled time ``until``."""
        h = self._host()
        if h < until:
            self.stats.sleeps += 1
            self.stats.slept_s += until - h
            self._sleep(until - h)
            h = self._host()
        late = max(0.0, h - until)
        self.stats.late_s += late
        self.stats.max_late_s = max(self.stats.max_late_s, late)

    # -- I/O -------------------------------------------------------------------
    def _check(self, offset: int, length: int) -> None:
        if self._closed:
            raise DeviceError(f"{self.path}: device is closed")
        if offset < 0 or offset % self.sector_size or length % self.sector_size:
            raise DeviceError(
                f"{self.path}: write at {offset:#x}+{length:#x} not aligned to the {self.sector_size}-byte sector"
            )
        if offset + length > self.size:
            raise DeviceError(f"{self.path}: write at {offset:#x}+{length:#x} past the end ({self.size:#x})")

    def _faulty(self, offset: int, length: int) -> bool:
        return any(offset < hi and lo < offset + length for lo, hi in self._faults)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        h_in = self._host()
        length = len(data)
        self._check(offset, length)
        seq = self._seq
        self._seq += 1
        start = max(self._t, h_in)
        sequential = offset == self._next_sequential
        if self._faulty(offset, length):
            done = start + self.model.latency + self.model.error
            if self.trace:
                self.trace.record(K_WRITE, seq, offset, length, start, done, self._host(), flags=F_FAILED)
            self._t = done
            self.stats.failed_writes += 1
            self.stats.device_cpu_s += self._host() - h_in
            self._pace(done)
            raise MediaError(
                f"{self.path}: I/O error writing {length} bytes at offset {offset:#x} (modelled bad region)",
                offset,
                length,
            )
        done = start + self.model.write_cost(length, sequential)
        blob = bytes(data)
        if self.trace:
            self.trace.record(K_WRITE, seq, offset, length, start, done, self._host(), payload=blob)
        self._cache.append((seq, offset, blob))
        self._cache_bytes += length
        while self._cache_bytes > self.model.cache:
            self._destage_one(start)
        self._t = done
        self._next_sequential = offset + length
        self.stats.writes += 1
        self.stats.bytes += length
        self.stats.device_cpu_s += self._host() - h_in
        self._pace(done)

    def _destage_one(self, t: float) -> None:
        seq, off, blob = self._cache[self._cache_head]
        self._cache[self._cache_head] = (seq, off, b"")  # drop the reference
        self._cache_head += 1
        self._cache_bytes -= len(blob)
        self.inner.write(off, blob)
        self.stats.destaged_bytes += len(blob)
        if self.trace:
            self.trace.record(K_DESTAGE, seq, off, len(blob), t, t, self._host())
        if self._cache_head > 1024 and self._cache_head * 2 > len(self._cache):
            del self._cache[: self._cache_head]
            self._cache_head = 0

    def _destage_all(self, t: float) -> None:
        while self._cache_head < len(self._cache):
            self._destage_one(t)
        self._cache.clear()
        self._cache_head = 0

    def flush(self) -> None:
        h_in = self._host()
        if self._closed:
            raise DeviceError(f"{self.path}: device is closed")
        seq = self._seq
        self._seq += 1
        start = max(self._t, h_in)
        done = start + self.model.flush
        self._destage_all(start)
        if self._inner_sync:
            self.inner.flush()
        if self.trace:
            self.trace.record(K_FLUSH, seq, 0, 0, start, done, self._host())
        self._t = done
        self.stats.flushes += 1
        self.stats.device_cpu_s += self._host() - h_in
        self._pace(done)

    def mark(self, label: str) -> None:
        if self._closed:
            return
        seq = self._seq
        self._seq += 1
        t = self.clock()
        raw = label.encode("utf-8", "replace")[:4096]
        if self.trace:
            self.trace.record(K_MARK, seq, 0, len(raw), t, t, self._host(), payload=raw)

    @property
    def cached_bytes(self) -> int:
        """Bytes acknowledged but not yet on the inner device (lost on a kill)."""
        return self._cache_bytes

    def close(self) -> None:
        """Clean shutdown: the drive stays powered, so its cache reaches the media."""
        if self._closed:
            return
        t = self.clock()
        self._destage_all(t)
        if self.trace:
            self.trace.record(K_CLOSE, self._seq, 0, 0, t, t, self._host())
            self.trace.close()
        self._closed = True
        self.inner.close()

    def abandon(self) -> None:
        """Power loss without a kill (tests): drop the cache, close without destaging."""
        self._cache.clear()
        self._cache_head = 0
        self._cache_bytes = 0
        if self.trace:
            self.trace.close()
        self._closed = True
        self.inner.close()


def open_device(path: str, model: str | None = None, trace: str | None = None) -> DumpDevice:
    """Open ``path`` as a FileDevice, wrapped in a modelled device when ``model`` names one.

    ``model`` None or ``"none"``: the plain device (a trace needs a model).
    """
    inner = FileDevice(path)
    if model is None or model == "none":
        if trace is not None:
            inner.close()
            raise DeviceError("--trace needs a --device-model (the trace is kept by the modelled device)")
        return inner
    try:
        models = load_models()
    except Exception as e:
        inner.close()
        raise DeviceError(f"device models unavailable: {type(e).__name__}: {e}") from None
    if model not in models:
        inner.close()
        raise DeviceError(f"unknown device model {model!r} (known: {', '.join(sorted(models))}, none)")
    try:
        return ModelledDevice(inner, models[model], trace)
    except (OSError, DeviceError) as e:
        inner.close()
        raise DeviceError(f"{path}: cannot model as {model}: {e}") from None
