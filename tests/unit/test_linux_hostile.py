"""Parsers of guest memory on arbitrary bytes: their own error or a result, never a crash.

Property tests (hypothesis) over random and mutated inputs built on the
valid structures of the other test files.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_linux_btf import build as build_btf
from test_linux_image import Image
from test_linux_kallsyms import BASE, SYMS, build_tables
from test_linux_printk import COUNT_BITS, SIZE_BITS, build_ring, layout

from progdump.layers.linux.btf import Btf, BtfError
from progdump.layers.linux.kallsyms import KallsymsError, SymbolTable, decode_kallsyms
from progdump.layers.linux.pages import PageFlags, classify_struct_pages
from progdump.layers.linux.printk import parse_ring
from progdump.layers.linux.unwind import OrcTable, orc_unwind, stack_scan
from progdump.layers.linux.vmcoreinfo import Vmcoreinfo

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        if b:
            b[pos % len(b)] = val
    return bytes(b)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=40)


@SETTINGS
@given(EDITS)
def test_btf_mutated(edits: list[tuple[int, int]]) -> None:
    blob, _ = build_btf()
    try:
        btf = Btf(mutate(blob, edits))
        for path in ("tasks", "tasks.prev", "b", "sp", "regs"):
            try:
                off, tid = btf.member("task_struct", path)
                btf.sizeof(tid)
            except BtfError:
                pass
        btf.enum_values("zone_stat_item")
    except BtfError:
        pass


@SETTINGS
@given(st.binary(max_size=4096))
def test_btf_random(blob: bytes) -> None:
    try:
        Btf(struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(blob), len(blob), 0) + blob)
    except BtfError:
        pass


@SETTINGS
@given(EDITS, EDITS)
def test_kallsyms_mutated(names_edits: list[tuple[int, int]], table_edits: list[tuple[int, int]]) -> None:
    num, names, table, index, offsets = build_tables(SYMS, BASE)
    try:
        syms = decode_kallsyms(num, mutate(names, names_edits), mutate(table, table_edits), index, offsets, BASE)
        SymbolTable(syms).format(BASE + 0x116)
    except KallsymsError:
        pass


@SETTINGS
@given(EDITS, EDITS, EDITS, st.integers(0, 1 << 64 - 1), st.integers(0, 1 << 64 - 1))
def test_printk_ring_mutated(d_edits, i_edits, t_edits, head: int, tail: int) -> None:  # type: ignore[no-untyped-def]
    descs, infos, data, _, _ = build_ring([b"one", b"two two", b"three three three"])
    recs, notes = parse_ring(
        layout(),
        COUNT_BITS,
        SIZE_BITS,
        mutate(descs, d_edits),
        mutate(infos, i_edits),
        mutate(data, t_edits),
        head & ((1 << 62) - 1),
        tail & ((1 << 62) - 1),
    )
    assert len(recs) <= 1 << COUNT_BITS


@SETTINGS
@given(st.binary(min_size=64 * 4, max_size=64 * 64).map(lambda b: b[: len(b) // 64 * 64]))
def test_struct_pages_random(raw: bytes) -> None:
    np = __import__("numpy")
    vi = Vmcoreinfo(
        b"SIZE(page)=64\nOFFSET(page.flags)=0\nOFFSET(page.mapping)=24\nOFFSET(page._mapcount)=48\n"
        b"OFFSET(page.private)=40\nOFFSET(page.compound_head)=8\nNUMBER(PG_lru)=4\nNUMBER(PG_slab)=9\n"
        b"NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)=-129\nLENGTH(zone.free_area)=11\n"
    )
    cls, order, head = classify_struct_pages(np, raw, PageFlags(vi))
    assert len(cls) == len(raw) // 64 and int(order.max(initial=-1)) <= 10


@SETTINGS
@given(st.binary(min_size=8, max_size=2048), st.binary(min_size=6 * 8, max_size=6 * 64), st.binary(max_size=4096))
def test_unwind_on_random_tables_and_stack(ip_table: bytes, entries: bytes, stack: bytes) -> None:
    img = Image()
    pa = img.alloc_page(2)
    img.put(pa, stack)
    km = img.kmem()
    syms = SymbolTable([])
    n = min(len(ip_table) // 4, len(entries) // 6)
    orc = OrcTable(0xFFFFFFFF81000000, ip_table[: 4 * n], entries)
    sp = 0xFFFF888000000000 + pa
    frames, why = orc_unwind(km, syms, orc, 0xFFFFFFFF81000010, sp, sp + 64)
    assert len(frames) <= 64 and why
    frames, why = stack_scan(km, syms, sp, sp + 8192)
    assert why
