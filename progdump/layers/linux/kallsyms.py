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
from typing import Any, NamedTuple

from progdump.errors import ProgdumpError

__all__ = [
    "KallsymsError",
    "Symbol",
    "SymbolTable",
    "KallsymsTexts",
    "decode_columns",
    "decode_kallsyms",
    "load_kallsyms",
]

MAX_SYMS = 1 << 21
MAX_NAMES_BYTES = 64 << 20


class KallsymsError(ProgdumpError):
    """The kallsyms tables are absent or do not decode; the message says where."""


class Symbol(NamedTuple):
    name: str
    address: int
    type: str  # /proc/kallsyms letter: t T d D b B r R ...
    module: str = ""  # "" for vmlinux


class SymbolTable:
    """Sorted symbols with address lookup (``sym+0xoff/0xsize`` like printk's %pS).

    Why columns, not a list of :class:`Symbol`: a kernel has ~100k symbols
    and this table is built on the layer-0 path, while a dump looks up a few
    hundred of them. Names, addresses, types and modules are kept in
    parallel lists; a :class:`Symbol` is made only when one is looked up.
    """

    def __init__(self, symbols: list[Symbol]) -> None:
        self._build(
            [s.name for s in symbols],
            [s.address for s in symbols],
            [s.type for s in symbols],
            [s.module for s in symbols],
        )

    @classmethod
    def from_columns(cls, names: list[str], addrs: list[int], types: list[str]) -> SymbolTable:
        """The table of vmlinux symbols given as parallel lists (what the kallsyms decoder yields)."""
        self = cls.__new__(cls)
        self._build(names, addrs, types, [""] * len(names))
        return self

    @classmethod
    def from_kallsyms(cls, texts: KallsymsTexts, addrs: list[int], addr_array: object = None) -> SymbolTable:
        """The table of vmlinux symbols whose names stay encoded until looked up (see :class:`KallsymsTexts`)."""
        self = cls.__new__(cls)
        self._build([], addrs, [], [], texts, addr_array)
        return self

    def _build(
        self,
        names: list[str],
        addrs: list[int],
        types: list[str],
        mods: list[str],
        texts: KallsymsTexts | None = None,
        addr_array: object = None,
    ) -> None:
        # symbol i < self._nk is kallsyms entry i (name decoded on demand); the others are
        # self._name/_type/_mod[i - self._nk]. self._addr holds every symbol's address.
        self._texts = texts
        self._nk = len(texts) if texts is not None else 0
        self._name, self._addr, self._type, self._mod = names, addrs, types, mods
        n = len(addrs)
        # the first symbol of a name wins (as a dict.setdefault pass would)
        self._index: dict[str, int] | None = (
            None if texts is not None else dict(zip(reversed(names), range(n - 1, -1, -1)))
        )
        # per-cpu offsets (tiny absolute values) are not addresses: keep them
        # for by-name lookup, out of address lookup.
        self._order, self._addrs, self._arrays = _sorted_by_address(
            None if n >= 4096 else [i for i in range(n) if addrs[i] >= 1 << 63], addrs, addr_array
        )
        self._module_ranges: list[tuple[int, int]] = []  # symbols here end at their module's end
        self.text_ranges: list[tuple[int, int]] = []
        for lo, hi in (("_stext", "_etext"), ("_sinittext", "_einittext")):
            a, b = self.address(lo), self.address(hi)
            if a is not None and b is not None and a < b:
                self.text_ranges.append((a, b))

    def _symbol(self, i: int) -> Symbol:
        if i < self._nk:
            t = self._texts.text(i)  # type: ignore[union-attr]
            return Symbol(t[1:], self._addr[i], t[:1] or "?", "")
        j = i - self._nk
        return Symbol(self._name[j], self._addr[i], self._type[j], self._mod[j])

    def _first(self, name: str) -> int | None:
        """Index of the first vmlinux symbol named ``name``."""
        if self._texts is not None:
            return self._texts.find(name)
        return self._index.get(name)  # type: ignore[union-attr]

    @property
    def by_name(self) -> dict[str, Symbol]:
        """Name -> first symbol of that name (vmlinux only); built on demand (costly: every symbol)."""
        if self._texts is not None:
            out: dict[str, Symbol] = {}
            for i in range(self._nk):
                s = self._symbol(i)
                out.setdefault(s.name, s)
            return out
        return {name: self._symbol(i) for name, i in self._index.items()}  # type: ignore[union-attr]

    def __len__(self) -> int:
        if self._texts is not None:
            return len({self._texts.text(i)[1:] for i in range(self._nk)})
        return len(self._index)  # type: ignore[arg-type]

    def add_modules(self, modules: list[tuple[str, list[Symbol], int, int, int]]) -> None:
        """Add modules' symbols (from their own ``mod_kallsyms``) and text ranges.

        ``modules``: ``(name, symbols, base, size, text_size)``; one merge for all
        (stable: a module symbol at a vmlinux symbol's address sorts after it).
        """
        first = len(self._addr)
        for name, symbols, base, size, text_size in modules:
            for s in symbols:
                if base <= s.address < base + size:
                    self._name.append(s.name)
                    self._addr.append(s.address)
                    self._type.append(s.type)
                    self._mod.append(name)
            self._module_ranges.append((base, base + size))
            if text_size > 0:
                self.text_ranges.append((base, base + min(text_size, size)))
        self._order, self._addrs, self._arrays = _merge_by_address(
            self._order, self._addrs, self._arrays, range(first, len(self._addr)), self._addr
        )

    def address(self, name: str) -> int | None:
        i = self._first(name)
        return self._addr[i] if i is not None else None

    def is_text(self, addr: int) -> bool:
        return any(lo <= addr < hi for lo, hi in self.text_ranges)

    def lookup(self, addr: int) -> tuple[Symbol, int, int] | None:
        """``(symbol, offset, size)`` of the symbol containing ``addr``.

        The size is the distance to the next higher symbol, as kallsyms does.
        """
        i = _bisect_right(self._addrs, addr) - 1
        if i < 0:
            return None
        s = self._symbol(int(self._order[i]))
        j = _bisect_right(self._addrs, s.address)
        nxt = int(self._addrs[j]) if j < len(self._addrs) else None
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


