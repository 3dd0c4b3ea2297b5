"""A crash state as a read-only device, without materialising an image.

:class:`OverlaySource` has ``size`` and ``pread(offset, length)``, the source
interface :func:`progdump.reader.scan` accepts. Reads come from the base image
(the device as it was before the dump: an older dump) with the state's writes
painted over it, in seq order, from zero-copy views of the trace's payloads.
Building one costs O(writes kept x log), reading costs O(extents touched);
nothing is copied until the reader asks for bytes.
"""

from __future__ import annotations

import bisect
import os

from harness.crashsim.states import CrashState
from harness.crashsim.trace import Trace

__all__ = ["ExtentMap", "OverlaySource", "BaseImage"]


class ExtentMap:
    """Disjoint painted extents ``[start, end)`` -> (view, offset into view).

    Later paints win where they overlap earlier ones (a later write to the
    same sectors replaces the earlier data, as on a disk).
    """

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.srcs: list[tuple[memoryview, int]] = []

    def paint(self, start: int, data: memoryview) -> None:
        end = start + len(data)
        if end <= start:
            return
        i = bisect.bisect_right(self.ends, start)  # first extent ending after start
        new_s: list[int] = []
        new_e: list[int] = []
        new_v: list[tuple[memoryview, int]] = []
        j = i
        while j < len(self.starts) and self.starts[j] < end:
            s, e, (v, vo) = self.starts[j], self.ends[j], self.srcs[j]
            if s < start:  # keep the left piece
                new_s.append(s)
                new_e.append(start)
                new_v.append((v, vo))
            j += 1
        new_s.append(start)
        new_e.append(end)
        new_v.append((data, 0))
        if j > i:
            s, e, (v, vo) = self.starts[j - 1], self.ends[j - 1], self.srcs[j - 1]
            if e > end:  # keep the right piece
                new_s.append(end)
                new_e.append(e)
                new_v.append((v, vo + (end - s)))
        self.starts[i:j] = new_s
        self.ends[i:j] = new_e
        self.srcs[i:j] = new_v

    def __len__(self) -> int:
        return len(self.starts)

    def overlapping(self, start: int, end: int):
        """Yield ``(lo, hi, view, view_offset_of_lo)`` for extents meeting ``[start, end)``."""
        i = bisect.bisect_right(self.ends, start)
        while i < len(self.starts) and self.starts[i] < end:
            s, e, (v, vo) = self.starts[i], self.ends[i], self.srcs[i]
            lo, hi = max(s, start), min(e, end)
            yield lo, hi, v, vo + (lo - s)
            i += 1


class BaseImage:
    """The device's content before the dump, read with pread (shared by many overlays)."""

    def __init__(self, path: str | None, size: int) -> None:
        self.path = path
        self.size = size
        self._fd = os.open(path, os.O_RDONLY) if path else -1

    def pread(self, offset: int, length: int) -> bytes:
        if self._fd < 0:
            return bytes(length)
        data = os.pread(self._fd, length, offset)
        return data + bytes(length - len(data))  # past the file's end reads as zeros (sparse)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> BaseImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OverlaySource:
    """``base`` + the writes ``state`` keeps, as a ``.size`` / ``.pread`` source."""

    def __init__(self, base: BaseImage, trace: Trace, state: CrashState) -> None:
        self.base = base
        self.size = min(base.size, trace.device_size) if trace.device_size else base.size
        self.extents = ExtentMap()
        ss = trace.sector_size
        torn_seq = state.torn[0] if state.torn else -1
        for w in trace.writes:  # seq order
            if w.seq == torn_seq:
                bits = state.torn[1]  # type: ignore[index]
                data = trace.data(w)
                nsec = w.length // ss
                i = 0
                while i < nsec:  # paint runs of kept sectors
                    if bits[i // 8] >> (i % 8) & 1:
                        j = i
                        while j < nsec and bits[j // 8] >> (j % 8) & 1:
                            j += 1
                        self.extents.paint(w.offset + i * ss, data[i * ss : j * ss])
                        i = j
                    else:
                        i += 1
            elif w.seq in state.keep:
                self.extents.paint(w.offset, trace.data(w))

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self.size)
        if end <= offset:
            return b""
        pieces = list(self.extents.overlapping(offset, end))
        if len(pieces) == 1 and pieces[0][0] == offset and pieces[0][1] == end:
            _, _, v, vo = pieces[0]
            return bytes(v[vo : vo + end - offset])
        buf = bytearray(self.base.pread(offset, end - offset))
        for lo, hi, v, vo in pieces:
            buf[lo - offset : hi - offset] = v[vo : vo + hi - lo]
        return bytes(buf)
