"""Small x86-64 Linux memory images built from documented layouts, and translation tests.

The builder (:class:`Image`) is shared by the other ``test_linux_*`` files: a
physical memory bytearray wrapped as a Snapshot, a kernel image mapping
(``__START_KERNEL_map`` + ``phys_base``), 4-level page tables built entry by
entry (4 KiB, 2 MiB and 1 GiB pages) and a VMCOREINFO text. Nothing here is a
recorded blob: every byte is placed from the layouts the kernel documents.
"""

from __future__ import annotations

import struct

import pytest

from progdump.layers.linux.translate import START_KERNEL_MAP, FaultError, KernelMemory
from progdump.snapshot import MemoryRange, Snapshot

PAGE = 4096
P, RW, PS = 1, 2, 0x80
PAGE_OFFSET = 0xFFFF888000000000
KTEXT_PHYS = 0x200000  # where the "kernel image" sits physically
KTEXT_VA = 0xFFFFFFFF81000000
PHYS_BASE = KTEXT_PHYS - (KTEXT_VA - START_KERNEL_MAP)  # negative, like a KASLR'd kernel


class Image:
    """Physical memory with a bump allocator, page tables and helpers."""

    def __init__(self, size: int = 16 << 20) -> None:
        self.mem = bytearray(size)
        self.next = 0x100000 + 0x800000  # allocations above the kernel image
        self.image_next = KTEXT_PHYS
        self.pgd = self.alloc_page()
        self.vmcoreinfo: dict[str, str] = {}

    # -- allocation --------------------------------------------------------------
    def alloc_page(self, n: int = 1, align: int = PAGE) -> int:
        self.next = (self.next + align - 1) & ~(align - 1)
        pa = self.next
        self.next += n * PAGE
        assert self.next <= len(self.mem)
        return pa

    def image_alloc(self, size: int, align: int = 8) -> int:
        """Bytes inside the kernel image: returns the virtual address."""
        self.image_next = (self.image_next + align - 1) & ~(align - 1)
        pa = self.image_next
        self.image_next += size
        assert self.image_next <= 0x100000 + 0x800000
        return pa - PHYS_BASE + START_KERNEL_MAP

    def image_pa(self, va: int) -> int:
        return va - START_KERNEL_MAP + PHYS_BASE

    # -- bytes ------------------------------------------------------------------
    def put(self, pa: int, data: bytes) -> None:
        self.mem[pa : pa + len(data)] = data

    def put_va(self, va: int, data: bytes) -> None:
        """Write through the image mapping, the direct map or the page tables."""
        km = self.kmem()
        for _cva, pa, n in km.chunks(va, len(data)):
            off = _cva - va
            self.put(pa, data[off : off + n])

    def q(self, pa: int, v: int) -> None:
        self.put(pa, struct.pack("<Q", v & (1 << 64) - 1))

    # -- page tables ------------------------------------------------------------
    def _table(self, table: int, index: int) -> int:
        e = struct.unpack_from("<Q", self.mem, table + 8 * index)[0]
        if not e & P:
            new = self.alloc_page()
            self.q(table + 8 * index, new | P | RW)
            return new
        return e & 0x000FFFFFFFFFF000

    def map(self, va: int, pa: int, size: int = PAGE) -> None:
        """Map one page of ``size`` (4 KiB, 2 MiB or 1 GiB)."""
        t = self.pgd
        for shift in (39, 30, 21, 12):
            idx = (va >> shift) & 0x1FF
            if 1 << shift == size:
                self.q(t + 8 * idx, pa | P | RW | (PS if size > PAGE else 0))
                return
            t = self._table(t, idx)
        raise AssertionError("bad size")

    # -- wrapping -----------------------------------------------------------------
    def snapshot(self, **kw: object) -> Snapshot:
        return Snapshot(ranges=[MemoryRange(0, len(self.mem), memoryview(self.mem))], **kw)  # type: ignore[arg-type]

    def kmem(self) -> KernelMemory:
        km = KernelMemory(self.snapshot(), PHYS_BASE, self.pgd)
        km.page_offset_base = PAGE_OFFSET
        return km


def test_image_mapping_uses_phys_base() -> None:
    img = Image()
    va = img.image_alloc(16)
    img.put(img.image_pa(va), b"kernel image!!!\0")
    km = img.kmem()
    assert km.image_to_phys(va) == KTEXT_PHYS
    assert km.cstring(va) == "kernel image!!!"


def test_direct_map() -> None:
    img = Image()
    img.put(0x5000, b"direct")
    assert img.kmem().read(PAGE_OFFSET + 0x5000, 6) == b"direct"


def test_page_walk_4k_2m_1g_and_page_crossing() -> None:
    img = Image()
    vmalloc = 0xFFFFC90000000000
    a, b = img.alloc_page(), img.alloc_page()
    img.map(vmalloc, b)  # deliberately out of physical order
    img.map(vmalloc + PAGE, a)
    img.put(b + PAGE - 3, b"abc")
    img.put(a, b"def")
    km = img.kmem()
    assert km.read(vmalloc + PAGE - 3, 6) == b"abcdef"
    huge = img.alloc_page(512, align=2 << 20)
    img.map(0xFFFFEA0000000000, huge, 2 << 20)
    img.put(huge + 0x12345, b"2M")
    assert img.kmem().read(0xFFFFEA0000012345, 2) == b"2M"
    img.map(0xFFFFEA0040000000, 0, 1 << 30)
    img.put(0x3000, b"1G")
    assert img.kmem().read(0xFFFFEA0040003000, 2) == b"1G"


def test_unmapped_and_absent_addresses_raise_fault() -> None:
    img = Image()
    km = img.kmem()
    with pytest.raises(FaultError, match="not mapped"):
        km.read(0xFFFFC90000100000, 8)
    img.map(0xFFFFC90000200000, 0x7FFF0000000)  # maps past the snapshot's end
    with pytest.raises(FaultError, match="not in snapshot"):
        img.kmem().read(0xFFFFC90000200000, 8)
    assert not km.readable(0xFFFFC90000100000)


def test_five_level_walk() -> None:
    img = Image()
    # a 5-level walk uses bits 48..56 first: build one extra level by hand
    p4d = img.alloc_page()
    top = img.alloc_page()
    va = 0xFF11000000000000 | (5 << 39)
    img.q(top + 8 * ((va >> 48) & 0x1FF), p4d | P)
    # reuse Image.map on a fresh 4-level table rooted at p4d
    saved = img.pgd
    img.pgd = p4d
    pa = img.alloc_page()
    img.map(va, pa)
    img.pgd = saved
    img.put(pa + 8, b"five")
    km = KernelMemory(img.snapshot(), PHYS_BASE, top, levels=5)
    assert km.read(va + 8, 4) == b"five"