_M64 = (1 << 64) - 1


def _byte_weights() -> list[int]:
    """A fixed pseudo-random 64-bit weight per byte value (splitmix64 from a constant seed)."""
    out, x = [], 0x9E3779B97F4A7C15
    for _ in range(256):
        x = (x + 0x9E3779B97F4A7C15) & _M64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        out.append(z ^ (z >> 31))
    return out


_WEIGHT = _byte_weights()


def _name_hash(name: bytes) -> int:
    """Sum of the bytes' weights mod 2**64: order-blind, so it adds up over tokens without
    expanding them; the few names with the same bytes in another order cost a compare."""
    return sum(_WEIGHT[b] for b in name) & _M64


class KallsymsTexts:
    """The kallsyms entries, decoded one at a time, found by name through a hash per entry.

    Why: expanding ~100k names into Python strings (and a dict) is most of
    the cost of reading kallsyms, and layer 0 asks for a few dozen names and
    symbolizes a few hundred addresses. The hash of every entry's name (its
    text after the type letter: :func:`_name_hash`) is summed from the
    token indices with numpy, without expanding them; a lookup hashes the name,
    takes the entries with that hash in index order and compares their
    decoded names, so the first symbol of that name wins, as with a dict.
    """

    def __init__(self, tokens: list[bytes], names: bytes, starts: list[int], lens: list[int], hashes: object) -> None:
        self._tokens, self._names, self._starts, self._lens = tokens, names, starts, lens
        self._hashes = hashes  # numpy uint64 per entry

    def __len__(self) -> int:
        return len(self._starts)

    def text(self, i: int) -> str:
        """Entry ``i``: type letter + name (latin-1; kernel symbol names are ASCII)."""
        p = self._starts[i]
        return b"".join([self._tokens[b] for b in self._names[p : p + self._lens[i]]]).decode("latin-1")

    def find(self, name: str) -> int | None:
        try:
            raw = name.encode("latin-1")
        except UnicodeEncodeError:
            return None  # names are latin-1 decoded: none holds this
        import numpy as np  # noqa: PLC0415

        for i in np.flatnonzero(self._hashes == np.uint64(_name_hash(raw))).tolist():
            if self.text(i)[1:] == name:
                return i
        return None

    @classmethod
    def build(cls, tokens: list[bytes], names: bytes, starts: list[int], lens: list[int]) -> KallsymsTexts | None:
        """Hash every entry's name; None when numpy is missing or an entry starts with an empty token."""
        try:
            import numpy as np  # noqa: PLC0415
        except ImportError:
            return None
        if not starts:
            return None
        end = starts[-1] + lens[-1]
        arr = np.frombuffer(names, dtype=np.uint8, count=end)
        st = np.asarray(starts, dtype=np.int64)
        ln = np.asarray(lens, dtype=np.int64)
        head = np.concatenate(([0], st[:-1] + ln[:-1]))  # entries are contiguous: each header starts there
        first = arr[st]
        if not np.array([len(t) for t in tokens], dtype=bool)[first].all():
            return None  # an entry whose type letter is not in its first token: decode eagerly
        wtok = np.array([_name_hash(t) for t in tokens], dtype=np.uint64)  # a token's bytes, summed
        wtype = np.array([_WEIGHT[t[0]] if t else 0 for t in tokens], dtype=np.uint64)  # its first byte
        # every byte of an entry (header included) as tokens, minus the header bytes and the type letter
        total = np.add.reduceat(wtok[arr], head)
        hdr = wtok[arr[head]] + np.where(st - head == 2, wtok[arr[np.minimum(head + 1, end - 1)]], np.uint64(0))
        return cls(tokens, names, starts, lens, total - hdr - wtype[first])


