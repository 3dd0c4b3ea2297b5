"""Loaded modules: the list, their symbols and their ORC tables.

Why: a panic inside a driver has module frames; without the module's own
symbols they print as bare addresses and the ORC walk stops at the first one.
Every module carries what is needed (``struct module``, layout from BTF):
``kallsyms`` (``struct mod_kallsyms``: an ``Elf64_Sym`` array, its string
table and a type-letter table) and ``arch.orc_unwind_ip`` / ``orc_unwind``
/ ``num_orcs`` (x86-64).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from progdump.layers.linux.btf import BtfError
from progdump.layers.linux.kallsyms import Symbol
from progdump.layers.linux.translate import FaultError
from progdump.layers.linux.unwind import OrcTable

__all__ = ["ModuleInfo", "list_entries", "read_modules", "module_symbols", "module_orc", "MAX_MODULES"]

MAX_MODULES = 4096
MAX_MODULE_SYMS = 1 << 18
MAX_MODULE_ORCS = 1 << 20
MAX_STRTAB = 16 << 20
ELF64_SYM = 24
_ELF64_SYM_DTYPE = [
    ("name", "<u4"),
    ("info", "u1"),
    ("other", "u1"),
    ("shndx", "<u2"),
    ("value", "<u8"),
    ("size", "<u8"),
]
_STATES = {0: "live", 1: "coming", 2: "going", 3: "unformed"}


@dataclass
class ModuleInfo:
    name: str
    state: str
    base: int
    size: int
    text_size: int = 0
    address: int = 0  # the struct module


def list_entries(mem, head: int, limit: int) -> tuple[list[int], str]:  # type: ignore[no-untyped-def]
    """Entries of a ``list_head`` ring (addresses of the members), bounded; a reason when cut short."""
    out: list[int] = []
    seen = {head}
    try:
        cur = mem.u64(head)
        while cur != head:
            if cur in seen or len(out) >= limit:
                return out, f"list at {head:#x} loops or exceeds {limit} entries"
            seen.add(cur)
            nxt = mem.u64(cur)  # an entry is kept only once its own link is readable
            out.append(cur)
            cur = nxt
    except FaultError as e:
        return out, f"list at {head:#x} broken: {e}"
    return out, ""


def read_modules(k) -> tuple[list[ModuleInfo], list[str]]:  # type: ignore[no-untyped-def]
    """The ``modules`` list: name, state, core text/data range."""
    btf = k.btf
    head = k.syms.address("modules")
    if head is None:
        return [], ["no modules symbol"]
    o_list = btf.offsetof("module", "list")
    o_name = btf.offsetof("module", "name")
    o_state = btf.offsetof("module", "state")
    try:
        o_base = btf.offsetof("module", "core_layout.base")
        o_size = btf.offsetof("module", "core_layout.size")
        o_text = btf.offsetof("module", "core_layout.text_size")
    except BtfError:  # 6.4+: mem[MOD_TEXT] = {base, size, ...}
        o_base = btf.offsetof("module", "mem")
        o_size = o_text = o_base + 8
    entries, why = list_entries(k.mem, head, MAX_MODULES)
    out = []
    notes = [f"module list: {why}"] if why else []
    for e in entries:
        m = e - o_list
        try:
            out.append(
                ModuleInfo(
                    k.mem.cstring(m + o_name, 56),
                    _STATES.get(k.mem.u32(m + o_state), "?"),
                    k.mem.u64(m + o_base),
                    k.mem.u32(m + o_size),
                    k.mem.u32(m + o_text),
                    m,
                )
            )
        except FaultError as ex:
            notes.append(f"module at {m:#x} unreadable: {ex}")
    return out, notes


def parse_elf_symbols(symtab: bytes, strtab: bytes, typetab: bytes) -> list[Symbol]:
    """``Elf64_Sym`` entries (name, info, other, shndx, value, size) to Symbols (pure).

    numpy picks the defined, named entries (a module has hundreds to
    thousands, and all of them are read on the layer-0 path); only those are
    turned into Symbols.
    """
    try:
        import numpy as np  # noqa: PLC0415
    except ImportError:
        np = None  # type: ignore[assignment]
    if np is None or len(symtab) % ELF64_SYM:  # (the plain loop also raises on a torn table)
        rows = [
            (i, name, value)
            for i, (name, _info, _other, shndx, value, _size) in enumerate(struct.iter_unpack("<IBBHQQ", symtab))
            if name and shndx and name < len(strtab)
        ]
    else:
        a = np.frombuffer(symtab, dtype=_ELF64_SYM_DTYPE)
        keep = np.flatnonzero((a["name"] != 0) & (a["shndx"] != 0) & (a["name"] < len(strtab)))
        rows = list(zip(keep.tolist(), a["name"][keep].tolist(), a["value"][keep].tolist()))
    out = []
    ntype = len(typetab)
    for i, name, value in rows:
        end = strtab.find(b"\0", name)
        n = strtab[name : end if end >= 0 else len(strtab)].decode("ascii", "replace")
        t = chr(typetab[i]) if i < ntype and 0x20 < typetab[i] < 0x7F else "?"
        if n:
            out.append(Symbol(n, value, t))
    return out


def module_symbols(k, m: ModuleInfo) -> list[Symbol]:  # type: ignore[no-untyped-def]
    btf = k.btf
    ks = k.mem.u64(m.address + btf.offsetof("module", "kallsyms"))
    symtab_va, num = (
        k.mem.u64(ks + btf.offsetof("mod_kallsyms", "symtab")),
        k.mem.u32(ks + btf.offsetof("mod_kallsyms", "num_symtab")),
    )
    strtab_va = k.mem.u64(ks + btf.offsetof("mod_kallsyms", "strtab"))
    typetab_va = k.mem.u64(ks + btf.offsetof("mod_kallsyms", "typetab"))
    if not 0 < num <= MAX_MODULE_SYMS:
        raise ValueError(f"module {m.name}: {num} symbols")
    symtab = k.mem.read(symtab_va, num * ELF64_SYM)
    max_name = max(struct.unpack_from(f"<{num * 6}I", symtab)[::6])  # each Elf64_Sym starts with st_name
    if max_name >= MAX_STRTAB:
        raise ValueError(f"module {m.name}: string offset {max_name}")
    strtab = _read_upto(k, strtab_va, max_name + 256)
    typetab = k.mem.read(typetab_va, num)
    return parse_elf_symbols(symtab, strtab, typetab)


def _read_upto(k, va: int, n: int) -> bytes:  # type: ignore[no-untyped-def]
    """As much of ``[va, va+n)`` as is readable (a string table may end near a page end)."""
    out = b""
    while n > 0:
        step = min(n, 4096 - (va & 0xFFF))
        try:
            out += k.mem.read(va, step)
        except FaultError:
            break
        va += step
        n -= step
    return out


def module_orc(k, m: ModuleInfo) -> OrcTable | None:  # type: ignore[no-untyped-def]
    btf = k.btf
    n = k.mem.u32(m.address + btf.offsetof("module", "arch.num_orcs"))
    if n == 0:
        return None
    if n > MAX_MODULE_ORCS:
        raise ValueError(f"module {m.name}: {n} ORC entries")
    ip_va = k.mem.u64(m.address + btf.offsetof("module", "arch.orc_unwind_ip"))
    e_va = k.mem.u64(m.address + btf.offsetof("module", "arch.orc_unwind"))
    return OrcTable(ip_va, k.mem.read(ip_va, 4 * n), k.mem.read(e_va, 6 * n))
