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

import struct
from dataclasses import dataclass

__all__ = ["BtfError", "Btf", "Member", "KIND"]

BTF_MAGIC = 0xEB9F
MAX_BTF = 64 << 20
KIND = {
    "int": 1, "ptr": 2, "array": 3, "struct": 4, "union": 5, "enum": 6, "fwd": 7, "typedef": 8,
    "volatile": 9, "const": 10, "restrict": 11, "func": 12, "func_proto": 13, "var": 14,
    "datasec": 15, "float": 16, "decl_tag": 17, "type_tag": 18, "enum64": 19,
}
_QUALIFIERS = {KIND["typedef"], KIND["volatile"], KIND["const"], KIND["restrict"], KIND["type_tag"]}


class BtfError(Exception):
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
        self.strings = blob[s0:s0 + str_len]
        self._types: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)]  # (kind, name_off, size_or_type, rec_off)
        self._vlen: list[int] = [0]
        self._kflag: list[int] = [0]
        self._by_name: dict[tuple[int, str], int] = {}
        self._parse(t0, t0 + type_len)

    def _parse(self, off: int, end: int) -> None:
        b = self.blob
        unpack = struct.unpack_from
        extra_fixed = {1: 4, 3: 12, 14: 4, 17: 4}
        extra_per = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}
        types = self._types
        while off + 12 <= end:
            name_off, info, st = unpack("<III", b, off)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            rec = off + 12
            if kind in extra_fixed:
                off = rec + extra_fixed[kind]
            elif kind in extra_per:
                off = rec + extra_per[kind] * vlen
            elif 1 <= kind <= 19:
                off = rec
            else:
                raise BtfError(f"BTF type {len(types)} has unknown kind {kind}")
            if off > end:
                raise BtfError(f"BTF type {len(types)} runs past the type section")
            types.append((kind, name_off, st, rec))
            self._vlen.append(vlen)
            self._kflag.append(info >> 31)
            if name_off and kind in (4, 5, 6, 8, 19, 1):
                key = (kind, self._str(name_off))
                self._by_name.setdefault(key, len(types) - 1)

    def _str(self, off: int) -> str:
        end = self.strings.find(b"\0", off)
        if off >= len(self.strings) or end < 0:
            return ""
        return self.strings[off:end].decode("ascii", "replace")

    def __len__(self) -> int:
        return len(self._types) - 1

    # -- lookups -------------------------------------------------------------
    def find(self, name: str, kind: str = "struct") -> int:
        tid = self._by_name.get((KIND[kind], name))
        if tid is None:
            raise BtfError(f"BTF has no {kind} {name}")
        return tid

    def _t(self, tid: int) -> tuple[int, int, int, int]:
        """Type record by id; ids come from untrusted data, so range-checked."""
        if not 0 < tid < len(self._types):
            raise BtfError(f"BTF type id {tid} outside the table")
        return self._types[tid]

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
        tid = self.resolve(tid)
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
        """``(byte offset, member type id)`` of ``path`` (``a.b.c``) in ``struct struct_name``."""
        tid = self._by_name.get((KIND["struct"], struct_name)) or self._by_name.get((KIND["union"], struct_name))
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

    def array_len(self, tid: int) -> int:
        tid = self.resolve(tid)
        kind, _, _, rec = self._t(tid)
        if kind != 3:
            raise BtfError(f"BTF type {tid} is not an array")
        return struct.unpack_from("<III", self.blob, rec)[2]

    def enum_values(self, name: str) -> dict[str, int]:
        tid = self.find(name, "enum")
        _, _, _, rec = self._t(tid)
        out = {}
        for i in range(self._vlen[tid]):
            n, v = struct.unpack_from("<Ii", self.blob, rec + 8 * i)
            out[self._str(n)] = v
        return out