def _bisect_right(seq: object, x: int) -> int:
    """``bisect_right`` over a list or a sorted numpy uint64 array (any Python int ``x``)."""
    if isinstance(seq, list):
        return bisect.bisect_right(seq, x)
    if x < 0:
        return 0
    if x > _M64:
        return len(seq)  # type: ignore[arg-type]
    import numpy as np  # noqa: PLC0415

    return int(np.searchsorted(seq, np.uint64(x), side="right"))  # type: ignore[call-overload]


def _sorted_by_address(small: list[int] | None, addrs: list[int], addr_array: Any = None) -> tuple[Any, Any, Any]:
    """Indices of the kernel-address symbols (``>= 2**63``) in stable address order, and those addresses.

    ``small``: the selected indices when the table is small (pure Python);
    ``None``: select and sort with numpy (a kernel's ~100k symbols); then the
    third item is the pair of numpy arrays, kept for :func:`_merge_by_address`.
    The indices and addresses are lists, or numpy arrays when numpy did the work (hence Any).
    """
    if small is None:
        try:
            import numpy as np  # noqa: PLC0415

            a = addr_array if addr_array is not None else np.fromiter(addrs, dtype=np.uint64, count=len(addrs))
            sel = np.flatnonzero(a >= np.uint64(1 << 63))
            order = sel[np.argsort(a[sel], kind="stable")]
            sa = a[order]
            return order, sa, (order, sa)
        except (ImportError, OverflowError, ValueError):  # no numpy, or an address outside u64
            small = [i for i in range(len(addrs)) if addrs[i] >= 1 << 63]
    by_addr = sorted(small, key=addrs.__getitem__)
    return by_addr, [addrs[i] for i in by_addr], None


