"""The kernel's symbol table, rebuilt from its own kallsyms tables in memory.

Why: no debug-info package exists on a dump path, but Linux 6.0+ publishes
the addresses of its compressed kallsyms tables in VMCOREINFO
(``SYMBOL(kallsyms_names)`` ...). Decoding them gives every symbol's name,
type letter and address, the same table ``/proc/kallsyms`` prints.

Layout (scripts/kallsyms.c, as in 6.1):

* ``kallsyms_num_syms``: u32 count;
* ``kallsyms_names``: per symbol a length byte (``len & 0x80`` means a
  second byte holds ``len >> 7``), then that many token indices;
* ``kallsyms_token_table`` / ``kallsyms_token_index``: 256 NUL-terminated
  tokens and their u16 offsets; the first decoded character is the type;
* ``kallsyms_offsets`` (s32) with ``kallsyms_relative_base`` (u64): with
  absolute per-cpu symbols (x86-64 SMP) ``off >= 0`` is an absolute value and
  ``off < 0`` means ``relative_base - 1 - off``; otherwise
  ``relative_base + (u32)off``.
"""

from __future__ import annotations

import bisect
import struct
from typing import NamedTuple

__all__ = ["KallsymsError", "Symbol", "SymbolTable", "decode_kallsyms", "load_kallsyms"]

MAX_SYMS = 1 << 21
MAX_NAMES_BYTES = 64 << 20


class KallsymsError(Exception):
    """The kallsyms tables are absent or do not decode; the message says where."""


class Symbol(NamedTuple):
    name: str
    address: int
    type: str  # /proc/kallsyms letter: t T d D b B r R ...
    module: str = ""  # "" for vmlinux


class SymbolTable:
    """Sorted symbols with address lookup (``sym+0xoff/0xsize`` like printk's %pS)."""

    def __init__(self, symbols: list[Symbol]) -> None:
        # per-cpu offsets (tiny absolute values) are not addresses: keep them
        # for by-name lookup, out of address lookup.
        self.by_name: dict[str, Symbol] = {}
        for s in symbols:
            self.by_name.setdefault(s.name, s)
        addr_syms = sorted((s for s in symbols if s.address >= 1 << 63), key=lambda s: s.address)
        self._syms = addr_syms
        self._addrs = [s.address for s in addr_syms]
        self._module_ranges: list[tuple[int, int]] = []  # symbols here end at their module's end
        self.text_ranges: list[tuple[int, int]] = []
        for lo, hi in (("_stext", "_etext"), ("_sinittext", "_einittext")):
            if lo in self.by_name and hi in self.by_name:
                a, b = self.by_name[lo].address, self.by_name[hi].address
                if a < b:
                    self.text_ranges.append((a, b))

    def __len__(self) -> int:
        return len(self.by_name)

    def add_modules(self, modules: list[tuple[str, list[Symbol], int, int, int]]) -> None:
        """Add modules' symbols (from their own ``mod_kallsyms``) and text ranges.

        ``modules``: ``(name, symbols, base, size, text_size)``; one re-sort for all.
        """
        extra: list[Symbol] = []
        for name, symbols, base, size, text_size in modules:
            extra += [Symbol(s.name, s.address, s.type, name) for s in symbols if base <= s.address < base + size]
            self._module_ranges.append((base, base + size))
            if text_size > 0:
                self.text_ranges.append((base, base + min(text_size, size)))
        merged = sorted(self._syms + extra, key=lambda s: s.address)
        self._syms = merged
        self._addrs = [s.address for s in merged]

    def address(self, name: str) -> int | None:
        s = self.by_name.get(name)
        return s.address if s else None

    def is_text(self, addr: int) -> bool:
        return any(lo <= addr < hi for lo, hi in self.text_ranges)

    def lookup(self, addr: int) -> tuple[Symbol, int, int] | None:
        """``(symbol, offset, size)`` of the symbol containing ``addr``.

        The size is the distance to the next higher symbol, as kallsyms does.
        """
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0:
            return None
        s = self._syms[i]
        j = bisect.bisect_right(self._addrs, s.address)
        nxt = self._addrs[j] if j < len(self._addrs) else None
        if s.module:  # a module's last symbol ends with the module
            end = next((hi for lo, hi in self._module_ranges if lo <= s.address < hi), s.address + 1)
            nxt = min(nxt, end) if nxt is not None else end
        size = (nxt - s.address) if nxt is not None else 0
        if size and addr - s.address >= size:
            return None
        return s, addr - s.address, size

    def format(self, addr: int, return_address: bool = False) -> str:
        """``name+0xoff/0xsize`` or the bare hex address when unknown.

        ``return_address``: symbolize ``addr - 1`` and add the 1 back, as
        printk's ``%pB`` does, so a call at the very end of a function (a
        ``noreturn`` callee) names the caller, not the next symbol.
        """
        hit = self.lookup(addr - 1 if return_address else addr)
        if hit is None:
            return f"{addr:#x}"
        s, off, size = hit
        mod = f" [{s.module}]" if s.module else ""
        return f"{s.name}+{off + (1 if return_address else 0):#x}/{size:#x}{mod}"


