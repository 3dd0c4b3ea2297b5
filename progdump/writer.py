"""The progdump writer: plan -> layers -> records -> device, with the commit protocol.

What it guarantees (docs/FORMAT.md section 8): every layer is committed by a
COMMIT record written after a flush barrier and followed by another flush, so
a reset at any moment keeps every layer whose commit returned; records carry
a fresh random dump id so an older dump on the device is never mixed in; the
deadline stops the dump cleanly with everything committed so far valid.

Why it is fast: memory pages go through the device in chunks of up to 256
pages (1 MiB). Each chunk is one ``bytes`` copy out of the snapshot's mmap;
zero pages are found with ``bytes.startswith`` at page offsets (no per-byte
Python work), an all-zero chunk becomes (part of) a ZERO record with no
payload, and the rest is compressed by zstd in a thread pool (zstd and
xxhash release the GIL), at most ``2 x threads`` chunks in flight, results
taken in order. Memory is bounded by those chunks plus a 1 MiB staging
buffer and a one-byte-per-page "already written" map, whatever the snapshot
size; consumed snapshot pages are released from the mapping as we go.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import re
import threading
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import cast

import xxhash
import zstandard

from progdump.errors import ProgdumpError

try:  # optional: finds zero pages without the GIL and without a copy; bytes compares otherwise
    import numpy as _np
except ImportError:  # pragma: no cover - numpy is present wherever matplotlib is
    _np = None  # type: ignore[assignment]  # the module or None: every use checks

from progdump.device import DeviceError, DumpDevice, MediaError
from progdump.format import (
    ARTIFACT_NAME_FIELD,
    FORMAT_VERSION,
    HEADER_BLOCK,
    LANDING,
    LOG_START,
    MAX_ARTIFACT,
    MAX_HOLE,
    MAX_PAGES_PER_RECORD,
    CommitInfo,
    Compression,
    DumpHeader,
    RecordType,
    log_end,
    pack_commit,
    pack_header,
    pack_record_header,
    pages_map_len,
    payload_checksum,
    record_span,
)
from progdump.layers.base import LayerContent, Producer, ProducerLike
from progdump.layers.plan import LayerSpec
from progdump.snapshot import PAGE_SIZE, Snapshot

__all__ = ["LayerResult", "WriteResult", "ProgressEvent", "write_dump", "WriterError", "format_durable_line"]

CHUNK_PAGES = 256  # pages per PAGES record: 1 MiB raw, the unit of compression and zero detection
STAGE_BYTES = 1 << 20  # device writes are at least this big (except at flushes)
ARTIFACT_CHUNK = 1 << 20  # artifact bytes per ARTIFACT record
MAX_NOTES_BYTES = 256 << 10
ZERO_PAGE = bytes(PAGE_SIZE)
COMMIT_TRIES = 3  # tries of a layer's COMMIT at successive landings before it waits for the next layer (R-WR-7)
VERSION = "progdump 0.1.0"

assert CHUNK_PAGES <= MAX_PAGES_PER_RECORD


class WriterError(ProgdumpError):
    """The dump cannot start (bad plan, device too small); the message says why."""


class _Stop(Exception):
    """Internal: stop writing (deadline or device full)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class LayerResult:
    index: int
    name: str
    committed: bool = False
    #: device clock (s since open) when the commit's flush returned; None if not committed
    durable_s: float | None = None
    #: device bytes of the layer's records (headers, payloads, padding, commit)
    bytes: int = 0
    records: int = 0
    pages: int = 0
    zero_pages: int = 0
    artifacts: list[str] = field(default_factory=list)
    started: bool = False
    #: records of this layer lost to failed writes (R-WR-7); its pages are retried by later layers
    lost_records: int = 0
    #: the failed writes: {"offset", "length", "records": [first, last], "error"}
    holes: list[dict] = field(default_factory=list)


