"""A small BTF reader: structure layouts from the kernel's own type info.

Why: drgn 0.3 has no BTF loader and a dump path has no vmlinux debug info,
yet walking tasks needs ``task_struct``'s layout. A kernel built with
``CONFIG_DEBUG_INFO_BTF`` keeps its ``.BTF`` section in memory between the
``__start_BTF`` and ``__stop_BTF`` symbols (found via kallsyms).

Format (include/uapi/linux/btf.h): a header (magic 0xEB9F, version 1,
flags, hdr_len, type_off, type_len, str_off, str_len), then type records
numbered from 1. Each is ``name_off, info, size_or_type`` (u32 each), with
``kind = (info >> 24) & 0x1f``, ``vlen = info & 0xffff``,
``kind_flag = info >> 31``, followed by kind-specific data. Only what layout
questions need is interpreted: structs/unions (members with bit offsets,
anonymous members searched through), pointers, arrays, typedefs and
qualifiers (skipped to the real type), ints, enums.
"""

from __future__ import annotations

import array
import struct
import sys
from dataclasses import dataclass
from typing import Any

from progdump.errors import ProgdumpError

__all__ = ["BtfError", "Btf", "Member", "KIND"]

BTF_MAGIC = 0xEB9F
MAX_BTF = 64 << 20
KIND = {
    "int": 1,
    "ptr": 2,
    "array": 3,
    "struct": 4,
    "union": 5,
    "enum": 6,
    "fwd": 7,
    "typedef": 8,
    "volatile": 9,
    "const": 10,
    "restrict": 11,
    "func": 12,
    "func_proto": 13,
    "var": 14,
    "datasec": 15,
    "float": 16,
    "decl_tag": 17,
    "type_tag": 18,
    "enum64": 19,
}
# record sizes in 4-byte words: the 12-byte header plus a fixed part, plus a part per vlen item; -1: no such kind
_FIXED_WORDS = [-1] * 32
_PER_WORDS = [0] * 32
for _k in range(1, 20):
    _FIXED_WORDS[_k] = 3 + {1: 1, 3: 3, 14: 1, 17: 1}.get(_k, 0)
    _PER_WORDS[_k] = {4: 3, 5: 3, 6: 2, 13: 2, 15: 3, 19: 3}.get(_k, 0)
_EAGER_RECORDS = 2048  # records walked by the constructor (and per step of a lookup's Python walk)
_PY_WALK_RECORDS = 2048  # beyond this many, a lookup walks the rest at once
_INDEXED = {4, 5, 6, 8, 19, 1}  # kinds found by name: struct, union, enum, typedef, enum64, int
_QUALIFIERS = {KIND["typedef"], KIND["volatile"], KIND["const"], KIND["restrict"], KIND["type_tag"]}


def _walk_numpy(words: array.array, n: int, start: int = 0) -> tuple[list[int], int | None]:
    """Word index of every record from word ``start`` on, and that of the malformed record that stopped it.

    The walk stays sequential, but each step is one array read: the record
    size at *every* word is computed at once (where the next record would
    start if a record started there, or a marker for "unknown kind / runs
    past the section").
    """
    import numpy as np  # noqa: PLC0415

    if n - start < 3:
        return [], None
    w = np.frombuffer(words, dtype=np.uint32, count=n)
    info = w[start + 1 : n - 1]  # record header at i = start .. n-3 (needs i + 3 <= n)
    kind = ((info >> 24) & 0x1F).astype(np.intp)
    fixed = np.array(_FIXED_WORDS, dtype=np.int64)[kind]
    nxt = np.arange(start, n - 2, dtype=np.int64) + fixed + np.array(_PER_WORDS, dtype=np.int64)[kind] * (info & 0xFFFF)
    bad = n + 1
    nxt[(fixed < 0) | (nxt > n)] = bad
    step = array.array("q")
    step.frombytes(nxt.tobytes())
    heads: list[int] = []
    append = heads.append
    i = start
    lim = n - 2
    while i < lim:
        append(i)
        i = step[i - start]
    if i == bad:
        return heads[:-1], heads[-1]
    return heads, None


class BtfError(ProgdumpError):
    """BTF data is absent or malformed; or a type/member is not in it."""


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int  # 0 unless a bitfield

    @property
    def offset(self) -> int:
        return self.bit_offset // 8


