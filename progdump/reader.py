"""The progdump reader (our savecore): scan a device, pick the newest dump, verify, classify.

It follows docs/FORMAT.md section 9. The device is hostile: nothing it says
is used before the checksum covering it verifies, every length is bounded by
the format's limits and the device size, decompression is bounded by the
record's raw length, and records of any other dump id are never combined
with the chosen dump's.

``scan(source)`` reads only record headers plus the payloads of the chosen
dump's records (to verify them), so it is cheap on small dumps: the
crash-state replayer calls it thousands of times a minute on overlay images.
``source`` is a path or any object with ``size`` and ``pread(offset, length)``.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import xxhash
import zstandard

from progdump.errors import ProgdumpError
from progdump.format import (
    ARTIFACT_NAME_FIELD,
    ARTIFACT_NAME_RE,
    HEADER_BLOCK,
    LANDING,
    LAYER_NAME_RE,
    LOG_START,
    MAX_ARTIFACT,
    MAX_HOLE,
    MAX_LAYERS,
    MAX_PAGES_PER_RECORD,
    MAX_PFN_END,
    MAX_ZERO_PAGES,
    RECORD_ALIGN,
    RECORD_HEADER_SIZE,
    RECORD_MAGIC,
    RESYNC_WINDOW,
    CommitInfo,
    Compression,
    DumpHeader,
    FormatError,
    RecordHeader,
    RecordType,
    RecordVersionError,
    UnsupportedError,
    log_end,
    pages_map_len,
    parse_commit,
    parse_header,
    parse_record_header,
    payload_checksum,
    record_span,
)
from progdump.snapshot import PAGE_SIZE

__all__ = ["Source", "ScanResult", "LayerStatus", "ReaderError", "scan", "open_source", "RESYNC_WINDOW"]

MAX_WARNINGS = 50
MAX_PROBE_ROUNDS = 256  # landings followed per scan (one per hole the writer carried past)


class ReaderError(ProgdumpError):
    """The source cannot be read at all (I/O error, not a file); the message says why."""


class Source(Protocol):
    size: int

    def pread(self, offset: int, length: int) -> bytes: ...


class _FileSource:
    """A file or block device opened read-only."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1  # set first: close() (and __del__) must work whatever __init__ did
        try:
            # Checked before opening, and opened non-blocking: a FIFO or a socket would block
            # the open or the reads forever; only a regular file or a block device is a device.
            st = os.stat(path)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise ReaderError(f"{path}: {_file_kind(st.st_mode)}, not a regular file or block device")
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise ReaderError(f"{path}: {e.strerror or e}") from None
        self.fd = fd
        try:
            st = os.fstat(fd)  # what was opened, not what the name pointed at a moment before
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise ReaderError(f"{path}: {_file_kind(st.st_mode)}, not a regular file or block device")
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as e:
            self.close()
            raise ReaderError(f"{path}: {e.strerror or e}") from None
        except ReaderError:
            self.close()
            raise

    def pread(self, offset: int, length: int) -> bytes:
        try:
            return os.pread(self.fd, length, offset)
        except OSError as e:
            raise ReaderError(f"{self.path}: read of {length} bytes at {offset:#x}: {e.strerror or e}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            self.close()


def _file_kind(mode: int) -> str:
    """What a non-device file is, for an error message."""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISDIR, "a directory")):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


def open_source(source: object) -> tuple[Source, bool]:
    """``(source, owned)``: a path is opened (owned, close it); an object is used as is."""
    if isinstance(source, (str, os.PathLike)):
        return _FileSource(os.fspath(source)), True
    if not hasattr(source, "pread") or not hasattr(source, "size"):
        raise ReaderError(f"not a path and has no size/pread: {type(source).__name__}")
    return source, False  # type: ignore[return-value]


def _read(src: Source, offset: int, length: int) -> bytes:
    """Exactly the bytes the source has in ``[offset, offset+length)`` (short at its end)."""
    data = src.pread(offset, length)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ReaderError(f"source pread returned {type(data).__name__}, not bytes")
    return bytes(data[:length])


# ---------------------------------------------------------------------------
# results