@dataclass
class WriteResult:
    dump_id: str
    plan: str
    producer: str
    layers: list[LayerResult]
    #: why the writer stopped: done | deadline | device-full | error
    stopped: str = "done"
    error: str = ""
    elapsed_s: float = 0.0
    device_bytes: int = 0
    snapshot_bytes: int = 0
    #: writes that failed on the medium and were carried past (R-WR-7)
    failed_writes: int = 0
    #: pages whose record was lost to a failed write and that no later layer wrote again
    pages_lost: int = 0

    @property
    def complete(self) -> bool:
        return self.stopped == "done" and all(lay.committed and not lay.lost_records for lay in self.layers)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class ProgressEvent:
    """What the writer tells its ``progress`` callback.

    ``kind``: ``layer-start``, ``pages`` (periodic), ``layer-durable``,
    ``stopped``. ``pages_done``/``pages_total`` count snapshot pages handled
    so far (a progress bar's fraction).
    """

    kind: str
    t: float
    layer: LayerResult | None = None
    pages_done: int = 0
    pages_total: int = 0
    device_bytes: int = 0
    message: str = ""


def _human_bytes(n: int) -> str:
    if n < 1 << 20:
        return f"{n / 1024:.0f} KiB"
    if n < 1 << 30:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / (1 << 30):.2f} GiB"