def _merge_by_address(order: Any, sorted_addrs: Any, arrays: Any, new: range, addrs: list[int]) -> tuple[Any, Any, Any]:
    """``order`` (sorted) with the indices ``new`` merged in, stably (existing entries first on ties)."""
    if not len(new):
        return order, sorted_addrs, arrays
    if arrays is not None:
        try:
            import numpy as np  # noqa: PLC0415

            old_order, old_addrs = arrays
            new_addrs = np.array([addrs[i] for i in new], dtype=np.uint64)
            new_sorted = np.argsort(new_addrs, kind="stable")
            # each new entry goes after every existing one at its address; new ones keep their order
            at = np.searchsorted(old_addrs, new_addrs[new_sorted], side="right")
            idx = np.insert(old_order, at, np.fromiter(new, dtype=old_order.dtype, count=len(new))[new_sorted])
            adr = np.insert(old_addrs, at, new_addrs[new_sorted])
            return idx, adr, (idx, adr)
        except (ImportError, OverflowError, ValueError):
            pass
    merged = sorted(list(order) + list(new), key=addrs.__getitem__)
    return merged, [addrs[i] for i in merged], None


def decode_kallsyms(
    num_syms: int, names: bytes, token_table: bytes, token_index: bytes, offsets: bytes, relative_base: int
) -> list[Symbol]:
    """Decode the raw tables (pure: unit tests feed hand-built tables)."""
    return list(map(Symbol, *decode_columns(num_syms, names, token_table, token_index, offsets, relative_base)))


def decode_columns(
    num_syms: int, names: bytes, token_table: bytes, token_index: bytes, offsets: bytes, relative_base: int
) -> tuple[list[str], list[int], list[str]]:
    """Names, addresses and type letters of every symbol, as parallel lists.

    A first pass finds every entry's span (length bytes are sequential); the
    second expands all tokens at once (:func:`_expand`).
    """
    _check_sizes(num_syms, token_index, offsets)
    tokens = _tokens(token_table, token_index)
    starts, lens = _name_spans(num_syms, names)
    addrs, _ = _addresses(num_syms, offsets, relative_base)
    texts = _expand(tokens, names, starts, lens)  # type letter + name; kernel symbol names are ASCII
    return [t[1:] for t in texts], addrs, [t[:1] or "?" for t in texts]


def _check_sizes(num_syms: int, token_index: bytes, offsets: bytes) -> None:
    if not 0 < num_syms <= MAX_SYMS:
        raise KallsymsError(f"kallsyms_num_syms={num_syms} out of range")
    if len(token_index) < 512:
        raise KallsymsError("kallsyms_token_index shorter than 256 entries")
    if len(offsets) < 4 * num_syms:
        raise KallsymsError("kallsyms_offsets shorter than kallsyms_num_syms")


def _tokens(token_table: bytes, token_index: bytes) -> list[bytes]:
    tokens: list[bytes] = []
    for off in struct.unpack_from("<256H", token_index):
        end = token_table.find(b"\0", off)
        if off >= len(token_table) or end < 0:
            raise KallsymsError(f"kallsyms token at {off} outside the token table")
        tokens.append(token_table[off:end])
    return tokens


def _addresses(num_syms: int, offsets: bytes, relative_base: int) -> tuple[list[int], object]:
    """Every symbol's address from ``kallsyms_offsets`` (numpy when present: ~100k symbols)."""
    mask = (1 << 64) - 1
    try:
        import numpy as np  # noqa: PLC0415
    except ImportError:
        offs = struct.unpack_from(f"<{num_syms}i", offsets)
        if any(o < 0 for o in offs):
            return [(o if o >= 0 else relative_base - 1 - o) & mask for o in offs], None
        return [(relative_base + (o & 0xFFFFFFFF)) & mask for o in offs], None
    o = np.frombuffer(offsets, dtype="<i4", count=num_syms).astype(np.int64)
    rb = np.uint64(relative_base & mask)
    neg = o < 0
    if neg.any():  # absolute per-cpu: off >= 0 is absolute, else relative_base - 1 - off
        a = np.where(neg, rb + (-o - 1).astype(np.uint64), o.astype(np.uint64))
    else:
        a = rb + (o & 0xFFFFFFFF).astype(np.uint64)
    return a.tolist(), a