@dataclass
class _Rec:
    h: RecordHeader
    verified: bool = False  # payload checksum checked and matched
    checked: bool = False  # payload checked (matched or not)
    small: object = None  # parsed LAYER_INFO/COMMIT/END payload, or artifact name
    art_len: int = 0  # ARTIFACT: chunk length


@dataclass
class LayerStatus:
    index: int
    name: str
    status: str = "missing"  # complete | partial | missing
    bytes: int = 0  # device bytes of this layer's verified records
    records: int = 0  # verified records (commit included)
    records_expected: int | None = None  # from the commit, when one verified
    pages: int = 0  # pages recovered (data + known zero)
    #: pages known zero: after scan() those of ZERO records; export adds the zero pages
    #: inside PAGES records (their zero maps are compressed, so scan does not read them)
    zero_pages: int = 0
    artifacts: list[str] = field(default_factory=list)  # complete artifacts
    artifacts_incomplete: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # the writer's notes (LAYER_INFO)
    producer: str = ""
    durable_s: float | None = None  # from the commit (records flushed at)
    reasons: list[str] = field(default_factory=list)  # why not complete
    stats: dict = field(default_factory=dict)
    #: failed writes the writer reported in this layer's commit (R-WR-7): where the hole is
    holes: list[dict] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "index": self.index,
            "name": self.name,
            "status": self.status,
            "bytes": self.bytes,
            "records": self.records,
            "records_expected": self.records_expected,
            "pages": self.pages,
            "zero_pages": self.zero_pages,
            "artifacts": self.artifacts,
            "artifacts_incomplete": self.artifacts_incomplete,
            "notes": self.notes,
            "producer": self.producer,
            "durable_s": self.durable_s,
            "degraded": [n[len("degraded: ") :] for n in self.notes if n.startswith("degraded: ")],
            "reasons": self.reasons,
            "holes": self.holes,
        }


@dataclass
class ScanResult:
    """What a device holds: the newest progdump dump, verified and classified."""

    found: bool = False
    dump_id: str | None = None
    format_version: int | None = None
    dump_time_ns: int | None = None
    plan: str | None = None
    producer: str | None = None
    layers: list[LayerStatus] = field(default_factory=list)
    end: dict | None = None
    headers: list[str] = field(default_factory=list)  # which header copies were valid for this dump
    other_dumps: list[str] = field(default_factory=list)  # older dump ids seen (never mixed in)
    #: the newest dump is one this reader cannot read (R-VER-1): what and where; ``found`` is then False
    unsupported: str = ""
    unsupported_version: int | None = None  # the format version that dump's header or record names
    warnings: list[str] = field(default_factory=list)
    error: str = ""
    device_size: int = 0
    _src: Source | None = field(default=None, repr=False)
    _recs: list[_Rec] = field(default_factory=list, repr=False)
    _artifacts: dict[str, tuple[int, list[_Rec]]] = field(default_factory=dict, repr=False)
    _owned: bool = field(default=False, repr=False)

    def close(self) -> None:
        """Close the device when scan() opened it from a path."""
        if self._owned and self._src is not None:
            self._src.close()  # type: ignore[attr-defined]
        self._owned = False

    def __enter__(self) -> ScanResult:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- export helpers ---------------------------------------------------
    def artifact_names(self) -> dict[str, int]:
        """Complete artifacts: name -> layer index."""
        return {n: li for n, (li, _) in self._artifacts.items()}

    def read_artifact(self, name: str) -> bytes | None:
        """The artifact's bytes, re-read and re-verified; None when absent or no longer verifiable."""
        ent = self._artifacts.get(name)
        if ent is None or self._src is None:
            return None
        out = bytearray()
        for r in ent[1]:
            raw = _payload(self._src, r.h)
            if raw is None or len(raw) < ARTIFACT_NAME_FIELD:
                return None
            out += raw[ARTIFACT_NAME_FIELD:]
        return bytes(out)

    def reject_record(self, h: RecordHeader, why: str) -> None:
        """Drop a record that verified at scan but cannot be used (content invalid on re-read).

        Its layer can no longer be complete: all its content is not there.
        """
        for r in self._recs:
            if r.h.seq == h.seq and r.verified:
                r.verified = False
        for lay in self.layers:
            if lay.index == h.layer:
                if lay.status == "complete":
                    lay.status = "partial"
                lay.reasons.append(f"record {h.seq}: {why}")
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(f"record {h.seq} at {h.offset:#x} rejected at export: {why}")

    def page_records(self) -> list[tuple[int, int, RecordHeader]]:
        """``(first_pfn, npages, header)`` of every verified PAGES/ZERO record, by pfn then seq."""
        out = [
            (r.h.aux0, r.h.aux1, r.h)
            for r in self._recs
            if r.verified and r.h.rtype in (RecordType.PAGES, RecordType.ZERO)
        ]
        out.sort(key=lambda t: (t[0], t[2].seq))
        return out

    def read_pages(self, h: RecordHeader) -> tuple[int, bytes | None, bytes] | None:
        """``(npages, zero_map or None, data of non-zero pages)`` for a page record; None if it no longer verifies."""
        if h.rtype == RecordType.ZERO:
            return h.aux1, None, b""
        raw = _payload(self._src, h) if self._src is not None else None
        if raw is None:
            return None
        return _split_pages(raw, h.aux1)

    def to_json(self) -> dict[str, object]:
        return {
            "found": self.found,
            "dump_id": self.dump_id,
            "format_version": self.format_version,
            "dump_time_ns": self.dump_time_ns,
            "plan": self.plan,
            "producer": self.producer,
            "layers": [lay.to_json() for lay in self.layers],
            "end": self.end,
            "headers": self.headers,
            "other_dumps": self.other_dumps,
            "unsupported": self.unsupported,
            "unsupported_version": self.unsupported_version,
            "warnings": self.warnings,
            "error": self.error,
        }


