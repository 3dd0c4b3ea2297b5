"""The layer-0 fast paths give the same answers as the plain algorithms they replace.

Why: kallsyms names stay encoded and are found through a numpy hash,
symbols are sorted and merged with numpy, and BTF records are walked only as
far as lookups need. Each is checked here against a naive reference written
in the test (a dict, a sorted list, a full walk) on tables large enough to
take the numpy paths (> 4096 symbols, > 8192 BTF types).
"""

from __future__ import annotations

import bisect
import random
import struct

import pytest

from progdump.layers.linux.btf import Btf, BtfError
from progdump.layers.linux.kallsyms import (
    KallsymsError,
    KallsymsTexts,
    Symbol,
    _name_spans,
    _name_spans_checked,
    _table,
    _tokens,
)

np = pytest.importorskip("numpy")

BASE = 0xFFFFFFFF81000000
MULTI = {1: b"T_", 2: b"sys", 3: b"_handle_", 4: b"tt", 5: b"crash", 6: b"__"}


def encode(symbols: list[tuple[str, str, int]], tokens: dict[int, bytes]) -> tuple[int, bytes, bytes, bytes, bytes]:
    """kallsyms tables (num, names, token_table, token_index, offsets) with greedy token encoding."""
    table = [tokens.get(i, bytes([i])) for i in range(256)]
    tt, index = b"", []
    for t in table:
        index.append(len(tt))
        tt += t + b"\0"
    names, offsets = b"", b""
    for typ, name, addr in symbols:
        full, enc, i = (typ + name).encode(), [], 0
        while i < len(full):
            k = next((k for k, t in tokens.items() if t and full.startswith(t, i)), None)
            if k is None:
                enc.append(full[i])
                i += 1
            else:
                enc.append(k)
                i += len(tokens[k])
        n = len(enc)
        names += (bytes([n]) if n < 0x80 else bytes([(n & 0x7F) | 0x80, n >> 7])) + bytes(enc)
        offsets += struct.pack("<i", addr if addr < 1 << 31 else -(addr - BASE) - 1)
    return len(symbols), names, tt, struct.pack("<256H", *index), offsets


def make_symbols(n: int, seed: int = 1) -> list[tuple[str, str, int]]:
    rnd = random.Random(seed)
    syms = [("T", "_stext", BASE), ("T", "_etext", BASE + 0x800000), ("A", "current_task", 0x1FB80)]
    for i in range(n):
        name = rnd.choice(["sys_", "__handle_", "tt", "crash_", "x"]) + f"f{rnd.randrange(n // 2)}"
        if i % 997 == 0:
            name += "y" * 200  # a "big" symbol: two length bytes
        syms.append((rnd.choice("tTdDbr"), name, BASE + rnd.randrange(0x900000)))  # duplicates, ties
    return syms


class Reference:
    """The plain algorithm: a first-wins dict and a stably sorted list."""

    def __init__(self, syms: list[tuple[str, str, int]]) -> None:
        self.first: dict[str, int] = {}
        for _typ, name, addr in syms:
            self.first.setdefault(name, addr)
        self.sorted = sorted(((a, n, "") for _t, n, a in syms if a >= 1 << 63), key=lambda s: s[0])
        self.ranges: list[tuple[int, int]] = []

    def add_modules(self, mods: list[tuple[str, list[Symbol], int, int, int]]) -> None:
        extra = [(s.address, s.name, m) for m, ss, base, size, _ in mods for s in ss if base <= s.address < base + size]
        self.sorted = sorted(self.sorted + extra, key=lambda s: s[0])
        self.ranges += [(base, base + size) for _, _, base, size, _ in mods]

    def format(self, addr: int) -> str:
        addrs = [s[0] for s in self.sorted]
        i = bisect.bisect_right(addrs, addr) - 1
        if i < 0:
            return f"{addr:#x}"
        a, name, mod = self.sorted[i]
        j = bisect.bisect_right(addrs, a)
        nxt = addrs[j] if j < len(addrs) else None
        if mod:
            end = next((hi for lo, hi in self.ranges if lo <= a < hi), a + 1)
            nxt = min(nxt, end) if nxt is not None else end
        size = nxt - a if nxt is not None else 0
        if size and addr - a >= size:
            return f"{addr:#x}"
        return f"{name}+{addr - a:#x}/{size:#x}" + (f" [{mod}]" if mod else "")


def test_encoded_names_and_numpy_sort_match_a_dict_and_a_sorted_list() -> None:
    syms = make_symbols(6000)
    num, names, tt, ti, offs = encode(syms, MULTI)
    st = _table(num, names, tt, ti, offs, BASE)
    assert st._texts is not None  # the encoded path, not the eager fallback
    ref = Reference(syms)
    for name, addr in ref.first.items():
        assert st.address(name) == addr, name
    assert st.address("no_such_symbol") is None and st.address("f1") is None and st.address("") is None
    assert st.address("sys_\u20ac") is None  # not latin-1: no kallsyms name can hold it
    rnd = random.Random(2)
    probes = [a + rnd.randrange(-3, 300) for a, _, _ in rnd.sample(ref.sorted, 2000)] + [0, 1, (1 << 64) - 1]
    for a in probes:
        assert st.format(a) == ref.format(a), hex(a)
    top = ref.sorted[-1][0]
    mods = [
        (
            "m1",
            [Symbol("mf", top + 0x10, "t"), Symbol("mg", top + 0x10, "t"), Symbol("out", BASE, "t")],
            top,
            0x100,
            0x80,
        ),
        (
            "m2",
            [Symbol("tie", ref.sorted[10][0], "t"), Symbol("before", ref.sorted[9][0] + 1, "t")],
            ref.sorted[9][0],
            0x1000,
            0x100,
        ),
    ]
    st.add_modules(mods)
    ref.add_modules(mods)
    for a in probes + [top + i for i in range(0, 0x120, 3)] + [ref.sorted[9][0] + i for i in range(0, 64)]:
        assert st.format(a) == ref.format(a), hex(a)


