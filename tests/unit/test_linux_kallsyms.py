"""kallsyms decoding against tables built as scripts/kallsyms.c lays them out."""

from __future__ import annotations

import struct

import pytest

from progdump.layers.linux.kallsyms import KallsymsError, SymbolTable, decode_kallsyms, load_kallsyms
from progdump.layers.linux.vmcoreinfo import Vmcoreinfo

MULTI = {0: b"crash", 1: b"sys", 2: b"_handle_", 3: b"rq"}


def build_tables(symbols: list[tuple[str, str, int]], relative_base: int):
    """(num, names, token_table, token_index, offsets) for ``[(type, name, addr)]``.

    Tokens: a few multi-character ones at unprintable indices, every other
    index the single byte itself; names are encoded greedily. Addresses use
    the absolute-percpu encoding (x86-64 SMP): kernel addresses as
    ``-(addr - base) - 1``, small per-cpu offsets as themselves.
    """
    tokens = [MULTI.get(i, bytes([i])) for i in range(256)]
    table = b""
    index = []
    for t in tokens:
        index.append(len(table))
        table += t + b"\0"
    names = b""
    offsets = b""
    for typ, name, addr in symbols:
        full = (typ + name).encode()
        enc = []
        i = 0
        while i < len(full):
            for k, t in MULTI.items():
                if full.startswith(t, i):
                    enc.append(k)
                    i += len(t)
                    break
            else:
                enc.append(full[i])
                i += 1
        n = len(enc)
        names += (bytes([n]) if n < 0x80 else bytes([(n & 0x7F) | 0x80, n >> 7])) + bytes(enc)
        off = addr if addr < 1 << 31 else -(addr - relative_base) - 1
        offsets += struct.pack("<i", off)
    return len(symbols), names, table, struct.pack("<256H", *index), offsets


BASE = 0xFFFFFFFF81000000
SYMS = [
    ("A", "current_task", 0x1FB80),
    ("T", "_stext", BASE),
    ("t", "sysrq_handle_crash", BASE + 0x100),
    ("t", "__handle_sysrq", BASE + 0x120),
    ("T", "_etext", BASE + 0x1000),
    ("D", "x" * 300, BASE + 0x2000),  # a "big" symbol: two length bytes
    ("D", "init_task", BASE + 0x3000),
]


def test_decode_names_types_addresses() -> None:
    syms = decode_kallsyms(*build_tables(SYMS, BASE), BASE)
    got = [(s.type, s.name, s.address) for s in syms]
    assert got == SYMS


def test_symbol_table_lookup_and_format() -> None:
    st = SymbolTable(decode_kallsyms(*build_tables(SYMS, BASE), BASE))
    assert st.format(BASE + 0x116) == "sysrq_handle_crash+0x16/0x20"
    assert st.lookup(BASE + 0x100)[0].name == "sysrq_handle_crash"
    assert st.is_text(BASE + 0x130) and not st.is_text(BASE + 0x2000)
    assert st.address("current_task") == 0x1FB80  # per-cpu: by name, not by address
    assert st.format(0x1FB80) == "0x1fb80"
    assert st.format(BASE - 1) == hex(BASE - 1)


def test_truncated_names_raise_with_reason() -> None:
    num, names, table, index, offsets = build_tables(SYMS, BASE)
    with pytest.raises(KallsymsError, match="runs past|ends at"):
        decode_kallsyms(num, names[:-5], table, index, offsets, BASE)
    with pytest.raises(KallsymsError, match="out of range"):
        decode_kallsyms(0, names, table, index, offsets, BASE)
    with pytest.raises(KallsymsError, match="token"):
        decode_kallsyms(num, names, table[:10], index, offsets, BASE)


def test_load_from_memory_image() -> None:
    from test_linux_image import Image

    img = Image()
    num, names, table, index, offsets = build_tables(SYMS, BASE)
    va = {}
    for key, data in (
        ("kallsyms_offsets", offsets),
        ("kallsyms_relative_base", struct.pack("<Q", BASE)),
        ("kallsyms_num_syms", struct.pack("<I", num)),
        ("kallsyms_names", names),
        ("kallsyms_token_table", table),
        ("kallsyms_token_index", index),
    ):
        va[key] = img.image_alloc(len(data))
        img.put(img.image_pa(va[key]), data)
    vi = Vmcoreinfo("".join(f"SYMBOL({k})={v:x}\n" for k, v in va.items()).encode())
    st = load_kallsyms(img.kmem(), vi)
    assert st.address("init_task") == BASE + 0x3000
    with pytest.raises(KallsymsError, match=r"kallsyms_num_syms.*6\.0"):
        load_kallsyms(img.kmem(), Vmcoreinfo(b"OSRELEASE=5.15\n"))


def test_return_addresses_symbolize_like_pB() -> None:
    st = SymbolTable(decode_kallsyms(*build_tables(SYMS, BASE), BASE))
    # a call as the last instruction of sysrq_handle_crash returns to __handle_sysrq+0
    assert st.format(BASE + 0x120) == "__handle_sysrq+0x0/0xee0"
    assert st.format(BASE + 0x120, return_address=True) == "sysrq_handle_crash+0x20/0x20"
