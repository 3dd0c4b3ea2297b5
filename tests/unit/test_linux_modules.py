"""Module symbols (Elf64_Sym tables as mod_kallsyms holds them) and per-module ORC lookup."""

from __future__ import annotations

import struct

from progdump.layers.linux.kallsyms import Symbol, SymbolTable
from progdump.layers.linux.modules import parse_elf_symbols
from progdump.layers.linux.unwind import OrcSet, OrcTable

MOD = 0xFFFFFFFFC0600000


def elf_syms(entries: list[tuple[str, int, int]]) -> tuple[bytes, bytes, bytes]:
    """(symtab, strtab, typetab) for ``[(name, value, shndx)]``; entry 0 is the null symbol."""
    strtab = b"\0"
    symtab = struct.pack("<IBBHQQ", 0, 0, 0, 0, 0, 0)
    typetab = b"\0"
    for name, value, shndx in entries:
        symtab += struct.pack("<IBBHQQ", len(strtab), 0x12, 0, shndx, value, 0x10)
        strtab += name.encode() + b"\0"
        typetab += b"t"
    return symtab, strtab, typetab


def test_parse_elf_symbols_skips_null_and_undefined() -> None:
    syms = parse_elf_symbols(*elf_syms([("probe", MOD + 0x10, 2), ("printk", 0, 0), ("remove", MOD + 0x80, 2)]))
    assert [(s.name, s.address, s.type) for s in syms] == [("probe", MOD + 0x10, "t"), ("remove", MOD + 0x80, "t")]


def test_module_symbols_format_with_module_name_and_end_at_module_end() -> None:
    st = SymbolTable([Symbol("_stext", 0xFFFFFFFF81000000, "T"), Symbol("_etext", 0xFFFFFFFF82000000, "T")])
    syms = parse_elf_symbols(*elf_syms([("probe", MOD + 0x10, 2), ("remove", MOD + 0x80, 2), ("far", MOD + 0x9000, 2)]))
    st.add_modules([("virtio_blk", syms, MOD, 0x1000, 0x800)])
    assert st.format(MOD + 0x15) == "probe+0x5/0x70 [virtio_blk]"
    assert st.format(MOD + 0x90) == "remove+0x10/0xf80 [virtio_blk]"  # last symbol ends with the module
    assert st.format(MOD + 0x1000) == hex(MOD + 0x1000)  # past the module: unknown
    assert st.is_text(MOD + 0x10) and not st.is_text(MOD + 0x900)
    assert st.address("probe") is None  # by-name lookup stays vmlinux-only


def test_orc_set_uses_the_module_table_inside_module_text() -> None:
    def table(base: int, ips: list[int], sp_off: int) -> OrcTable:
        rel = b"".join(struct.pack("<i", ip - (base + 4 * i)) for i, ip in enumerate(ips))
        return OrcTable(base, rel, struct.pack("<hhH", sp_off, 0, 5) * len(ips))

    s = OrcSet(table(0xFFFFFFFF81800000, [0xFFFFFFFF81000000], 8))
    s.add(MOD, MOD + 0x1000, table(MOD + 0x2000, [MOD], 24))
    assert s.find(MOD + 0x10)[0] == 24
    assert s.find(0xFFFFFFFF81000010)[0] == 8
    assert len(s) == 2