def decode_kallsyms(num_syms: int, names: bytes, token_table: bytes, token_index: bytes,
                    offsets: bytes, relative_base: int) -> list[Symbol]:
    """Decode the raw tables (pure: unit tests feed hand-built tables).

    A first pass finds every entry's span (length bytes are sequential); the
    second expands tokens per entry; symbols are light named tuples.
    """
    if not 0 < num_syms <= MAX_SYMS:
        raise KallsymsError(f"kallsyms_num_syms={num_syms} out of range")
    if len(token_index) < 512:
        raise KallsymsError("kallsyms_token_index shorter than 256 entries")
    if len(offsets) < 4 * num_syms:
        raise KallsymsError("kallsyms_offsets shorter than kallsyms_num_syms")
    tokens: list[bytes] = []
    for off in struct.unpack_from("<256H", token_index):
        end = token_table.find(b"\0", off)
        if off >= len(token_table) or end < 0:
            raise KallsymsError(f"kallsyms token at {off} outside the token table")
        tokens.append(token_table[off:end])
    starts, lens = _name_spans(num_syms, names)
    offs = struct.unpack_from(f"<{num_syms}i", offsets)
    absolute_percpu = any(o < 0 for o in offs)
    mask = (1 << 64) - 1
    if absolute_percpu:
        addrs = [(o if o >= 0 else relative_base - 1 - o) & mask for o in offs]
    else:
        addrs = [(relative_base + (o & 0xFFFFFFFF)) & mask for o in offs]
    texts = [b"".join([tokens[b] for b in names[p:p + n]]) for p, n in zip(starts, lens)]
    types = [chr(t[0]) if t else "?" for t in texts]
    nms = [t[1:].decode("latin-1") for t in texts]  # kernel symbol names are ASCII
    return list(map(Symbol, nms, addrs, types))


def _name_spans(num_syms: int, names: bytes) -> tuple[list[int], list[int]]:
    """Start and length (in token bytes) of every entry of ``kallsyms_names``."""
    starts: list[int] = []
    lens: list[int] = []
    pos = 0
    n = len(names)
    for i in range(num_syms):
        if pos >= n:
            raise KallsymsError(f"kallsyms_names ends at symbol {i} of {num_syms}")
        ln = names[pos]
        pos += 1
        if ln & 0x80:
            if pos >= n:
                raise KallsymsError(f"kallsyms_names truncated at symbol {i}")
            ln = (ln & 0x7F) | (names[pos] << 7)
            pos += 1
        if pos + ln > n or ln == 0:
            raise KallsymsError(f"kallsyms_names entry {i} (length {ln}) runs past the table")
        starts.append(pos)
        lens.append(ln)
        pos += ln
    return starts, lens


def load_kallsyms(mem, vmcoreinfo) -> SymbolTable:  # type: ignore[no-untyped-def]
    """Read and decode the tables VMCOREINFO points at (``mem``: KernelMemory).

    Raises :class:`KallsymsError` (or a VmcoreinfoMissing/FaultError) naming
    what is missing.
    """
    from progdump.layers.linux.translate import FaultError
    from progdump.layers.linux.vmcoreinfo import VmcoreinfoMissing

    try:
        a_num = vmcoreinfo.symbol("kallsyms_num_syms")
        a_names = vmcoreinfo.symbol("kallsyms_names")
        a_tt = vmcoreinfo.symbol("kallsyms_token_table")
        a_ti = vmcoreinfo.symbol("kallsyms_token_index")
        a_offs = vmcoreinfo.symbol("kallsyms_offsets")
        a_rb = vmcoreinfo.symbol("kallsyms_relative_base")
    except VmcoreinfoMissing as e:
        raise KallsymsError(f"{e} (kallsyms in VMCOREINFO needs Linux >= 6.0)") from None
    try:
        num = mem.u32(a_num)
        if not 0 < num <= MAX_SYMS:
            raise KallsymsError(f"kallsyms_num_syms={num} out of range")
        # names run up to kallsyms_markers, which precedes the token table
        names_len = a_tt - a_names if a_names < a_tt <= a_names + MAX_NAMES_BYTES else min(num * 64, MAX_NAMES_BYTES)
        names = mem.read(a_names, names_len)
        ti = mem.read(a_ti, 512)
        tt_len = a_ti - a_tt if a_tt < a_ti <= a_tt + 65536 else 16384
        tt = mem.read(a_tt, tt_len)
        offs = mem.read(a_offs, 4 * num)
        rb = mem.u64(a_rb)
    except FaultError as e:
        raise KallsymsError(f"kallsyms tables unreadable: {e}") from None
    return SymbolTable(decode_kallsyms(num, names, tt, ti, offs, rb))