def _human_time(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def format_durable_line(layer: LayerResult) -> str:
    """``layer 0 panic durable at 3.1 ms, 41 KiB``: when a power-cycle keeps this layer."""
    when, size = _human_time(layer.durable_s or 0.0), _human_bytes(layer.bytes)
    line = f"layer {layer.index} {layer.name} durable at {when}, {size}"
    if layer.lost_records:
        line += f", with a hole: {layer.lost_records} records lost to write errors"
    return line


@dataclass
class _Failure:
    """A device write that failed on the medium, and what it carried."""

    offset: int
    length: int
    seq_lo: int  # records [seq_lo, seq_hi) were in it
    seq_hi: int
    pages: list[tuple[int, int]]  # (first pfn, count) of its PAGES/ZERO records
    error: str

    def extend(self, end: int, seq_hi: int, pages: list[tuple[int, int]]) -> None:
        """What was queued or staged behind the failed write is lost with it (never attempted)."""
        self.length = max(self.length, end - self.offset)
        self.seq_hi = max(self.seq_hi, seq_hi)
        self.pages.extend(pages)

    def to_json(self) -> dict[str, object]:
        return {
            "offset": self.offset,
            "length": self.length,
            "records": [self.seq_lo, self.seq_hi - 1],
            "error": self.error[:200],
        }


# ---------------------------------------------------------------------------
# the record log


class _Log:
    """Appends records at the log cursor (R-MAP-2, R-WR-6); device writes go through one I/O thread.

    Why a thread: ``os.pwrite`` (and a modelled device's pacing sleep)
    releases the GIL, so device I/O overlaps compression. Only that thread
    calls ``device.write``; ``flush`` is called by :meth:`barrier` after the
    queue has drained, so the device never sees concurrent calls. At most
    ``QUEUE`` writes of about 1 MiB wait in the queue (bounded memory).

    A write that fails on the medium (:class:`MediaError`) does not stop the
    log (R-WR-7). Every write carries the log's *epoch*. When one fails, the
    I/O thread writes nothing more of that epoch (what was queued behind it
    is folded into the same failure, never attempted), and the main thread,
    at its next append or barrier, drops what it had staged too and restarts
    the log in a new epoch at the next ``LANDING`` boundary past all of it.
    So the first record after a hole always starts on a 1 MiB boundary,
    where a reader probes for it (R-RD-2). The failure keeps the records and
    pages it lost, so the layer gets a hole and its pages are retried. A
    landing more than ``MAX_HOLE`` past the last good write would be beyond
    a reader's probes: the log stops instead.
    """

    QUEUE = 4

    def __init__(self, device: DumpDevice, dump_id: bytes, t_ns: int, align: int, t0: float) -> None:
        self.dev = device
        self.dump_id = dump_id
        self.t_ns = t_ns
        self.align = align
        self.end = log_end(device.size)
        self.cursor = LOG_START
        self.pieces: list[bytes | bytearray | memoryview] = []
        self.pending = 0
        self.buf_off = LOG_START
        self.seq = 0
        self.written = 0  # bytes handed to the device
        self.t0 = t0  # device clock at the dump's start: durable times are relative to it
        self.q: queue.Queue = queue.Queue(self.QUEUE)
        self.error: BaseException | None = None
        self.stage_seq = 0  # sequence number of the first staged record
        self.stage_pages: list[tuple[int, int]] = []  # page runs of the staged records
        self.epoch = 0  # main thread: the epoch being staged
        self.dead_epoch = -1  # I/O thread: an epoch in which a write failed
        self.lock = threading.Lock()  # guards failures (both threads add to them)
        self.failures: list[_Failure] = []
        self.good_end = LOG_START  # end of the last write that succeeded (I/O thread)
        self.io = threading.Thread(target=self._io_loop, name="progdump-io", daemon=True)
        self.io.start()

    def _io_loop(self) -> None:
        while True:
            item = self.q.get()
            try:
                if item is None:
                    return
                if self.error is None:
                    off, pieces, seq_lo, seq_hi, pages, epoch = item
                    length = sum(len(p) for p in pieces)
                    if epoch == self.dead_epoch:  # behind a failed write: never attempted (R-WR-7)
                        with self.lock:
                            self.failures[-1].extend(off + length, seq_hi, pages)
                        continue
                    data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                    try:
                        self.dev.write(off, data)
                        self.good_end = off + length
                    except MediaError as e:
                        with self.lock:
                            self.failures.append(_Failure(off, length, seq_lo, seq_hi, list(pages), str(e)))
                        self.dead_epoch = epoch
            except BaseException as e:  # handed to the main thread at the next submit/barrier
                self.error = e
            finally:
                self.q.task_done()

    def failures_since(self, seq: int) -> list[_Failure]:
        """Failed writes that carried records with sequence numbers >= ``seq`` (call after a barrier)."""
        with self.lock:
            return [f for f in self.failures if f.seq_hi > seq]

    def _check(self) -> None:
        if self.error is not None:
            e, self.error = self.error, None
            self.error = e  # keep it: every later call fails the same way
            raise e

    def _restart_if_failed(self) -> None:
        """After a failed write: drop what is staged, restart at the next landing (R-WR-7)."""
        if self.dead_epoch != self.epoch:
            return
        with self.lock:
            f = self.failures[-1]
            if self.pending:
                f.extend(self.buf_off + self.pending, self.seq, self.stage_pages)
        landing = -(-self.cursor // LANDING) * LANDING
        if landing == self.cursor:
            landing += LANDING
        if landing - self.good_end > MAX_HOLE:
            raise DeviceError(
                f"{f.error}; writes have failed over {(landing - self.good_end) >> 20} MiB of the device in a row,"
                f" more than a reader looks past ({MAX_HOLE >> 20} MiB)"
            )
        if landing >= self.end:
            raise _Stop("device-full")
        self.epoch += 1
        self.cursor = self.buf_off = landing
        self.pieces, self.pending, self.stage_pages, self.stage_seq = [], 0, [], self.seq

    def append(
        self, rtype: RecordType, layer: int, stored: bytes | bytearray | memoryview, raw_len: int,
        comp: Compression, aux0: int = 0, aux1: int = 0, psum: bytes | None = None,
        pages: tuple[int, int] | None = None, seq: int | None = None,
    ) -> tuple[bytes, int]:  # fmt: skip
        """Add one record; returns (its 128-byte header, its span on the device).

        ``pages`` (first pfn, count) of a PAGES/ZERO record: retried if its write fails.
        ``seq`` reuses a sequence number: only for a COMMIT whose write failed (R-WR-7).
        """
        self._restart_if_failed()
        span = record_span(len(stored), self.align)
        if self.cursor + span > self.end:
            raise _Stop("device-full")
        if psum is None:
            psum = payload_checksum(stored)
        hdr = pack_record_header(
            rtype, layer, self.dump_id, self.t_ns, self.seq if seq is None else seq, self.cursor, len(stored), raw_len,
            aux0, aux1, comp, psum,
        )  # fmt: skip
        self.pieces += (hdr, stored, bytes(span - len(hdr) - len(stored)))
        if pages is not None:
            self.stage_pages.append(pages)
        self.pending += span
        self.cursor += span
        if seq is None:
            self.seq += 1
        if self.pending >= STAGE_BYTES:
            self.drain()
        return hdr, span

    def drain(self) -> None:
        """Queue what is staged for the I/O thread."""
        self._check()
        if self.pending:
            self.q.put((self.buf_off, self.pieces, self.stage_seq, self.seq, self.stage_pages, self.epoch))
            self.buf_off += self.pending
            self.written += self.pending
            self.pieces = []
            self.stage_pages = []
            self.stage_seq = self.seq
            self.pending = 0

    def barrier(self) -> None:
        """Everything appended so far is on the device (or in a failure) and flushed when this returns."""
        self.drain()
        self.q.join()
        self._check()
        self.dev.flush()
        self._restart_if_failed()

    def close(self) -> None:
        """Stop the I/O thread (after the queue drains)."""
        self.q.put(None)
        self.io.join()


# ---------------------------------------------------------------------------
# page selection: runs -> chunks of pages not yet written


class _Written:
    """One byte per snapshot page: 1 once the page is in some record of this dump (R-PAG-2)."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.ranges = snapshot.ranges
        self.starts = [r.phys_start // PAGE_SIZE for r in snapshot.ranges]
        self.marks = [bytearray(r.size // PAGE_SIZE) for r in snapshot.ranges]

    def unwritten(self, pfn: int, n: int) -> int:
        """How many of pages ``[pfn, pfn + n)`` (within the snapshot) are in no record yet."""
        end, count = pfn + n, 0
        for base, m in zip(self.starts, self.marks):
            lo, hi = max(pfn, base), min(end, base + len(m))
            if lo < hi:
                count += m.count(0, lo - base, hi - base)
        return count

    def unmark(self, pfn: int, n: int) -> None:
        """Pages ``[pfn, pfn + n)`` are not on the device after all (their write failed): want them again."""
        end = pfn + n
        i = max(bisect_right(self.starts, pfn) - 1, 0)
        while i < len(self.ranges):
            base = self.starts[i]
            top = base + len(self.marks[i])
            if base >= end:
                break
            lo, hi = max(pfn, base), min(end, top)
            if lo < hi:
                self.marks[i][lo - base : hi - base] = bytes(hi - lo)
            i += 1

    def take(self, pfn: int, n: int, max_pages: int) -> Iterator[tuple[int, int, int, int]]:
        """Yield ``(range index, first pfn, npages, byte offset in range)`` for unwritten pages of the run.

        Marks them written as it goes; pages outside the snapshot are skipped.
        """
        end = pfn + n
        i = max(bisect_right(self.starts, pfn) - 1, 0)
        while i < len(self.ranges) and pfn < end:
            base = self.starts[i]
            m = self.marks[i]
            top = base + len(m)
            if top <= pfn:
                i += 1
                continue
            if base >= end:
                break
            lo, hi = max(pfn, base) - base, min(end, top) - base
            for run in re.finditer(rb"\x00+", m[lo:hi]):
                a, b = lo + run.start(), lo + run.end()
                m[a:b] = b"\x01" * (b - a)
                while a < b:
                    k = min(max_pages, b - a)
                    yield i, base + a, k, a * PAGE_SIZE
                    a += k
            i += 1


# ---------------------------------------------------------------------------
# chunk encoding (runs in worker threads)

_tls = threading.local()


def compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's zstd compressor at ``level`` (a context is not thread-safe; each thread keeps its own)."""
    cache = getattr(_tls, "c", None)
    if cache is None:
        cache = _tls.c = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return c


def _compress(raw: bytes | bytearray, level: int) -> tuple[bytes | bytearray, Compression]:
    if level == 0 or len(raw) < 64:  # 0: store; negative: zstd fast levels
        return raw, Compression.NONE
    out = compressor(level).compress(raw)
    if len(out) >= len(raw):
        return raw, Compression.NONE
    return out, Compression.ZSTD


@dataclass
class _Chunk:
    pfn: int
    npages: int
    zero: bool
    zero_pages: int = 0
    stored: bytes | bytearray = b""
    raw_len: int = 0
    comp: Compression = Compression.NONE
    psum: bytes = b""


def _zero_flags(data: bytes | memoryview, npages: int) -> tuple[list[bool], bytes]:
    """Per page: is it all zero? And the zero map (R-PAG-1) of those flags.

    numpy reads the mmap once without the GIL and packs the bits in C; the
    fallback copies the chunk once and compares pages with ``startswith``.
    """
    maplen = pages_map_len(npages)
    if _np is not None:
        arr = _np.frombuffer(data, dtype=_np.uint64).reshape(npages, PAGE_SIZE // 8)
        zero = ~arr.any(axis=1)
        zmap = _np.packbits(zero, bitorder="little").tobytes().ljust(maplen, b"\0")
        flags = cast(list[bool], zero.tolist())  # a 1-d array: a list (the stubs allow a 0-d scalar)
        return flags, zmap
    b = data if isinstance(data, bytes) else bytes(data)
    flags = [b.startswith(ZERO_PAGE, i * PAGE_SIZE) for i in range(npages)]
    bits = 0
    for i, z in enumerate(flags):
        if z:
            bits |= 1 << i
    return flags, bits.to_bytes(maplen, "little")


def _encode_pages(pfn: int, data: memoryview, npages: int, level: int) -> _Chunk:
    """Zero map + non-zero pages, compressed and checksummed (R-PAG-1).

    ``data`` is a view of the snapshot; it is read here, in a worker thread,
    and copied only where the format needs contiguous bytes (an
    incompressible chunk stored raw).
    """
    zero, zmap = _zero_flags(data, npages)
    nz = sum(zero)
    if nz == npages:
        return _Chunk(pfn, npages, True, npages)
    maplen = len(zmap)
    # runs of non-zero pages, fed to zstd without joining them first
    runs: list[memoryview] = []
    i = 0
    while i < npages:
        if zero[i]:
            i += 1
            continue
        j = i
        while j < npages and not zero[j]:
            j += 1
        runs.append(data[i * PAGE_SIZE : j * PAGE_SIZE])
        i = j
    raw_len = maplen + (npages - nz) * PAGE_SIZE
    if level != 0:
        # one-shot: zstd's single-call path costs about 15 % less CPU than streaming the runs
        # (measured on the issue-13 mix); the join is one 1 MiB copy, in this worker thread
        out = compressor(level).compress(b"".join([zmap, *runs]))
        if len(out) < raw_len:
            return _Chunk(pfn, npages, False, nz, out, raw_len, Compression.ZSTD, payload_checksum(out))
    raw = b"".join([zmap, *runs])
    return _Chunk(pfn, npages, False, nz, raw, raw_len, Compression.NONE, payload_checksum(raw))


# ---------------------------------------------------------------------------
# the writer


def write_dump(
    snapshot: Snapshot,
    device: DumpDevice,
    plan: str = "progressive",
    deadline: float | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    producer: Producer | None = None,
    *,
    threads: int | None = None,
    dump_id: bytes | None = None,
    dump_time_ns: int | None = None,
) -> WriteResult:
    """Write ``snapshot`` to ``device`` as a progressive dump following ``plan``.

    ``deadline`` is in device-clock seconds (``device.clock()``); when it
    passes, the current layer is left uncommitted and the writer stops
    (FORMAT.md R-WR-3). Returns per layer whether it committed, when it
    became durable and its bytes. Raises :class:`WriterError` only before
    anything is written (unknown plan, device too small); device errors
    during the dump stop it and are reported in ``WriteResult.error``.
    ``threads`` sets the compression workers (default: CPUs, at most 4);
    ``dump_id``/``dump_time_ns`` are for reproducible golden test images only.
    """
    from progdump.layers import LazyProducer, get_plan, iter_layers, preload_producers, select_producer  # noqa: PLC0415

    try:
        specs = get_plan(plan)
    except ValueError as e:
        raise WriterError(str(e)) from None
    align = max(512, int(device.sector_size))
    if align % 512 or align > 1 << 20:
        raise WriterError(f"device sector size {device.sector_size} is not a multiple of 512 up to 1 MiB")
    if device.size < 4 * HEADER_BLOCK or log_end(device.size) - LOG_START < 2 * align:
        raise WriterError(f"device is {device.size} bytes: too small for a dump (needs at least 16 KiB)")
    # The clock starts before the producer is chosen: "layer 0 durable at" is the time
    # from the writer's start, OS analysis included. Producer code is imported first:
    # in a real dump path it is resident, so import time is not dump time.
    if producer is None:
        preload_producers()
    t_start = device.clock()
    prod: ProducerLike
    if producer is not None:
        prod = producer
    else:  # a raw layer 0 needs no producer yet: chosen when a later layer asks (issue 13)
        raw_first = specs[0].parts[:1] == ("panic-raw",)
        prod = LazyProducer(snapshot) if raw_first else select_producer(snapshot)

    # R-WR-1, R-ID-1: fresh per dump. Fixed values only for golden test images (tests/testdata/dumps).
    if dump_id is None:
        dump_id = os.urandom(16)
    if len(dump_id) != 16:
        raise WriterError("dump id must be 16 bytes")
    t_ns = time.time_ns() if dump_time_ns is None else int(dump_time_ns)
    info = {
        "plan": plan,
        "layers": [s.name for s in specs],
        "producer": prod.name,
        "writer": VERSION,
        "snapshot": {
            "bytes": snapshot.total_bytes,
            "ranges": len(snapshot.ranges),
            "cpus": len(snapshot.cpus),
            "hostname": str(snapshot.metadata.get("hostname", ""))[:64],
            "os": str(snapshot.metadata.get("os", ""))[:32],
        },
    }
    layers = [LayerResult(s.index, s.name) for s in specs]
    res = WriteResult(dump_id.hex(), plan, prod.name, layers, snapshot_bytes=snapshot.total_bytes)
    pages_total = snapshot.total_pages

    def emit(kind: str, layer: LayerResult | None = None, message: str = "") -> None:
        if progress is not None:
            progress(
                ProgressEvent(kind, device.clock() - t_start, layer, pages_done[0], pages_total, log.written, message)
            )

    pages_done = [0]
    log = _Log(device, dump_id, t_ns, align, t_start)
    nthreads = threads or max(1, min(4, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(max_workers=nthreads, thread_name_prefix="progdump-zstd")
    written = _Written(snapshot)
    committed: list[int] = []
    pending: list[_PendingCommit] = []

    def past_deadline() -> bool:
        return deadline is not None and device.clock() - t_start >= deadline

    try:
        try:
            hdr = DumpHeader(FORMAT_VERSION, dump_id, t_ns, device.size, align, 0, len(specs), info)
            backup_at = log_end(device.size)
            # R-HDR-1: both copies first, durable with layer 0. They are informative (R-HDR-3):
            # a copy the medium refuses costs nothing a reader needs (R-WR-7).
            for where, copy in ((0, 0), (backup_at, 1)):
                try:
                    device.write(where, pack_header(DumpHeader(**{**hdr.__dict__, "copy": copy})))
                except MediaError as e:
                    res.failed_writes += 1
                    emit("write-error", None, f"header copy {copy}: {e}")
            for spec, content in iter_layers(snapshot, specs, prod):
                lay = layers[spec.index]
                if past_deadline():
                    raise _Stop("deadline")
                lay.started = True
                emit("layer-start", lay)
                pend = _write_layer(
                    log, spec, content, lay, specs, prod, snapshot, written, pool, nthreads, past_deadline,
                    pages_done, functools.partial(emit, "pages", lay),
                )  # fmt: skip
                for h in lay.holes:
                    emit(
                        "write-error",
                        lay,
                        f"layer {lay.index} {lay.name}: write of {h['length']} bytes at {h['offset']:#x} failed"
                        f" ({h['records'][1] - h['records'][0] + 1} records lost): {h['error']}",
                    )
                if lay.committed:
                    committed.append(spec.index)
                    emit("layer-durable", lay)
                # commits refused earlier: the log has moved on, maybe past the bad region (R-WR-7)
                for p in list(pending):
                    if _try_commit(log, p.spec, p.lay, p.commit, p.seq):
                        pending.remove(p)
                        committed.append(p.spec.index)
                        emit("layer-durable", p.lay)
                if pend is not None:
                    pending.append(pend)
            res.stopped = "done"
        except _Stop as s:
            res.stopped = s.reason
        except DeviceError as e:
            res.stopped = "error"
            res.error = str(e)
        # END record (R-WR-2/3): best effort; a failure here loses nothing committed.
        try:
            end_info: dict[str, object] = {
                "reason": res.stopped,
                "committed": sorted(committed),
                "error": res.error[:512],
            }
            if log.failures:
                end_info["failed_writes"] = len(log.failures)
                end_info["holes"] = [f.to_json() for f in log.failures[:16]]
            end = json.dumps(end_info).encode()
            log.append(RecordType.END, 0, end, len(end), Compression.NONE)
            log.barrier()
        except (_Stop, DeviceError):
            try:
                log.q.join()
                device.flush()
            except DeviceError:
                pass
        res.failed_writes += len(log.failures)
        if res.stopped == "done":
            res.pages_lost = sum(written.unwritten(pfn, n) for f in log.failures for pfn, n in f.pages)
        emit("stopped", None, res.stopped)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        log.close()
    res.elapsed_s = device.clock() - t_start
    res.device_bytes = log.written + 2 * HEADER_BLOCK
    return res


def _write_layer(
    log: _Log, spec: LayerSpec, content: LayerContent, lay: LayerResult, specs: tuple[LayerSpec, ...],
    producer: ProducerLike, snapshot: Snapshot,
    written: _Written, pool: ThreadPoolExecutor, nthreads: int, past_deadline: Callable[[], bool],
    pages_done: list[int], tick: Callable[[], None],
) -> _PendingCommit | None:  # fmt: skip
    """Write one layer's records, flush, commit, flush (R-COM-1); the commit if the medium refused it."""
    first_seq = log.seq
    digest = xxhash.xxh3_128()
    payload_bytes = 0

    def add(
        rtype: RecordType, stored: bytes | bytearray, raw_len: int, comp: Compression,
        aux0: int = 0, aux1: int = 0, psum: bytes | None = None, pages: tuple[int, int] | None = None,
    ) -> None:  # fmt: skip
        nonlocal payload_bytes
        if past_deadline():
            raise _Stop("deadline")
        hdr, span = log.append(rtype, spec.index, stored, raw_len, comp, aux0, aux1, psum, pages)
        digest.update(hdr)
        payload_bytes += len(stored)
        lay.bytes += span
        lay.records += 1

    # LAYER_INFO (R-TYP-1)
    notes = [str(n)[:4096] for n in content.notes]
    for art in content.artifacts:
        if len(art.data) > MAX_ARTIFACT:
            notes.append(f"artifact {art.name}: {len(art.data)} bytes, truncated to {MAX_ARTIFACT}")
    while notes and len(json.dumps(notes)) > MAX_NOTES_BYTES:
        notes.pop()
    info = json.dumps(
        {
            "index": spec.index,
            "name": spec.name,
            "zstd_level": spec.zstd_level,
            "parts": list(spec.parts),
            "plan": [s.name for s in specs],
            "notes": notes,
            "producer": producer.name,
        },
        sort_keys=True,
    ).encode()
    stored, comp = _compress(info, spec.zstd_level)
    add(RecordType.LAYER_INFO, stored, len(info), comp)

    # ARTIFACTs (R-TYP-2)
    for art in content.artifacts:
        data = bytes(art.data)
        if len(data) > MAX_ARTIFACT:
            data = data[:MAX_ARTIFACT]  # the reader refuses more; keep the head (noted above)
        name = art.name.encode().ljust(ARTIFACT_NAME_FIELD, b"\0")
        off = 0
        while True:
            chunk = data[off : off + ARTIFACT_CHUNK]
            raw = name + chunk
            stored, comp = _compress(raw, spec.zstd_level)
            add(RecordType.ARTIFACT, stored, len(raw), comp, off, len(data))
            off += len(chunk)
            if off >= len(data):
                break
        lay.artifacts.append(art.name)

    # PAGES / ZERO (R-PAG-1..3), pipelined through the pool
    inflight: deque[tuple[Future, int, int]] = deque()  # (future, range index, byte offset)
    zero_run = [0, 0]  # pending ZERO record: first pfn, count

    def flush_zero() -> None:
        if zero_run[1]:
            add(RecordType.ZERO, b"", 0, Compression.NONE, zero_run[0], zero_run[1], pages=(zero_run[0], zero_run[1]))
            zero_run[1] = 0

    def finish_one() -> None:
        fut, ri, boff = inflight.popleft()
        ch: _Chunk = fut.result()
        if ch.zero:
            if zero_run[1] and zero_run[0] + zero_run[1] == ch.pfn and zero_run[1] + ch.npages < 1 << 32:
                zero_run[1] += ch.npages
            else:
                flush_zero()
                zero_run[0], zero_run[1] = ch.pfn, ch.npages
        else:
            flush_zero()
            add(RecordType.PAGES, ch.stored, ch.raw_len, ch.comp, ch.pfn, ch.npages, ch.psum, pages=(ch.pfn, ch.npages))
        lay.pages += ch.npages
        lay.zero_pages += ch.zero_pages
        pages_done[0] += ch.npages
        r = snapshot.ranges[ri]
        snapshot.release_phys(r.phys_start + boff, ch.npages * PAGE_SIZE)  # bounded RSS on big snapshots
        if pages_done[0] % (4 * CHUNK_PAGES) < ch.npages:  # every ~4 MiB; the bar rate-limits itself
            tick()

    try:
        for pfn, n in content.page_runs():
            if n <= 0 or pfn < 0:
                continue
            for ri, first, k, boff in written.take(pfn, n, CHUNK_PAGES):
                if past_deadline():
                    raise _Stop("deadline")
                view = snapshot.ranges[ri].buffer[boff : boff + k * PAGE_SIZE]
                inflight.append((pool.submit(_encode_pages, first, view, k, spec.zstd_level), ri, boff))
                while len(inflight) > 2 * nthreads:
                    finish_one()
        while inflight:
            finish_one()
        flush_zero()
    finally:
        for fut, _, _ in inflight:
            fut.cancel()

    if past_deadline():
        raise _Stop("deadline")
    count = log.seq - first_seq
    log.barrier()  # R-COM-1: the layer's records are durable before its commit is written
    t_flushed = log.dev.clock() - log.t0
    stats: dict[str, object] = {
        "pages": lay.pages,
        "zero_pages": lay.zero_pages,
        "artifacts": lay.artifacts,
        "records": count,
    }
    failed = log.failures_since(first_seq)
    if failed:
        # R-WR-7: the layer has a hole. Its commit still says what it held (the reader then
        # reports it partial, with the hole); its lost pages are wanted again by later layers.
        for f in failed:
            lo, hi = max(f.seq_lo, first_seq), f.seq_hi
            lay.lost_records += hi - lo
            lay.holes.append(f.to_json())
            for pfn, n in f.pages:
                written.unmark(pfn, n)
                lay.pages -= n
        stats["failed_writes"] = [h for h in lay.holes[:64]]
        stats["lost_records"] = lay.lost_records
    commit = pack_commit(CommitInfo(first_seq, count, digest.digest(), payload_bytes, t_flushed, stats))
    commit_seq = log.seq
    log.seq += 1  # the commit's number is first + count (R-COM-2), whichever try lands
    if not _try_commit(log, spec, lay, commit, commit_seq):
        return _PendingCommit(spec, lay, commit, commit_seq)
    return None


@dataclass
class _PendingCommit:
    """A layer whose COMMIT the medium refused on every try: tried again after later layers."""

    spec: LayerSpec
    lay: LayerResult
    commit: bytes
    seq: int


def _try_commit(log: _Log, spec: LayerSpec, lay: LayerResult, commit: bytes, seq: int) -> bool:
    """Write a layer's COMMIT under sequence number ``seq``, retrying past a bad spot (R-COM-2, R-WR-7).

    A COMMIT that the medium refuses is written again at the log's next landing (1 MiB
    further each time) with the same sequence number: the failed one never reached the
    device, and were a torn copy of it readable, the reader voids both and the layer
    reads back partial. True once one copy is durable; the layer is then committed and
    marked.
    """
    for _ in range(COMMIT_TRIES):
        n_failed = len(log.failures)
        hdr, span = log.append(RecordType.COMMIT, spec.index, commit, len(commit), Compression.NONE, seq=seq)
        lay.bytes += span
        log.barrier()
        if len(log.failures) == n_failed:
            lay.committed = True
            lay.durable_s = log.dev.clock() - log.t0
            log.dev.mark(f"layer {spec.index} {spec.name} committed")
            return True
    return False