def _split_pages(raw: bytes, npages: int) -> tuple[int, bytes, bytes] | None:
    maplen = pages_map_len(npages)
    if len(raw) < maplen:
        return None
    zmap = raw[:maplen]
    nzero = sum(bin(b).count("1") for b in zmap)
    extra = int.from_bytes(zmap, "little") >> npages
    if extra or len(raw) != maplen + (npages - nzero) * PAGE_SIZE:
        return None
    return npages, zmap, raw[maplen:]


def _payload(src: Source, h: RecordHeader) -> bytes | None:
    """The record's raw payload, verified and decompressed within bounds; None when bad."""
    stored = _read(src, h.offset + RECORD_HEADER_SIZE, h.stored_len)
    if len(stored) != h.stored_len or payload_checksum(stored) != h.payload_sum:
        return None
    return _decompress(stored, h)


def _decompress(stored: bytes, h: RecordHeader) -> bytes | None:
    if h.compression == Compression.NONE:
        return stored
    try:
        out = zstandard.ZstdDecompressor().decompress(stored, max_output_size=h.raw_len)
    except zstandard.ZstdError:
        return None
    return out if len(out) == h.raw_len else None


# ---------------------------------------------------------------------------
# scan


class _Scanner:
    def __init__(self, src: Source, resync_window: int) -> None:
        self.src = src
        self.size = int(src.size)
        self.window = resync_window
        self.recs: dict[bytes, list[_Rec]] = {}
        self.times: dict[bytes, int] = {}
        self.headers: dict[bytes, list[DumpHeader]] = {}
        self.newest: tuple[int, bytes] | None = None
        self.warnings: list[str] = []
        #: dumps named by a checksum-valid header or record this reader cannot read (R-VER-1..3):
        #: dump id -> (where, why, version), the first seen
        self.unsupported: dict[bytes, tuple[str, str, int]] = {}
        self.align = RECORD_ALIGN

    def warn(self, msg: str) -> None:
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(msg)

    def consider(self, t: int, dump_id: bytes) -> None:
        known = self.times.get(dump_id)
        if known is not None and known != t:
            self.warn(f"dump {dump_id.hex()} appears with two dump times; the first seen is used")
            return
        self.times[dump_id] = t
        if self.newest is None or (t, dump_id) > self.newest:
            self.newest = (t, dump_id)

    def note_unsupported(self, where: str, e: UnsupportedError) -> None:
        """A dump this reader cannot read is present: it takes part in choosing the newest (R-RD-3)."""
        self.consider(e.dump_time_ns, e.dump_id)
        self.unsupported.setdefault(e.dump_id, (where, str(e), e.version))

    def read_headers(self, end: int) -> None:
        for copy, off in ((0, 0), (1, end)):
            blk = _read(self.src, off, HEADER_BLOCK)
            try:
                h = parse_header(blk)
            except UnsupportedError as e:
                self.note_unsupported(f"header copy {copy}", e)
                continue
            if h is None:
                continue
            if h.copy != copy:
                self.warn(f"header at {off:#x} says it is copy {h.copy}; ignored")
                continue
            self.headers.setdefault(h.dump_id, []).append(h)
            self.consider(h.dump_time_ns, h.dump_id)
            if h.device_size != self.size:
                self.warn(f"header copy {copy}: written for a {h.device_size}-byte device, this one is {self.size}")

    def header_at(self, off: int, end: int) -> RecordHeader | None:
        if off + RECORD_HEADER_SIZE > end:
            return None
        try:
            h = parse_record_header(_read(self.src, off, RECORD_HEADER_SIZE), off)
        except RecordVersionError as e:
            self.note_unsupported(f"record at {off:#x}", e)
            return None
        if h is None or off + record_span(h.stored_len) > end:
            return None
        return h

    def resync(self, start: int, end: int) -> int | None:
        """Next 512-aligned offset in ``[start, start + window)`` holding a valid record header (R-RD-2)."""
        start += -start % RECORD_ALIGN
        limit = min(end, start + self.window)
        step = 64 << 10
        off = start
        while off < limit:
            n = min(step, limit - off)
            chunk = _read(self.src, off, n)
            if not chunk:
                return None
            pos = chunk.find(RECORD_MAGIC)
            while pos >= 0:
                at = off + pos
                if at % RECORD_ALIGN == 0 and self.header_at(at, end) is not None:
                    return at
                pos = chunk.find(RECORD_MAGIC, pos + 1)
            off += len(chunk)
            step = min(step * 4, 1 << 20)
        return None

    def verify(self, r: _Rec) -> None:
        """Check the payload of ``r`` (once); parse the small record types."""
        if r.checked:
            return
        r.checked = True
        h = r.h
        if h.rtype == RecordType.ZERO:
            r.verified = (
                h.stored_len == 0 and h.raw_len == 0 and 0 < h.aux1 <= MAX_ZERO_PAGES and h.aux0 + h.aux1 <= MAX_PFN_END
            )
            return
        if h.rtype == RecordType.PAGES:
            if not (0 < h.aux1 <= MAX_PAGES_PER_RECORD and h.aux0 + h.aux1 <= MAX_PFN_END):
                return
            stored = _read(self.src, h.offset + RECORD_HEADER_SIZE, h.stored_len)
            r.verified = len(stored) == h.stored_len and payload_checksum(stored) == h.payload_sum
            return
        raw = _payload(self.src, h)
        if raw is None:
            return
        try:
            if h.rtype == RecordType.ARTIFACT:
                name = raw[:ARTIFACT_NAME_FIELD].rstrip(b"\0").decode("ascii")
                if len(raw) < ARTIFACT_NAME_FIELD or not ARTIFACT_NAME_RE.match(name):
                    raise ValueError(f"artifact name {name!r}")
                r.small, r.art_len = name, len(raw) - ARTIFACT_NAME_FIELD
            elif h.rtype == RecordType.COMMIT:
                r.small = parse_commit(raw)
            else:  # LAYER_INFO, END: JSON objects
                obj = json.loads(raw.decode("utf-8"))
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
                r.small = obj
        except (ValueError, UnicodeDecodeError, FormatError, RecursionError) as e:
            self.warn(f"record {h.seq} at {h.offset:#x}: checksum good but payload unreadable: {e}")
            return
        r.verified = True

    def walk(self, end: int, start: int = LOG_START, stop_at: frozenset[int] = frozenset()) -> None:
        """Follow records from ``start`` (R-RD-2); a walk from a landing stops at a record already seen."""
        off = start
        while off < end:
            if off in stop_at:
                return
            h = self.header_at(off, end)
            if h is None and off % 4096:
                # a writer with 4 KiB alignment (4Kn / 512e devices) pads records to 4 KiB: look there first
                up = off + (-off % 4096)
                h = self.header_at(up, end)
                if h is not None:
                    off = up
            if h is None:
                nxt = self.resync(off + RECORD_ALIGN, end)
                if nxt is None:
                    return
                off = nxt
                continue
            self.consider(h.dump_time_ns, h.dump_id)
            if self.is_newest(h):
                self.keep(h)
            if h.rtype == RecordType.END:
                # The end of some dump's log (R-RD-2): of the newest, the walk is done; of an older
                # dump, what follows is older still (a newer dump reaching past it would have covered
                # it), so stop rather than resync through the rest of the device. A landing behind
                # it (R-WR-7) is found by the probes.
                return
            off += record_span(h.stored_len)

    def is_newest(self, h: RecordHeader) -> bool:
        return self.newest is not None and self.newest[1] == h.dump_id and self.times[h.dump_id] == h.dump_time_ns

    def keep(self, h: RecordHeader) -> None:
        """Only the newest dump's records are kept (memory follows the chosen dump, not the device);
        a newer dump seen later replaces them."""
        if h.dump_id not in self.recs:
            self.recs = {h.dump_id: []}
        r = _Rec(h)
        self.recs[h.dump_id].append(r)
        self.verify(r)

    def probe_landings(self, end: int) -> None:
        """Find the newest dump's records after holes (R-RD-2, R-WR-7).

        After a failed write the writer restarts its log on a ``LANDING``
        boundary at most ``MAX_HOLE`` past its last good write. The walk may
        not get there: an older dump showing through the hole can span the
        landing, or end in it. So past the end of every run of the newest
        dump's records, each boundary up to ``MAX_HOLE`` further is probed
        (one header read each), and a walk starts from any unseen record of
        the newest dump found there.
        """
        probed: set[int] = set()
        for _ in range(MAX_PROBE_ROUNDS):
            if self.newest is None:
                return
            recs = self.recs.get(self.newest[1], [])
            seen = {r.h.offset for r in recs}
            # LOG_START too: the very first write may be the one that failed
            ends = ({r.h.offset + record_span(r.h.stored_len) for r in recs} | {LOG_START}) - seen
            found = False
            for e in sorted(ends):
                first = e - e % LANDING + LANDING
                for at in range(first, min(end, e + MAX_HOLE + 1), LANDING):
                    if at in probed or at in seen:
                        continue
                    probed.add(at)
                    h = self.header_at(at, end)
                    if h is None:
                        continue
                    self.consider(h.dump_time_ns, h.dump_id)
                    if self.is_newest(h):
                        self.walk(end, at, frozenset(seen))
                        found = True
                        break
                if found:
                    break
            if not found:
                return


