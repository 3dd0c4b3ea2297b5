"""Kernel virtual to guest physical address translation for x86-64 Linux.

Why: a frozen guest is a bag of physical pages; every kernel structure is
found by virtual address. Three ways in, cheapest first:

* kernel image (``__START_KERNEL_map`` + n): ``pa = va - __START_KERNEL_map +
  phys_base`` (``NUMBER(phys_base)`` from VMCOREINFO, KASLR included);
* the direct map (``page_offset_base`` + pa), once the caller knows
  ``page_offset_base`` (it is a kernel variable, read through the image);
* anything else (vmalloc'd stacks, vmemmap, modules): a 4- or 5-level page
  table walk from ``init_top_pgt`` (or a CPU's CR3), 1 GiB and 2 MiB pages
  included.

Every failure is a :class:`FaultError` naming the address: callers decide
whether that degrades a layer or just one task.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from progdump.errors import ProgdumpError
from progdump.snapshot import Snapshot, SnapshotError

__all__ = ["FaultError", "KernelMemory", "START_KERNEL_MAP"]

START_KERNEL_MAP = 0xFFFFFFFF80000000
KERNEL_IMAGE_MAX = 1 << 30  # KERNEL_IMAGE_SIZE with KASLR: 1 GiB
U64 = (1 << 64) - 1
PTE_PRESENT = 1
PTE_PSE = 1 << 7
PTE_ADDR = 0x000FFFFFFFFFF000
PAGE = 4096
_WALK_CACHE_MAX = 1 << 16


class FaultError(ProgdumpError):
    """A virtual address does not translate, or its page is not in the snapshot."""


class KernelMemory:
    """Reads kernel virtual memory out of a :class:`Snapshot`.

    ``pgd`` is the physical address of the top page table (``init_top_pgt``
    translated through the image mapping); ``levels`` is 4 or 5
    (``NUMBER(pgtable_l5_enabled)``). ``sme_mask`` is cleared from entries.
    """

    def __init__(
        self,
        snapshot: Snapshot,
        phys_base: int,
        pgd: int,
        levels: int = 4,
        sme_mask: int = 0,
        image_size: int = KERNEL_IMAGE_MAX,
    ) -> None:
        if levels not in (4, 5):
            raise ValueError(f"page table levels {levels} (want 4 or 5)")
        self.snapshot = snapshot
        self.phys_base = phys_base & U64
        self.pgd = pgd
        self.levels = levels
        self.addr_mask = PTE_ADDR & ~(sme_mask & U64)
        self.image_size = image_size
        self.page_offset_base: int | None = None
        self.direct_map_size = max((r.phys_end for r in snapshot.ranges), default=0)
        self._walk_cache: dict[int, tuple[int, int]] = {}

    # -- translation --------------------------------------------------------
    def image_to_phys(self, va: int) -> int | None:
        if START_KERNEL_MAP <= va < START_KERNEL_MAP + self.image_size:
            return (va - START_KERNEL_MAP + self.phys_base) & U64
        return None

    def _entry(self, table: int, index: int) -> int:
        try:
            return struct.unpack("<Q", self.snapshot.view_phys(table + index * 8, 8))[0]
        except SnapshotError:
            raise FaultError(f"page table at {table:#x} not in snapshot") from None

    def walk(self, va: int) -> tuple[int, int]:
        """Page-table walk: ``(pa, bytes left in that page)`` or :class:`FaultError`."""
        key = va >> 12
        hit = self._walk_cache.get(key)
        if hit is not None:
            base, size = hit
            off = va - (key << 12)
            return base + off, (PAGE - off) if size == PAGE else size - ((va) & (size - 1))
        # canonical addresses only: bits above the top level's sign bit copy it (a wild pointer
        # such as LIST_POISON1 must fault, not alias a real mapping through the low 48 bits)
        top = 56 if self.levels == 5 else 47
        if not (va >> top == 0 or va >> top == (1 << (64 - top)) - 1):
            raise FaultError(f"virtual address {va:#x} is not canonical")
        table = self.pgd
        shifts = (48, 39, 30, 21, 12) if self.levels == 5 else (39, 30, 21, 12)
        for depth, shift in enumerate(shifts):
            e = self._entry(table, (va >> shift) & 0x1FF)
            if not e & PTE_PRESENT:
                raise FaultError(f"virtual address {va:#x} not mapped (level {len(shifts) - depth})")
            addr = e & self.addr_mask
            if shift in (30, 21) and e & PTE_PSE:
                size = 1 << shift
                base = (addr & ~(size - 1)) + (va & (size - 1) & ~0xFFF)
                break
            if shift == 12:
                size = PAGE
                base = addr
                break
            table = addr
        if len(self._walk_cache) >= _WALK_CACHE_MAX:
            self._walk_cache.clear()
        self._walk_cache[key] = (base, size)
        off = va & 0xFFF
        return base + off, (PAGE - off) if size == PAGE else size - (va & (size - 1))

    def to_phys(self, va: int) -> tuple[int, int]:
        """``(pa, contiguous bytes available from pa)`` for a kernel virtual address."""
        pa = self.image_to_phys(va)
        if pa is not None:
            return pa, START_KERNEL_MAP + self.image_size - va
        pob = self.page_offset_base
        if pob is not None and pob <= va < pob + self.direct_map_size:
            return va - pob, pob + self.direct_map_size - va
        return self.walk(va)

    def chunks(self, va: int, length: int) -> Iterator[tuple[int, int, int]]:
        """Yield ``(va, pa, n)``: physically contiguous pieces of ``[va, va+length)``."""
        while length > 0:
            pa, avail = self.to_phys(va)
            n = min(length, avail)
            yield va, pa, n
            va += n
            length -= n

    # -- reading ------------------------------------------------------------
    def read(self, va: int, length: int) -> bytes:
        if length < 0 or length > 1 << 30:
            raise FaultError(f"read of {length} bytes at {va:#x} refused")
        if length == 0:
            return b""
        va &= U64
        pa, avail = self.to_phys(va)
        if avail >= length:  # one physically contiguous piece (the kernel image, the direct map): one copy
            try:
                return self.snapshot.read_phys(pa, length)
            except SnapshotError:
                raise FaultError(f"virtual address {va:#x} (physical {pa:#x}) not in snapshot") from None
        out = bytearray()
        for cva, pa, n in self.chunks(va, length):
            try:
                out += self.snapshot.read_phys(pa, n)
            except SnapshotError:
                raise FaultError(f"virtual address {cva:#x} (physical {pa:#x}) not in snapshot") from None
        return bytes(out)

    def u64(self, va: int) -> int:
        return struct.unpack("<Q", self.read(va, 8))[0]

    def s64(self, va: int) -> int:
        return struct.unpack("<q", self.read(va, 8))[0]

    def u32(self, va: int) -> int:
        return struct.unpack("<I", self.read(va, 4))[0]

    def s32(self, va: int) -> int:
        return struct.unpack("<i", self.read(va, 4))[0]

    def u16(self, va: int) -> int:
        return struct.unpack("<H", self.read(va, 2))[0]

    def cstring(self, va: int, maxlen: int = 256) -> str:
        """NUL-terminated string, bounded; stops at the first unreadable page."""
        out = bytearray()
        while len(out) < maxlen:
            n = min(maxlen - len(out), PAGE - (va & 0xFFF))
            try:
                chunk = self.read(va, n)
            except FaultError:
                break
            i = chunk.find(b"\0")
            if i >= 0:
                out += chunk[:i]
                break
            out += chunk
            va += n
        return out.decode("utf-8", "replace")

    def readable(self, va: int, length: int = 1) -> bool:
        try:
            for _, pa, n in self.chunks(va, length):
                if not self.snapshot.has_phys(pa, n):
                    return False
            return True
        except FaultError:
            return False
