"""ORC unwinding and stack scanning over a hand-built text, ORC table and stack."""

from __future__ import annotations

import struct

from test_linux_image import Image

from progdump.layers.linux.kallsyms import Symbol, SymbolTable
from progdump.layers.linux.unwind import OrcTable, is_call_preceded, orc_unwind, stack_scan

TEXT = 0xFFFFFFFF81000000


def orc_entry(sp_off: int, sp_reg: int, typ: int = 0, end: int = 0, bp_off: int = 0, bp_reg: int = 0) -> bytes:
    """struct orc_entry (6.1): s16 sp_offset, s16 bp_offset, sp_reg:4 bp_reg:4 type:2 end:1."""
    return struct.pack("<hhH", sp_off, bp_off, sp_reg | bp_reg << 4 | typ << 8 | end << 10)


def setup():
    img = Image()
    text_va = img.image_alloc(0x1000, align=0x1000)
    assert text_va == TEXT
    pa = img.image_pa(text_va)
    # A at +0x100, B at +0x200 (calls A at +0x10: e8 rel32 ends at +0x15), C at +0x300 (calls B)
    img.put(pa + 0x210, b"\xe8\0\0\0\0")
    img.put(pa + 0x300, b"\xe8\0\0\0\0")
    syms = SymbolTable(
        [
            Symbol("_stext", TEXT, "T"),
            Symbol("A", TEXT + 0x100, "t"),
            Symbol("B", TEXT + 0x200, "t"),
            Symbol("C", TEXT + 0x300, "t"),
            Symbol("_etext", TEXT + 0x400, "T"),
        ]
    )
    ips = [TEXT + 0x100, TEXT + 0x200, TEXT + 0x300]
    table_va = img.image_alloc(4 * len(ips), align=4)
    rel = b"".join(struct.pack("<i", ip - (table_va + 4 * i)) for i, ip in enumerate(ips))
    entries = orc_entry(16, 5) + orc_entry(8, 5) + orc_entry(0, 0, end=1)  # A: sp+16, B: sp+8, C: end
    orc = OrcTable(table_va, rel, entries)
    stack_pa = img.alloc_page(4)
    stack_va = 0xFFFF888000000000 + stack_pa  # direct map
    sp = stack_va + 0x3F00
    img.q(stack_pa + 0x3F00 + 8, TEXT + 0x215)  # A's frame: return into B
    img.q(stack_pa + 0x3F00 + 16, TEXT + 0x305)  # B's frame: return into C
    img.q(stack_pa + 0x3F00 + 24, TEXT + 0x150)  # a text address not after a call: data
    return img, syms, orc, sp, stack_va


def test_orc_unwind_reaches_end_of_stack() -> None:
    img, syms, orc, sp, _ = setup()
    frames, why = orc_unwind(img.kmem(), syms, orc, TEXT + 0x110, sp, 0)
    assert [f.symbol for f in frames] == ["A+0x10/0x100", "B+0x15/0x100", "C+0x5/0x100"]
    assert all(f.method == "orc" and f.reliable for f in frames)
    assert why == "end of stack (ORC)"


def test_orc_unwind_stops_with_reason_outside_tables() -> None:
    img, syms, orc, sp, _ = setup()
    frames, why = orc_unwind(img.kmem(), syms, orc, 0xFFFFFFFFC0001000, sp, 0)
    assert len(frames) == 1 and "no ORC entry" in why


def test_orc_unwind_stops_on_unreadable_stack() -> None:
    img, syms, orc, _, _ = setup()
    frames, why = orc_unwind(img.kmem(), syms, orc, TEXT + 0x110, 0xFFFFC90000000000, 0)
    assert "unreadable" in why


def test_stack_scan_labels_guesses() -> None:
    img, syms, _, sp, stack_va = setup()
    km = img.kmem()
    assert is_call_preceded(km, TEXT + 0x215) and not is_call_preceded(km, TEXT + 0x150)
    frames, why = stack_scan(km, syms, sp, stack_va + 0x4000)
    assert [f.symbol for f in frames] == ["B+0x15/0x100", "C+0x5/0x100"]
    assert all(f.method == "stack scan" and not f.reliable and "may be stale" in f.note for f in frames)
    assert why == "top of stack"


def test_orc_table_without_numpy(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import sys

    img, syms, orc, sp, _ = setup()
    ip_va = next(iter(orc.ips))  # any; rebuild the same table with numpy hidden
    monkeypatch.setitem(sys.modules, "numpy", None)
    ips = [int(x) for x in orc.ips]
    table_va = 0xFFFFFFFF81800000
    rel = b"".join(struct.pack("<i", ip - (table_va + 4 * i)) for i, ip in enumerate(ips))
    plain = OrcTable(table_va, rel, orc.entries)
    assert plain._np is None and [int(x) for x in plain.ips] == ips and ip_va == ips[0]
    frames, why = orc_unwind(img.kmem(), syms, plain, TEXT + 0x110, sp, 0)
    assert [f.symbol for f in frames] == ["A+0x10/0x100", "B+0x15/0x100", "C+0x5/0x100"]


def test_stacks_of_groups_stack_pointers_by_stack_in_visit_order() -> None:
    from progdump.layers.linux.unwind import stacks_of

    nmi, irq, task = 0xFFFFFE000000DE30, 0xFFFFC90000003ED0, 0xFFFFC900005DFD90
    assert stacks_of([nmi, nmi + 0x40, irq, irq + 8, task, 0x7FFF0000]) == [
        (nmi, 0xFFFFFE0000010000),
        (irq, 0xFFFFC90000004000),
        (task, 0xFFFFC900005E0000),
    ]
