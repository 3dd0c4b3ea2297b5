"""Read a write trace recorded by :class:`progdump.devmodel.ModelledDevice`.

The format is in :mod:`progdump.devmodel`'s docstring and docs/SCENARIOS.md.
The reader never trusts the file: a bad magic or version is a clear
:class:`TraceError`; a record that is cut short or fails its checksum ends the
trace there (``truncated`` is set), because that is what a writer killed
mid-record leaves behind. Payloads stay in the file (one read-only mmap);
:meth:`Trace.data` returns zero-copy views.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass, field

import xxhash

from progdump.devmodel import (
    F_FAILED,
    K_CLOSE,
    K_DESTAGE,
    K_FLUSH,
    K_MARK,
    K_WRITE,
    REC_HEADER,
    REC_HEADER_SIZE,
    REC_MAGIC,
    TRACE_HEADER_SIZE,
    TRACE_MAGIC,
)

__all__ = ["TraceError", "Rec", "Trace", "read_trace"]

MAX_HEADER_JSON = TRACE_HEADER_SIZE - 16
MAX_PAYLOAD = 1 << 31  # no single write in a dump is 2 GiB; bigger means garbage


class TraceError(Exception):
    """The file is not a progdump trace (the message says what is wrong)."""


@dataclass(frozen=True)
class Rec:
    kind: int
    flags: int
    seq: int
    offset: int
    length: int
    t_submit: float
    t_complete: float
    t_host: float
    payload_off: int  # file offset of the payload
    payload_len: int
    label: str = ""

    @property
    def failed(self) -> bool:
        return bool(self.flags & F_FAILED)


@dataclass
class Trace:
    path: str
    header: dict
    records: list[Rec]
    truncated: bool
    _mm: mmap.mmap | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.writes = [r for r in self.records if r.kind == K_WRITE and not r.failed]
        self.failed_writes = [r for r in self.records if r.kind == K_WRITE and r.failed]
        self.flushes = [r for r in self.records if r.kind == K_FLUSH]
        self.marks = [r for r in self.records if r.kind == K_MARK]
        self.destages = [r for r in self.records if r.kind == K_DESTAGE]
        self.closed = any(r.kind == K_CLOSE for r in self.records)
        self.by_seq = {r.seq: r for r in self.writes}

    @property
    def device_size(self) -> int:
        return int(self.header.get("device_size", 0))

    @property
    def sector_size(self) -> int:
        return int(self.header.get("sector_size", 512))

    @property
    def model_name(self) -> str:
        return str(self.header.get("model", {}).get("name", "?"))

    @property
    def end_time(self) -> float:
        """Modelled time of the last completed operation."""
        return max((r.t_complete for r in self.records), default=0.0)

    def data(self, w: Rec) -> memoryview:
        assert self._mm is not None
        return memoryview(self._mm)[w.payload_off : w.payload_off + w.payload_len]

    def destaged_seqs(self) -> set[int]:
        return {r.seq for r in self.destages}

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # views still alive; the GC will close it
                pass
            self._mm = None

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_trace(path: str) -> Trace:
    """Parse ``path``; raises TraceError for a file that is not a trace at all."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise TraceError(f"{path}: cannot open trace: {e.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size < TRACE_HEADER_SIZE:
            raise TraceError(f"{path}: too short for a trace header ({size} bytes)")
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    if mm[:8] != TRACE_MAGIC:
        mm.close()
        raise TraceError(f"{path}: bad magic (not a progdump write trace)")
    version, jlen = struct.unpack_from("<II", mm, 8)
    if version != 1:
        mm.close()
        raise TraceError(f"{path}: unsupported trace version {version}")
    if jlen > MAX_HEADER_JSON:
        mm.close()
        raise TraceError(f"{path}: header JSON length {jlen} out of bounds")
    try:
        header = json.loads(bytes(mm[16 : 16 + jlen]).decode())
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        mm.close()
        raise TraceError(f"{path}: header JSON unreadable: {e}") from None
    records: list[Rec] = []
    off = TRACE_HEADER_SIZE
    truncated = False
    while off < size:
        if off + REC_HEADER_SIZE > size:
            truncated = True
            break
        fields = REC_HEADER.unpack_from(mm, off)
        magic, kind, flags, seq, offset, length, t_sub, t_done, t_host, plen = fields
        (digest,) = struct.unpack_from("<Q", mm, off + REC_HEADER.size)
        pstart = off + REC_HEADER_SIZE
        if magic != REC_MAGIC or plen > MAX_PAYLOAD or pstart + plen > size or kind not in (1, 2, 3, 4, 5):
            truncated = True
            break
        x = xxhash.xxh64(mm[off : off + REC_HEADER.size])
        x.update(memoryview(mm)[pstart : pstart + plen])
        if x.intdigest() != digest:
            truncated = True
            break
        label = ""
        if kind == K_MARK:
            label = bytes(mm[pstart : pstart + plen]).decode("utf-8", "replace")
        if kind == K_WRITE and not flags & F_FAILED and plen != length:
            truncated = True
            break
        records.append(Rec(kind, flags, seq, offset, length, t_sub, t_done, t_host, pstart, plen, label))
        off = pstart + plen + (-plen % 8)
    return Trace(path, header, records, truncated, mm)