class Btf:
    """Parsed type table with name lookup and member offset resolution."""

    def __init__(self, blob: bytes) -> None:
        if len(blob) < 24 or len(blob) > MAX_BTF:
            raise BtfError(f"BTF blob of {len(blob)} bytes")
        magic, version, _flags, hdr_len = struct.unpack_from("<HBBI", blob, 0)
        if magic != BTF_MAGIC or version != 1:
            raise BtfError(f"not BTF (magic {magic:#x}, version {version})")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", blob, 8)
        t0 = hdr_len + type_off
        s0 = hdr_len + str_off
        if hdr_len < 24 or t0 + type_len > len(blob) or s0 + str_len > len(blob):
            raise BtfError("BTF header points outside the blob")
        self.blob = blob
        self.strings = blob[s0 : s0 + str_len]
        # columns per type id (0 is void): kind, name_off, size_or_type, record offset, vlen, kind_flag
        self._kind: list[int] = [0]
        self._nameoff: list[int] = [0]
        self._st: list[int] = [0]
        self._rec: list[int] = [0]
        self._vlen: list[int] = [0]
        self._kflag: list[int] = [0]
        self._found: dict[tuple[int, str], int | None] = {}
        self._members: dict[int, tuple[Member, ...]] = {}
        self._member_cache: dict[tuple[str, str], tuple[int, int]] = {}
        self._np_cols: tuple[int, Any, Any] | None = None  # (types covered, name_offs, kinds) for scans
        n = type_len // 4
        self._words = array.array("I")
        self._words.frombytes(blob[t0 : t0 + 4 * n])
        if sys.byteorder != "little":
            self._words.byteswap()
        self._t0, self._n, self._pos, self._done = t0, n, 0, False
        self._bad: BtfError | None = None  # the malformed record that stopped the walk
        self._walk_some(_EAGER_RECORDS)
        if self._bad is not None:
            raise self._bad

    # -- the walk --------------------------------------------------------------
    # Why lazy: the kernel's BTF has ~100k types and layer 0 needs a dozen,
    # all among the first thousand ids. Records are walked (sequentially:
    # each one's size depends on its kind and vlen) only as far as a lookup
    # needs; a long walk finishes the section at once with numpy
    # (:func:`_walk_numpy`). Malformed records raise BtfError when reached.
    def _walk_some(self, records: int) -> None:
        """Walk up to ``records`` more records in Python."""
        if self._done:
            return
        w, n, i = self._words, self._n, self._pos
        kinds, noffs, sts, recs, vlens, kflags = (
            self._kind,
            self._nameoff,
            self._st,
            self._rec,
            self._vlen,
            self._kflag,
        )
        base = self._t0 + 12
        for _ in range(records):
            if i + 3 > n:
                self._done = True
                break
            info = w[i + 1]
            kind = (info >> 24) & 0x1F
            fixed = _FIXED_WORDS[kind]
            if fixed < 0:
                self._bad = BtfError(f"BTF type {len(kinds)} has unknown kind {kind}")
                self._done = True
                break
            vlen = info & 0xFFFF
            nxt = i + fixed + _PER_WORDS[kind] * vlen
            if nxt > n:
                self._bad = BtfError(f"BTF type {len(kinds)} runs past the type section")
                self._done = True
                break
            kinds.append(kind)
            noffs.append(w[i])
            sts.append(w[i + 2])
            recs.append(base + 4 * i)
            vlens.append(vlen)
            kflags.append(info >> 31)
            i = nxt
        else:
            if i + 3 > n:
                self._done = True
        self._pos = i

    def _walk_rest(self) -> None:
        """Walk every remaining record (numpy when present)."""
        if self._done:
            return
        try:
            import numpy as np  # noqa: PLC0415
        except ImportError:
            while not self._done:
                self._walk_some(1 << 16)
            return
        heads, bad_at = _walk_numpy(self._words, self._n, self._pos)
        if heads:
            h = np.array(heads, dtype=np.int64)
            w = np.frombuffer(self._words, dtype=np.uint32, count=self._n)
            infos = w[h + 1]
            kinds, noffs = ((infos >> 24) & 0x1F).astype(np.uint8), w[h]
            # the scan columns: the Python-walked ids (and void) then these
            self._np_cols = (
                len(self._kind) + len(h),
                np.concatenate((np.array(self._nameoff, dtype=np.uint32), noffs)),
                np.concatenate((np.array(self._kind, dtype=np.uint8), kinds)),
            )
            self._kind += kinds.tolist()
            self._nameoff += noffs.tolist()
            self._st += w[h + 2].tolist()
            self._rec += (self._t0 + 12 + 4 * h).tolist()
            self._vlen += (infos & 0xFFFF).tolist()
            self._kflag += (infos >> 31).tolist()
        if bad_at is not None:  # the malformed record: one Python step names it
            self._pos = bad_at
            self._walk_some(1)
        self._pos, self._done = self._n, True

    def _walk_all(self) -> None:
        self._walk_rest()
        if self._bad is not None:
            raise self._bad

    def _walk_more(self) -> None:
        """One step of a lookup's walk: a short Python walk first, then the rest at once."""
        if len(self._kind) < _PY_WALK_RECORDS:
            self._walk_some(_EAGER_RECORDS)
        else:
            self._walk_rest()

    def _lookup(self, kind: int, name: str) -> int | None:
        """First type id of ``kind`` (an indexed kind) whose name is ``name``, or None."""
        key = (kind, name)
        if key in self._found:
            return self._found[key]
        tid = None
        if kind in _INDEXED:
            if name.isascii() and "\0" not in name and name:
                # every string offset whose C string is ``name`` (a whole string or a shared suffix)
                pat = name.encode() + b"\0"
                offs = set()
                p = self.strings.find(pat)
                while p >= 0:
                    if p:  # name_off 0 is the empty name, never indexed
                        offs.add(p)
                    p = self.strings.find(pat, p + 1)
                if offs:
                    lo = 1
                    while True:
                        hi = len(self._kind)
                        tid = self._scan(kind, offs, lo, hi)
                        if tid is not None:
                            break
                        if self._done:
                            if self._bad is not None:  # the answer may lie beyond the malformed record
                                raise self._bad
                            break
                        self._walk_more()
                        lo = hi
            else:  # not a name a caller asks for; compare as the full index would
                self._walk_all()
                tid = next(
                    (
                        t
                        for t in range(1, len(self._kind))
                        if self._kind[t] == kind and self._nameoff[t] and self._str(self._nameoff[t]) == name
                    ),
                    None,
                )
        self._found[key] = tid
        return tid

    def _scan(self, kind: int, offs: set[int], lo: int, hi: int) -> int | None:
        """First id in ``[lo, hi)`` of ``kind`` with a name offset in ``offs``."""
        if hi - lo <= 4 * _EAGER_RECORDS:
            kinds, noffs = self._kind, self._nameoff
            return next((t for t in range(lo, hi) if noffs[t] in offs and kinds[t] == kind), None)
        import numpy as np  # noqa: PLC0415  (only reached after a numpy walk)

        if self._np_cols is None or self._np_cols[0] < hi:
            self._np_cols = (
                len(self._kind),
                np.array(self._nameoff, dtype=np.uint32),
                np.array(self._kind, dtype=np.uint8),
            )
        _, no, kd = self._np_cols
        no = no[lo:hi]
        if len(offs) <= 8:  # the usual case: a name's string, perhaps a shared suffix
            named = np.zeros(len(no), dtype=bool)
            for o in offs:
                named |= no == o
        else:
            named = np.isin(no, np.array(sorted(offs), dtype=np.uint32))
        hit = np.flatnonzero(named & (kd[lo:hi] == kind))
        return lo + int(hit[0]) if len(hit) else None

    def _str(self, off: int) -> str:
        end = self.strings.find(b"\0", off)
        if off >= len(self.strings) or end < 0:
            return ""
        return self.strings[off:end].decode("ascii", "replace")

    def __len__(self) -> int:
        self._walk_all()
        return len(self._kind) - 1

    # -- lookups -------------------------------------------------------------
    def find(self, name: str, kind: str = "struct") -> int:
        tid = self._lookup(KIND[kind], name)
        if tid is None:
            raise BtfError(f"BTF has no {kind} {name}")
        return tid

    def _t(self, tid: int) -> tuple[int, int, int, int]:
        """Type record by id; ids come from untrusted data, so range-checked."""
        if tid >= len(self._kind):
            while tid >= len(self._kind) and not self._done:
                self._walk_more()
            if tid >= len(self._kind) and self._bad is not None:
                raise self._bad
        if not 0 < tid < len(self._kind):
            raise BtfError(f"BTF type id {tid} outside the table")
        return self._kind[tid], self._nameoff[tid], self._st[tid], self._rec[tid]

    def kind(self, tid: int) -> int:
        return self._t(tid)[0]

    def name(self, tid: int) -> str:
        return self._str(self._t(tid)[1])

    def resolve(self, tid: int) -> int:
        """Skip typedefs and qualifiers."""
        for _ in range(64):
            kind, _, st, _ = self._t(tid)
            if kind not in _QUALIFIERS:
                return tid
            tid = st
        raise BtfError("BTF qualifier chain too long")

    def sizeof(self, tid: int, _depth: int = 0) -> int:
        if _depth > 32:
            raise BtfError("BTF array nesting too deep (a loop?)")
        tid = self.resolve(tid)
        kind, _, st, rec = self._t(tid)
        if kind in (1, 4, 5, 6, 16, 19):
            return st
        if kind == 2:
            return 8
        if kind == 3:
            elem, _idx, n = struct.unpack_from("<III", self.blob, rec)
            return self.sizeof(elem, _depth + 1) * n
        raise BtfError(f"BTF type {tid} (kind {kind}) has no size")

    def struct_size(self, name: str) -> int:
        try:
            return self.sizeof(self.find(name, "struct"))
        except BtfError:
            return self.sizeof(self.find(name, "union"))

    def members(self, tid: int) -> list[Member]:
        """Members of a struct/union (cached: layouts ask for the same big structs many times)."""
        tid = self.resolve(tid)
        hit = self._members.get(tid)
        if hit is None:
            hit = self._members[tid] = tuple(self._read_members(tid))
        return list(hit)

    def _read_members(self, tid: int) -> list[Member]:
        kind, _, _, rec = self._t(tid)
        if kind not in (4, 5):
            raise BtfError(f"BTF type {tid} is not a struct or union")
        kflag = self._kflag[tid]
        out = []
        for i in range(self._vlen[tid]):
            name_off, mtype, moff = struct.unpack_from("<III", self.blob, rec + 12 * i)
            if kflag:
                out.append(Member(self._str(name_off), mtype, moff & 0xFFFFFF, moff >> 24))
            else:
                out.append(Member(self._str(name_off), mtype, moff, 0))
        return out

    def _member(self, tid: int, name: str, _depth: int = 0) -> tuple[int, Member] | None:
        """Find ``name`` in ``tid``, descending into anonymous members: (bit base, member)."""
        if _depth > 16:
            raise BtfError("BTF anonymous members nested too deep (a loop?)")
        for m in self.members(tid):
            if m.name == name:
                return 0, m
            if not m.name and self.kind(self.resolve(m.type_id)) in (4, 5):
                hit = self._member(m.type_id, name, _depth + 1)
                if hit is not None:
                    return m.bit_offset + hit[0], hit[1]
        return None

    def member(self, struct_name: str, path: str) -> tuple[int, int]:
        """``(byte offset, member type id)`` of ``path`` (``a.b.c``) in ``struct struct_name`` (cached)."""
        key = (struct_name, path)
        hit = self._member_cache.get(key)
        if hit is None:
            hit = self._member_cache[key] = self._find_member(struct_name, path)
        return hit

    def _find_member(self, struct_name: str, path: str) -> tuple[int, int]:
        tid = self._lookup(KIND["struct"], struct_name) or self._lookup(KIND["union"], struct_name)
        if tid is None:
            raise BtfError(f"BTF has no struct or union {struct_name}")
        bits = 0
        for part in path.split("."):
            hit = self._member(tid, part)
            if hit is None:
                raise BtfError(f"BTF: struct {struct_name} has no member {path}")
            base, m = hit
            bits += base + m.bit_offset
            tid = m.type_id
        return bits // 8, tid

    def offsetof(self, struct_name: str, path: str) -> int:
        return self.member(struct_name, path)[0]

    def enum_values(self, name: str) -> dict[str, int]:
        tid = self.find(name, "enum")
        _, _, _, rec = self._t(tid)
        out = {}
        for i in range(self._vlen[tid]):
            n, v = struct.unpack_from("<Ii", self.blob, rec + 8 * i)
            out[self._str(n)] = v
        return out