def _expand(tokens: list[bytes], names: bytes, starts: list[int], lens: list[int]) -> list[str]:
    """Each entry's token indices expanded to its text (type letter + name).

    Why vectorised: a kernel has ~100k symbols and this is on the layer-0
    path. All entries are expanded at once by a numpy gather over the
    concatenated token table, with a separator token (index 256) in place of
    each entry's length byte(s); the per-entry loop is the fallback and the
    reference (same output).
    """
    try:
        import numpy as np  # noqa: PLC0415
    except ImportError:
        np = None  # type: ignore[assignment]
    if np is not None and starts:
        sep = b"\n"
        if not any(sep in t for t in tokens):
            end = starts[-1] + lens[-1]
            codes = np.frombuffer(names, dtype=np.uint8, count=end).astype(np.int32)
            st = np.asarray(starts, dtype=np.int64)
            ln = np.asarray(lens, dtype=np.int64)
            first = st - 1  # the (last) length byte before every entry
            big = (st - np.concatenate(([0], st[:-1] + ln[:-1]))) == 2  # a two-byte length
            codes[first] = 257  # an empty token ...
            codes[first[big] - 1] = 257  # ... also for a two-byte length's first byte
            codes[st[1:] - 1 - big[1:]] = 256  # a separator before every entry but the first
            codes = codes[codes != 257]
            tok = tokens + [sep, b""]
            tlen = np.fromiter((len(t) for t in tok), dtype=np.int64, count=len(tok))
            tstart = np.concatenate(([0], np.cumsum(tlen)[:-1]))
            table = np.frombuffer(b"".join(tok), dtype=np.uint8)
            out_len = tlen[codes]
            total = int(out_len.sum())
            if total:
                pos = np.cumsum(out_len) - out_len  # output start of each code
                idx = np.repeat(tstart[codes] - pos, out_len) + np.arange(total, dtype=np.int64)
                blob = table[idx].tobytes()
            else:
                blob = b""
            texts = blob.decode("latin-1").split("\n")
            if len(texts) == len(starts):
                return texts
    return [b"".join([tokens[b] for b in names[p : p + n]]).decode("latin-1") for p, n in zip(starts, lens)]


def _name_spans(num_syms: int, names: bytes) -> tuple[list[int], list[int]]:
    """Start and length (in token bytes) of every entry of ``kallsyms_names``.

    The walk is sequential (each length byte says where the next is) and on
    the layer-0 path, so the loop does no checks: a bad table shows up as an
    IndexError, a zero length or an end past the table, and then the checked
    walk (:func:`_name_spans_checked`) says where it went wrong.
    """
    starts = [0] * num_syms
    lens = [0] * num_syms
    pos = 0
    try:
        for i in range(num_syms):
            ln = names[pos]
            if ln > 0x7F:
                ln = (ln & 0x7F) | (names[pos + 1] << 7)
                pos += 2
            else:
                pos += 1
            starts[i] = pos
            lens[i] = ln
            pos += ln
    except IndexError:
        return _name_spans_checked(num_syms, names)
    if pos > len(names) or 0 in lens:
        return _name_spans_checked(num_syms, names)
    return starts, lens


def _name_spans_checked(num_syms: int, names: bytes) -> tuple[list[int], list[int]]:
    """:func:`_name_spans` with a check at every step, raising KallsymsError where the table is bad."""
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
    return _table(num, names, tt, ti, offs, rb)


def _table(
    num_syms: int, names: bytes, token_table: bytes, token_index: bytes, offsets: bytes, relative_base: int
) -> SymbolTable:
    """The symbol table, names left encoded (:class:`KallsymsTexts`) when it can be, else decoded."""
    _check_sizes(num_syms, token_index, offsets)
    tokens = _tokens(token_table, token_index)
    starts, lens = _name_spans(num_syms, names)
    texts = KallsymsTexts.build(tokens, names, starts, lens)
    if texts is None:
        return SymbolTable.from_columns(
            *decode_columns(num_syms, names, token_table, token_index, offsets, relative_base)
        )
    addrs, arr = _addresses(num_syms, offsets, relative_base)
    return SymbolTable.from_kallsyms(texts, addrs, arr)