def test_entry_starting_with_an_empty_token_falls_back_to_eager_decoding() -> None:
    syms = make_symbols(5000, seed=4)
    tokens = dict(MULTI)
    tokens[7] = b""
    num, names, tt, ti, offs = encode(syms, tokens)
    names = bytearray(names)
    starts, lens = _name_spans(num, bytes(names))
    # give the 10th entry an empty first token: its type letter comes from the second one
    p = starts[10]
    names[p - 1] += 1
    names[p:p] = b"\x07"
    num_, names_b = num, bytes(names)
    assert KallsymsTexts.build(_tokens(tt, ti), names_b, *_name_spans(num_, names_b)) is None
    st = _table(num_, names_b, tt, ti, offs, BASE)
    assert st._texts is None
    assert st.address(syms[10][1]) == Reference(syms).first[syms[10][1]]


def many_types(n_filler: int, late_bad: bool = False) -> tuple[bytes, dict[str, int]]:
    """A BTF blob: a struct early, ``n_filler`` ints, a struct late, an enum; optionally a bad record last."""
    strings, types, ids = b"\0", b"", {}

    def s(name: str) -> int:
        nonlocal strings
        off = len(strings)
        strings += name.encode() + b"\0"
        return off

    def add(kind: int, name: str, st: int, vlen: int = 0, extra: bytes = b"") -> int:
        nonlocal types
        types += struct.pack("<III", s(name) if name else 0, (kind << 24) | vlen, st) + extra
        ids[name] = len(ids) + 1
        return ids[name]

    u = add(1, "int", 4, extra=struct.pack("<I", 32))
    add(4, "early", 8, 2, struct.pack("<III", s("a"), u, 0) + struct.pack("<III", s("b"), u, 32))
    for i in range(n_filler):
        add(1, f"filler{i}", 4, extra=struct.pack("<I", 32))
    add(4, "late", 4, 1, struct.pack("<III", s("c"), u, 0))
    add(6, "late_enum", 4, 1, struct.pack("<Ii", s("V"), 7))
    if late_bad:
        types += struct.pack("<III", 0, 0x1F << 24, 0)
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return hdr + types + strings, ids


def test_lazy_btf_walk_finds_what_a_full_walk_finds() -> None:
    blob, ids = many_types(20000)
    for order in (["early", "late"], ["late", "early"]):
        b = Btf(blob)
        for name in order:
            assert b.find(name) == ids[name]
        assert b.offsetof("early", "b") == 4 and b.offsetof("late", "c") == 0
    b = Btf(blob)
    assert b.enum_values("late_enum") == {"V": 7}
    b = Btf(blob)
    assert b.kind(ids["late"]) == 4 and len(b) == len(ids)  # a high id first, then the length
    with pytest.raises(BtfError, match="no struct nothere"):
        Btf(blob).find("nothere")
    with pytest.raises(BtfError, match="outside the table"):
        Btf(blob).kind(len(ids) + 1)


def test_lazy_btf_walk_raises_when_it_reaches_a_bad_record() -> None:
    blob, ids = many_types(20000, late_bad=True)
    b = Btf(blob)  # the bad record is beyond the constructor's walk
    assert b.offsetof("early", "b") == 4  # what comes before it stays readable
    assert b.find("late") == ids["late"]
    with pytest.raises(BtfError, match=f"BTF type {len(ids) + 1} has unknown kind 31"):
        b.find("filler5")  # an int of that name exists; looking for a struct walks to the end
    with pytest.raises(BtfError, match="unknown kind"):
        len(Btf(blob))


def test_unchecked_name_walk_matches_the_checked_one() -> None:
    num, names, *_ = encode(make_symbols(5000, seed=5), MULTI)
    assert _name_spans(num, names) == _name_spans_checked(num, names)
    for bad, why in (
        (names[:-3], "runs past"),
        (names[:-300], "ends at|runs past|truncated"),
        (b"\0" + names[1:], "length 0"),
    ):
        with pytest.raises(KallsymsError, match=why):
            _name_spans(num, bad)


def test_log_escaping_matches_the_per_byte_rule() -> None:
    from progdump.layers.linux.printk import escape_text

    def per_byte(text: bytes) -> str:  # makedumpfile's rule, one byte at a time
        return "".join("\n" if b == 0x0A else chr(b) if 0x20 <= b < 0x7F or b == 0x09 else f"\\x{b:02x}" for b in text)

    rnd = random.Random(6)
    cases = [bytes(range(256)), b"", b"plain\n", b"a\tb"] + [rnd.randbytes(rnd.randrange(80)) for _ in range(500)]
    for c in cases:
        assert escape_text(c) == per_byte(c)