def scan(source: object, *, resync_window: int = RESYNC_WINDOW) -> ScanResult:
    """Scan ``source`` (a path, or an object with ``size`` and ``pread``) for the newest dump.

    A path is opened read-only and kept open for the result's ``read_*``
    methods until ``ScanResult.close()`` (or the result is dropped).

    Never raises for device content; raises :class:`ReaderError` only when
    the source itself cannot be read (I/O error, missing file).
    """
    src, owned = open_source(source)
    try:
        res = _scan(src, resync_window)
    except BaseException:
        if owned:
            src.close()  # type: ignore[attr-defined]
        raise
    res._owned = owned
    return res


def _scan(src: Source, resync_window: int) -> ScanResult:
    sc = _Scanner(src, resync_window)
    size = sc.size
    res = ScanResult(device_size=size, _src=src)
    S = size - size % HEADER_BLOCK
    if S < 4 * HEADER_BLOCK:
        res.error = f"device is {size} bytes: too small to hold a progdump dump"
        return res
    end = log_end(size)
    sc.read_headers(end)
    sc.walk(end)
    sc.probe_landings(end)
    res.warnings = sc.warnings
    if sc.newest is None:
        return res
    t, did = sc.newest
    others = sorted(d.hex() for d in sc.times if d != did)
    if did in sc.unsupported:
        # R-RD-3, R-VER-1: the newest dump is one this reader cannot read. It is reported, not
        # read, and no older dump is offered in its place (it is not the machine's last crash).
        where, why, ver = sc.unsupported[did]
        res.unsupported = f"dump {did.hex()} ({where}): {why}"
        res.unsupported_version = ver
        res.other_dumps = others
        return res
    res.found = True
    res.dump_id = did.hex()
    res.format_version = 1
    res.dump_time_ns = t
    res.other_dumps = others
    if sc.unsupported:
        where, why, _ = next(iter(sc.unsupported.values()))
        res.warnings.append(
            f"older dumps this reader cannot read ignored ({len(sc.unsupported)}), first: {where}: {why}"
        )
    hdrs = [h for h in sc.headers.get(did, []) if h.dump_time_ns == t]
    res.headers = ["primary" if h.copy == 0 else "backup" for h in hdrs]
    recs = [r for r in sc.recs.get(did, []) if r.h.dump_time_ns == t]
    for r in recs:
        sc.verify(r)
    _classify(res, hdrs, recs)
    return res


