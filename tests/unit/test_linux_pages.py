"""Page classes from a hand-built vmemmap of struct pages (6.1 x86-64 layout)."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest
from test_linux_image import PAGE, PAGE_OFFSET, Image

from progdump.layers.base import PageClass
from progdump.layers.linux.kallsyms import Symbol, SymbolTable
from progdump.layers.linux.pages import PageFlags, build_page_classes, classify_struct_pages, vmemmap_from_mem_section
from progdump.layers.linux.vmcoreinfo import Vmcoreinfo

VI = b"""SIZE(page)=64
OFFSET(page.flags)=0
OFFSET(page._refcount)=52
OFFSET(page.mapping)=24
OFFSET(page.lru)=8
OFFSET(page._mapcount)=48
OFFSET(page.private)=40
OFFSET(page.compound_head)=8
LENGTH(zone.free_area)=11
NUMBER(PG_lru)=4
NUMBER(PG_slab)=9
NUMBER(PG_head_mask)=65536
NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)=-129
"""
VMEMMAP = 0xFFFFEA0000000000


def page(flags: int = 0, mapping: int = 0, mapcount: int = -1, private: int = 0, head: int = 0) -> bytes:
    p = bytearray(64)
    struct.pack_into("<QQQQ", p, 0, flags, head, 0, mapping)
    struct.pack_into("<Q", p, 40, private)
    struct.pack_into("<i", p, 48, mapcount)
    return bytes(p)


def test_classify_each_kind() -> None:
    np = __import__("numpy")
    pf = PageFlags(Vmcoreinfo(VI))
    raw = b"".join(
        [
            page(),  # kernel
            page(flags=1 << 9, mapping=0xFFFF888000001000),  # slab: slab_cache overlays mapping -> kernel
            page(flags=1 << 4, mapping=0xFFFF888000002001),  # anon on LRU -> user
            page(flags=1 << 4, mapping=0xFFFF888000003000),  # file on LRU -> cache
            page(mapping=0xFFFF888000003000),  # file not yet on LRU -> cache
            page(mapping=0xFFFF888000003002),  # movable_ops (not anon) -> kernel
            page(mapcount=-129, private=1),  # buddy head, order 1
            page(head=VMEMMAP + 64 * 2 + 1),  # tail of the anon page
        ]
    )
    cls, order, head = classify_struct_pages(np, raw, pf)
    K, C, U, F = (int(x) for x in (PageClass.KERNEL, PageClass.CACHE, PageClass.USER, PageClass.FREE))
    assert list(cls) == [K, K, U, C, C, K, F, K]
    assert list(order) == [-1, -1, -1, -1, -1, -1, 1, -1]
    assert int(head[7]) == VMEMMAP + 64 * 2


def test_build_page_classes_over_vmemmap() -> None:
    img = Image(size=16 << 20)
    npages = len(img.mem) // PAGE  # 4096 pfns -> 256 KiB of struct pages = 64 vmemmap pages
    pages = [page() for _ in range(npages)]
    pages[3000] = page(mapcount=-129, private=3)  # buddy block of 8: 3000..3007
    pages[3100] = page(flags=1 << 4, mapping=0xFFFF888000000001)  # anon head
    pages[3101] = page(head=VMEMMAP + 64 * 3100 + 1)  # its tail
    pages[3200] = page(flags=1 << 4, mapping=0xFFFF888000004000)  # page cache
    raw = b"".join(pages)
    # map vmemmap page by page, physically scattered in two halves (exercises chunking)
    backing = [img.alloc_page() for _ in range(len(raw) // PAGE)]
    for i, pa in enumerate(backing):
        img.map(VMEMMAP + i * PAGE, pa)
        img.put(pa, raw[i * PAGE : (i + 1) * PAGE])
    vb = img.image_alloc(8)
    img.q(img.image_pa(vb), VMEMMAP)
    k = SimpleNamespace(
        vi=Vmcoreinfo(VI), snapshot=img.snapshot(), mem=img.kmem(), syms=SymbolTable([Symbol("vmemmap_base", vb, "D")])
    )
    pcm, notes, timings = build_page_classes(k)  # type: ignore[arg-type]
    assert notes == []
    # the same classes with vmemmap given (found from mem_section, no symbol): byte for byte
    pcm2, notes2, _ = build_page_classes(k, VMEMMAP)  # type: ignore[arg-type]
    assert notes2 == [] and bytes(pcm2.classes) == bytes(pcm.classes)
    # an all-zero kernel page stays KERNEL: the writer stores it as a zero marker in layer 2
    assert [pcm.get(p) for p in range(3000, 3009)] == [PageClass.FREE] * 8 + [PageClass.KERNEL]
    assert pcm.get(3100) == pcm.get(3101) == PageClass.USER
    assert pcm.get(3200) == PageClass.CACHE
    assert pcm.get(backing[0] // PAGE) == PageClass.KERNEL
    counts = pcm.counts()
    assert counts["free"] == 8 and counts["user"] == 2 and counts["cache"] == 1
    assert sum(counts.values()) == npages and counts["zero"] == 0


MS_VI = b"SYMBOL(mem_section)=%x\nLENGTH(mem_section)=4\nSIZE(mem_section)=16\nOFFSET(mem_section.section_mem_map)=0\n"


def _mem_section(img: Image, entries: list[int], root_index: int = 1) -> Vmcoreinfo:
    """A SPARSEMEM_EXTREME table as 6.1 lays it out: roots (direct map) -> pages of 16-byte sections."""
    roots = img.alloc_page()
    table = img.alloc_page()
    img.q(roots + 8 * root_index, PAGE_OFFSET + table)  # roots before it are empty (NULL)
    for i, smm in enumerate(entries):
        img.q(table + 16 * i, smm)
    return Vmcoreinfo(MS_VI % (PAGE_OFFSET + roots))


def test_vmemmap_from_mem_section() -> None:
    # encoded mem_map = vmemmap (mem_map - start pfn) with flag bits PRESENT|HAS_MEM_MAP|ONLINE|EARLY
    img = Image()
    vi = _mem_section(img, [0, VMEMMAP | 0xF, VMEMMAP | 0x3, 0x1])  # section 3: present, no mem_map
    assert vmemmap_from_mem_section(img.kmem(), vi) == VMEMMAP


def test_vmemmap_from_mem_section_refuses_what_does_not_add_up() -> None:
    cases = [
        ([0, 1], "no present section"),
        ([VMEMMAP | 3, (VMEMMAP + (1 << 30)) | 3], "disagree"),
        ([0x12345000 | 3], "not a kernel address"),
    ]
    for entries, why in cases:
        img = Image()
        vi = _mem_section(img, entries)
        with pytest.raises(ValueError, match=why):
            vmemmap_from_mem_section(img.kmem(), vi)
    bad = Vmcoreinfo(b"SYMBOL(mem_section)=ffff888000001000\nLENGTH(mem_section)=1048576\nSIZE(mem_section)=16\n"
                     b"OFFSET(mem_section.section_mem_map)=0\n")  # fmt: skip
    with pytest.raises(ValueError, match="layout unusable"):
        vmemmap_from_mem_section(Image().kmem(), bad)


def test_tails_and_free_blocks_across_small_windows(monkeypatch) -> None:
    """Compound pages and buddy blocks straddling the windows the classifier works in (set to 7 pages).

    Expected classes written out by hand from the struct pages planted here.
    """
    from progdump.layers.linux import pages as pages_mod

    monkeypatch.setattr(pages_mod, "COVER_WINDOW", 7)
    img = Image(size=16 << 20)
    npages = len(img.mem) // PAGE
    pages = [page() for _ in range(npages)]
    cache = 0xFFFF888000004000
    pages[1000] = page(flags=1 << 4, mapping=cache)  # page-cache head of an order-4 compound page
    for t in range(1001, 1016):
        pages[t] = page(head=VMEMMAP + 64 * 1000 + 1)  # its 15 tails: cross windows at 1001, 1008, 1015
    pages[1016] = page(flags=1 << 4, mapping=0xFFFF888000000001)  # anon head, order 1
    pages[1017] = page(head=VMEMMAP + 64 * 1016 + 1)  # its tail, right after the other run
    pages[1020] = page(head=VMEMMAP - 64 + 1)  # a tail pointing below vmemmap: left as it was (kernel)
    pages[2000] = page(mapcount=-129, private=4)  # free block 2000..2015
    pages[2005] = page(head=VMEMMAP + 64 * 1016 + 1)  # stale tail inside the free block: stays free
    raw = b"".join(pages)
    backing = [img.alloc_page() for _ in range(len(raw) // PAGE)]
    for i, pa in enumerate(backing):
        img.map(VMEMMAP + i * PAGE, pa)
        img.put(pa, raw[i * PAGE : (i + 1) * PAGE])
    k = SimpleNamespace(vi=Vmcoreinfo(VI), snapshot=img.snapshot(), mem=img.kmem())
    pcm, notes, _ = build_page_classes(k, VMEMMAP)  # type: ignore[arg-type]
    assert notes == ["1 tail pages point at heads outside memory: left as they were"]
    assert [pcm.get(p) for p in range(1000, 1016)] == [PageClass.CACHE] * 16
    assert [pcm.get(p) for p in (1016, 1017, 1018, 1020)] == [PageClass.USER] * 2 + [PageClass.KERNEL] * 2
    assert [pcm.get(p) for p in range(1999, 2017)] == [PageClass.KERNEL] + [PageClass.FREE] * 16 + [PageClass.KERNEL]
    counts = pcm.counts()
    assert counts["cache"] == 16 and counts["user"] == 2 and counts["free"] == 16
