"""Snapshot: the frozen state of a panicked machine, as the dump writer sees it.

A Snapshot is what every producer reads and what the writer dumps. It holds
guest-physical memory ranges (backed by an mmap of a file: an ELF core, QEMU's
shared memory-backend file, or ``/proc/vmcore``; never copied whole), the
registers of every CPU, ELF notes (VMCOREINFO above all), the console tail and
free-form metadata (OS, release, hostname, capture times).

It loads from and saves to an ELF core of the kind QEMU ``dump-guest-memory``
writes and Linux ``/proc/vmcore`` exposes (see :mod:`progdump.elfcore`), so the
writer can run on the host against a QEMU guest or inside a kdump kernel.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from progdump.errors import ProgdumpError

__all__ = [
    "PAGE_SIZE",
    "SnapshotError",
    "MemoryRange",
    "CpuState",
    "Note",
    "Snapshot",
    "parse_vmcoreinfo",
]

PAGE_SIZE = 4096


class SnapshotError(ProgdumpError):
    """A snapshot (or the ELF core it comes from) is unusable; the message says why."""


@dataclass(frozen=True)
class MemoryRange:
    """One contiguous run of guest-physical memory.

    ``buffer`` is a zero-copy view (usually of an mmap) holding ``size`` bytes
    for guest-physical addresses ``[phys_start, phys_start + size)``.
    ``phys_start`` and ``size`` are page aligned (loaders round inwards).
    """

    phys_start: int
    size: int
    buffer: memoryview
    # The mmap ``buffer`` views and where in it the range starts, when known:
    # lets :meth:`Snapshot.release_phys` drop pages already consumed. Only a
    # read-only or shared file mapping may be given (MADV_DONTNEED would
    # discard a private mapping's changes).
    backing: mmap.mmap | None = field(default=None, compare=False, repr=False)
    backing_offset: int = field(default=0, compare=False, repr=False)

    @property
    def phys_end(self) -> int:
        return self.phys_start + self.size


@dataclass
class CpuState:
    """Registers of one CPU at the panic.

    ``regs`` uses lower-case x86-64 names: rax rbx rcx rdx rsi rdi rbp rsp
    r8..r15 rip rflags cs ss ds es fs gs fs_base gs_base, and where known
    cr0 cr2 cr3 cr4 efer (QEMU notes or HMP ``info registers`` carry them;
    NT_PRSTATUS does not). ``prstatus`` keeps the raw NT_PRSTATUS descriptor
    when the CPU came from an ELF core, so it can be written back unchanged.
    """

    index: int
    regs: dict[str, int]
    prstatus: bytes | None = None


@dataclass
class Note:
    """An ELF note: owner name (without NUL), type, descriptor bytes."""

    name: str
    type: int
    desc: bytes


# Notes progdump itself adds to ELF cores it writes (owner "PROGDUMP").
PROGDUMP_NOTE_NAME = "PROGDUMP"
NT_PROGDUMP_CONSOLE = 0x50440001  # desc: console tail bytes
NT_PROGDUMP_METADATA = 0x50440002  # desc: UTF-8 JSON object of metadata
NT_PROGDUMP_CPUREGS = 0x50440003  # desc: UTF-8 JSON list of {index, regs}

MAX_VMCOREINFO = 1 << 20  # QEMU's vmcoreinfo device caps the note below 1 MiB


def parse_vmcoreinfo(raw: bytes) -> dict[str, str]:
    """Parse VMCOREINFO ``KEY=VALUE`` lines; bounded, never raises on junk.

    Lines without ``=`` and keys longer than 128 bytes are ignored; the first
    occurrence of a key wins, as in makedumpfile.
    """
    out: dict[str, str] = {}
    for line in raw[:MAX_VMCOREINFO].split(b"\n"):
        line = line.rstrip(b"\0\r")
        key, sep, value = line.partition(b"=")
        if not sep or not key or len(key) > 128:
            continue
        k = key.decode("ascii", "replace")
        if k not in out:
            out[k] = value.decode("ascii", "replace")
    return out


@dataclass
class Snapshot:
    """Frozen machine state. See the module docstring.

    Ranges are sorted by ``phys_start`` and never overlap (the constructor
    checks). ``metadata`` keys in use: ``os`` (linux|illumos|unknown),
    ``release``, ``hostname``, ``ram_bytes``, ``guest``, ``panic_event_ns``
    (host CLOCK_REALTIME ns of the panic event), ``capture_method``.
    """

    ranges: list[MemoryRange]
    cpus: list[CpuState] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    console_tail: bytes = b""
    metadata: dict[str, object] = field(default_factory=dict)
    # What a loader adjusted or ignored (rounded ranges, clipped overlaps,
    # unreadable notes): shown to the operator, never part of equality.
    load_warnings: list[str] = field(default_factory=list, compare=False)
    # Objects (mmaps, files) to close with the snapshot.
    _owned: list[object] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.ranges.sort(key=lambda r: r.phys_start)
        prev_end = -1
        for r in self.ranges:
            if r.phys_start % PAGE_SIZE or r.size % PAGE_SIZE:
                raise SnapshotError(f"memory range at {r.phys_start:#x} is not page aligned")
            if r.phys_start < prev_end:
                raise SnapshotError(f"memory ranges overlap at {r.phys_start:#x}")
            if len(r.buffer) < r.size:
                raise SnapshotError(f"memory range at {r.phys_start:#x} has a short buffer")
            prev_end = r.phys_end

    # -- notes -------------------------------------------------------------
    def find_note(self, name: str, type_: int | None = None) -> Note | None:
        for n in self.notes:
            if n.name == name and (type_ is None or n.type == type_):
                return n
        return None

    @property
    def vmcoreinfo_raw(self) -> bytes | None:
        n = self.find_note("VMCOREINFO")
        return n.desc if n else None

    @property
    def vmcoreinfo(self) -> dict[str, str] | None:
        raw = self.vmcoreinfo_raw
        return parse_vmcoreinfo(raw) if raw is not None else None

    # -- memory ------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return sum(r.size for r in self.ranges)

    @property
    def total_pages(self) -> int:
        return self.total_bytes // PAGE_SIZE

    def pfn_runs(self) -> Iterator[tuple[int, int]]:
        """Yield ``(first_pfn, npages)`` for every range, in physical order."""
        for r in self.ranges:
            yield r.phys_start // PAGE_SIZE, r.size // PAGE_SIZE

    def _range_for(self, paddr: int) -> MemoryRange | None:
        lo, hi = 0, len(self.ranges)
        while lo < hi:
            mid = (lo + hi) // 2
            r = self.ranges[mid]
            if paddr < r.phys_start:
                hi = mid
            elif paddr >= r.phys_end:
                lo = mid + 1
            else:
                return r
        return None

    def has_phys(self, paddr: int, length: int = 1) -> bool:
        r = self._range_for(paddr)
        return r is not None and paddr + length <= r.phys_end

    def view_phys(self, paddr: int, length: int) -> memoryview:
        """Zero-copy view of ``length`` bytes at ``paddr`` within one range.

        Raises :class:`SnapshotError` when the bytes are not all present.
        """
        r = self._range_for(paddr)
        if r is None or length < 0 or paddr + length > r.phys_end:
            raise SnapshotError(f"physical address {paddr:#x}+{length:#x} not in snapshot")
        off = paddr - r.phys_start
        return r.buffer[off : off + length]

    def read_phys(self, paddr: int, length: int) -> bytes:
        """Read bytes that may span adjacent ranges; raises if any byte is absent."""
        out = bytearray()
        while length > 0:
            r = self._range_for(paddr)
            if r is None:
                raise SnapshotError(f"physical address {paddr:#x} not in snapshot")
            n = min(length, r.phys_end - paddr)
            off = paddr - r.phys_start
            out += r.buffer[off : off + n]
            paddr += n
            length -= n
        return bytes(out)

    def release_phys(self, paddr: int, length: int) -> None:
        """Advise that ``[paddr, paddr + length)`` will not be read again soon.

        Drops those pages from this process's mapping (``MADV_DONTNEED`` on the
        read-only file mapping; the data stays in the page cache and a later
        read faults it back in), so a writer streaming through a large
        snapshot keeps its resident set bounded. Advisory: a no-op where the
        range has no known mmap or the platform lacks madvise.
        """
        end = paddr + length
        # first range that may overlap: binary search (ranges are sorted and disjoint), so a
        # snapshot of thousands of one-page ranges (QEMU paging:true cores) is not quadratic
        lo, hi = 0, len(self.ranges)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.ranges[mid].phys_end <= paddr:
                lo = mid + 1
            else:
                hi = mid
        i = lo
        while i < len(self.ranges) and paddr < end:
            if self.ranges[i].phys_start >= end:
                break
            r = self.ranges[i]
            i += 1
            if r.phys_end <= paddr or r.phys_start >= end or r.backing is None:
                continue
            lo = r.backing_offset + max(paddr, r.phys_start) - r.phys_start
            hi = r.backing_offset + min(end, r.phys_end) - r.phys_start
            lo -= lo % mmap.PAGESIZE  # outward rounding is harmless on a read-only mapping
            hi += -hi % mmap.PAGESIZE
            try:
                r.backing.madvise(mmap.MADV_DONTNEED, lo, min(hi, len(r.backing)) - lo)
            except (AttributeError, OSError, ValueError):
                pass

    def page(self, pfn: int) -> memoryview:
        """Zero-copy view of one page frame."""
        return self.view_phys(pfn * PAGE_SIZE, PAGE_SIZE)

    # -- construction helpers ------------------------------------------------
    @classmethod
    def from_file_ranges(
        cls,
        path: str | os.PathLike[str],
        ranges: list[tuple[int, int, int]],
        **kwargs: object,
    ) -> Snapshot:
        """Map ``path`` read-only and build ranges ``(phys_start, file_offset, size)``.

        This is how the harness wraps QEMU's shared memory-backend file and
        how the ELF loader wraps PT_LOAD segments: one mmap, many views.
        """
        fd = os.open(os.fspath(path), os.O_RDONLY)
        try:
            fsize = os.fstat(fd).st_size
            if fsize == 0:
                raise SnapshotError(f"{path}: empty file")
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        view = memoryview(mm)
        mr: list[MemoryRange] = []

        def release() -> None:
            _release(mr, [view, mm])

        for phys, foff, size in ranges:
            if foff < 0 or size < 0 or foff + size > fsize:
                release()
                raise SnapshotError(f"{path}: range at file offset {foff:#x}+{size:#x} beyond end of file")
            mr.append(MemoryRange(phys, size, view[foff : foff + size], mm, foff))
        owned = list(kwargs.pop("_owned", []))  # type: ignore[call-overload]
        try:
            snap = cls(ranges=mr, _owned=owned + [view, mm], **kwargs)  # type: ignore[arg-type]
        except SnapshotError:
            release()
            raise
        return snap

    @property
    def maps_memory(self) -> bool:
        """True when the ranges are views of a mapping this snapshot owns (closing it unmaps them)."""
        return bool(self.ranges) and bool(self._owned)

    def detach(self, chunk: int = 64 << 20) -> None:
        """Copy the memory into private anonymous memory and let go of the original mapping.

        Why: a snapshot of a live guest maps the guest's RAM file; once the
        guest runs again (a reset) that memory changes under the snapshot. The
        harness detaches every snapshot still in use before it resets the VM.
        The copy is a sealed memfd mapped read-only, so it is still zero-copy
        to read and the kernel may swap it.
        """
        if not self.maps_memory:
            return
        fd = os.memfd_create("progdump-snapshot", os.MFD_CLOEXEC)
        try:
            total = sum(r.size for r in self.ranges)
            os.ftruncate(fd, total)
            off = 0
            layout = []
            for r in self.ranges:
                done = 0
                while done < r.size:  # pwrite from the mapped view: no page faults on the destination side
                    done += os.pwrite(fd, r.buffer[done : done + chunk], off + done)
                layout.append((r.phys_start, off, r.size))
                off += r.size
            mm = mmap.mmap(fd, total, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        view = memoryview(mm)
        new = [MemoryRange(p, size, view[o : o + size], backing=mm, backing_offset=o) for p, o, size in layout]
        _release(self.ranges, self._owned)
        self.ranges = new
        self._owned = [view, mm]

    def close(self) -> None:
        """Release every view and mapping (idempotent; views first, or an mmap refuses to close)."""
        _release(self.ranges, self._owned)
        self._owned = []

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _release(ranges: list[MemoryRange], owned: list[object]) -> None:
    """Release range views, then the owned views, then the mappings.

    Order matters: an mmap refuses to close while a view of it is exported
    (and would keep its file descriptor open). Never raises: a view still
    exported elsewhere stays alive until the GC takes it.
    """
    for r in ranges:
        try:
            r.buffer.release()
        except (BufferError, ValueError):
            pass
    rev = list(reversed(owned))
    for obj in [o for o in rev if isinstance(o, memoryview)] + [o for o in rev if not isinstance(o, memoryview)]:
        try:
            if isinstance(obj, memoryview):
                obj.release()
            else:
                obj.close()  # type: ignore[attr-defined]
        except (BufferError, ValueError, OSError):
            pass