def _classify(res: ScanResult, hdrs: list[DumpHeader], recs: list[_Rec]) -> None:
    # one record per sequence number: a conflicting duplicate voids both (R-RD-4)
    by_seq: dict[int, _Rec] = {}
    void: set[int] = set()
    for r in recs:
        o = by_seq.get(r.h.seq)
        if o is None:
            by_seq[r.h.seq] = r
        elif o.h.raw_header != r.h.raw_header:
            void.add(r.h.seq)
    for s in void:
        del by_seq[s]
        res.warnings.append(f"sequence number {s} appears twice with different records; both ignored")
    good = [r for r in sorted(by_seq.values(), key=lambda r: r.h.seq) if r.verified]
    res._recs = good

    # R-JSON-1: a member of the wrong type is treated as absent
    info = hdrs[0].info if hdrs else {}
    names: list[str] = []
    if isinstance(info.get("layers"), list) and all(isinstance(n, str) for n in info["layers"]):
        names = info["layers"][:MAX_LAYERS]
    layer_info: dict[int, dict] = {}
    for r in good:
        if r.h.rtype == RecordType.LAYER_INFO and r.h.layer not in layer_info:
            layer_info[r.h.layer] = r.small  # type: ignore[assignment]
            plan = r.small.get("plan") if isinstance(r.small, dict) else None
            if not names and isinstance(plan, list) and all(isinstance(n, str) for n in plan):
                names = plan[:MAX_LAYERS]
        if r.h.rtype == RecordType.END and res.end is None:
            res.end = r.small  # type: ignore[assignment]
    res.plan = info["plan"][:64] if isinstance(info.get("plan"), str) else None
    res.producer = info["producer"][:32] if isinstance(info.get("producer"), str) else None
    top = max([len(names) - 1] + [r.h.layer for r in good if r.h.layer < MAX_LAYERS])
    layers = []
    for i in range(top + 1):
        nm = names[i] if i < len(names) else ""
        li = layer_info.get(i, {})
        if not nm and isinstance(li.get("name"), str):
            nm = li["name"]
        if not LAYER_NAME_RE.match(nm):
            nm = f"layer{i}"
        lay = LayerStatus(i, nm)
        notes = li.get("notes")
        if isinstance(notes, list):
            lay.notes = [n[:4096] for n in notes[:200] if isinstance(n, str)]
        if isinstance(li.get("producer"), str):
            lay.producer = li["producer"][:32]
            if res.producer is None:
                res.producer = lay.producer
        layers.append(lay)
    res.layers = layers

    # per layer: records, commit check (R-COM-3), artifacts, pages
    by_layer: dict[int, list[_Rec]] = {}
    for r in good:
        if r.h.rtype != RecordType.END:
            by_layer.setdefault(r.h.layer, []).append(r)
    for lay in layers:
        lrecs = by_layer.get(lay.index, [])
        lay.records = len(lrecs)
        lay.bytes = sum(record_span(r.h.stored_len) for r in lrecs)
        for r in lrecs:
            if r.h.rtype in (RecordType.PAGES, RecordType.ZERO):
                lay.pages += r.h.aux1
                if r.h.rtype == RecordType.ZERO:
                    lay.zero_pages += r.h.aux1
        _artifacts(res, lay, lrecs)
        commits = [r for r in lrecs if r.h.rtype == RecordType.COMMIT]
        complete = False
        if not commits:
            lay.reasons.append("no commit record")
        for c in commits:
            ci: CommitInfo = c.small  # type: ignore[assignment]
            lay.records_expected = ci.count + 1
            why = _check_commit(ci, c, by_seq, lay.index)
            if why:
                lay.reasons.append(why)
                continue
            complete = True
            lay.durable_s = ci.t_flushed
            lay.stats = ci.stats
            break
        if complete:
            lay.status = "complete"
            lay.reasons = []
        else:
            _holes(lay, commits)
        if not complete and lrecs:
            lay.status = "partial"
        # page counts for the zero map of PAGES records are counted at export (payload not parsed here)


def _holes(lay: LayerStatus, commits: list[_Rec]) -> None:
    """The failed writes a verified commit reports (R-WR-7), checked for shape and bounded."""
    for c in commits:
        ci: CommitInfo = c.small  # type: ignore[assignment]
        failed = ci.stats.get("failed_writes") if isinstance(ci.stats, dict) else None
        if not isinstance(failed, list):
            continue
        for f in failed[:64]:
            if not isinstance(f, dict):
                continue
            off, ln, recs = f.get("offset"), f.get("length"), f.get("records")
            if not (isinstance(off, int) and isinstance(ln, int) and isinstance(recs, list) and len(recs) == 2
                    and all(isinstance(x, int) for x in recs)):  # fmt: skip
                continue
            lay.holes.append({"offset": off, "length": ln, "records": recs, "error": str(f.get("error", ""))[:200]})
        if lay.holes:
            lost = sum(h["records"][1] - h["records"][0] + 1 for h in lay.holes)
            where = ", ".join(f"{h['length']} bytes at {h['offset']:#x}" for h in lay.holes[:4])
            lay.reasons.insert(
                0, f"hole: the writer reported {len(lay.holes)} failed writes ({where}), {lost} records lost"
            )
            return


def _check_commit(ci: CommitInfo, c: _Rec, by_seq: dict[int, _Rec], layer: int) -> str:
    """'' when the commit proves its layer complete, else why not (R-COM-2, R-COM-3)."""
    if ci.count < 1 or ci.count > 1 << 24 or ci.first_seq + ci.count != c.h.seq:
        return f"commit record {c.h.seq} names records {ci.first_seq}+{ci.count}: inconsistent"
    dig = xxhash.xxh3_128()
    for s in range(ci.first_seq, ci.first_seq + ci.count):
        r = by_seq.get(s)
        if r is None:
            return f"record {s} missing"
        if not r.verified:
            return f"record {s} failed verification"
        if r.h.layer != layer or r.h.rtype in (RecordType.COMMIT, RecordType.END):
            return f"record {s} does not belong to the layer"
        dig.update(r.h.raw_header)
    if dig.digest() != ci.digest:
        return "commit digest does not match the records present"
    return ""


def _artifacts(res: ScanResult, lay: LayerStatus, lrecs: list[_Rec]) -> None:
    """Complete artifacts of a layer: chunks covering [0, length) in order (R-TYP-2, R-RD-5)."""
    groups: dict[str, list[_Rec]] = {}
    for r in lrecs:
        if r.h.rtype == RecordType.ARTIFACT:
            groups.setdefault(r.small, []).append(r)  # type: ignore[arg-type]
    for name, rs in groups.items():
        total = rs[0].h.aux1
        pos = 0
        ok = total <= MAX_ARTIFACT
        chain = []
        for r in sorted(rs, key=lambda r: r.h.aux0):
            if not ok or r.h.aux1 != total or r.h.aux0 != pos:
                ok = False
                break
            chain.append(r)
            pos += r.art_len
        if ok and pos == total and (chain or total == 0):
            if name in res._artifacts:
                res.warnings.append(
                    f"artifact {name} appears in layers {res._artifacts[name][0]} and {lay.index}; first kept"
                )
                continue
            res._artifacts[name] = (lay.index, chain)
            lay.artifacts.append(name)
        else:
            lay.artifacts_incomplete.append(name)


def iter_recovered_pages(res: ScanResult) -> Iterator[tuple[int, int, int, RecordHeader]]:
    """Page records in pfn order, overlaps clipped: ``(first_pfn, npages, skip, header)`` (R-PAG-2).

    ``skip`` leading pages of the record were already given by an earlier
    (lower pfn, then lower sequence number) record and must be ignored.
    """
    covered = 0
    for first, n, h in res.page_records():
        end = first + n
        if end <= covered:
            continue
        skip = max(0, covered - first)
        yield first, n, skip, h
        covered = end
