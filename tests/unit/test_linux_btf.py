"""The BTF reader against blobs built from include/uapi/linux/btf.h."""

from __future__ import annotations

import struct

import pytest

from progdump.layers.linux.btf import Btf, BtfError


class BtfBuilder:
    def __init__(self) -> None:
        self.strings = b"\0"
        self.types = b""
        self.n = 0

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def add(self, kind: int, name: str, size_or_type: int, vlen: int = 0, kflag: int = 0, extra: bytes = b"") -> int:
        info = (kflag << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.s(name), info, size_or_type) + extra
        self.n += 1
        return self.n

    def struct(self, name: str, size: int, members: list[tuple[str, int, int, int]], union: bool = False) -> int:
        kflag = int(any(bf for *_, bf in members))
        extra = b""
        for mname, tid, bitoff, bf in members:
            extra += struct.pack("<III", self.s(mname), tid, (bf << 24 | bitoff) if kflag else bitoff)
        return self.add(5 if union else 4, name, size, len(members), kflag, extra)

    def blob(self) -> bytes:
        hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strings))
        return hdr + self.types + self.strings


def build() -> bytes:
    b = BtfBuilder()
    ulong = b.add(1, "long unsigned int", 8, extra=struct.pack("<I", 64))
    ptr = b.add(2, "", 3)  # forward reference to list_head, as BTF allows
    lh = b.struct("list_head", 16, [("next", ptr, 0, 0), ("prev", ptr, 64, 0)])
    assert lh == 3
    anon = b.struct("", 8, [("a", ulong, 0, 0), ("b", ulong, 0, 0)], union=True)
    u64 = b.add(8, "u64", ulong)
    cu64 = b.add(10, "", u64)
    arr = b.add(3, "", 0, extra=struct.pack("<III", ulong, ulong, 4))
    ts = b.struct(
        "task_struct",
        96,
        [
            ("__state", ulong, 0, 0),
            ("", anon, 64, 0),
            ("tasks", lh, 128, 0),
            ("flags3", ulong, 256, 3),
            ("sp", cu64, 320, 0),
            ("regs", arr, 384, 0),
        ],
    )
    b.add(6, "zone_stat_item", 4, 2, extra=struct.pack("<IiIi", b.s("NR_FREE_PAGES"), 0, b.s("NR_ZONE_LRU_BASE"), 1))
    return b.blob(), ts


def test_members_through_anonymous_unions_and_typedefs() -> None:
    blob, ts = build()
    btf = Btf(blob)
    assert btf.offsetof("task_struct", "tasks") == 16
    assert btf.offsetof("task_struct", "tasks.prev") == 24
    assert btf.offsetof("task_struct", "b") == 8  # inside the anonymous union
    assert btf.offsetof("task_struct", "sp") == 40
    off, tid = btf.member("task_struct", "sp")
    assert btf.sizeof(tid) == 8  # const u64 -> typedef -> int
    assert btf.sizeof(btf.member("task_struct", "regs")[1]) == 32
    assert btf.struct_size("task_struct") == 96
    assert btf.sizeof(btf.member("list_head", "next")[1]) == 8


def test_bitfield_members_with_kind_flag() -> None:
    blob, ts = build()
    m = [m for m in Btf(blob).members(ts) if m.name == "flags3"][0]
    assert (m.bit_offset, m.bitfield_size) == (256, 3)


def test_enum_values() -> None:
    blob, _ = build()
    assert Btf(blob).enum_values("zone_stat_item") == {"NR_FREE_PAGES": 0, "NR_ZONE_LRU_BASE": 1}


def test_missing_and_malformed() -> None:
    blob, _ = build()
    btf = Btf(blob)
    with pytest.raises(BtfError, match="no member nothere"):
        btf.offsetof("task_struct", "nothere")
    with pytest.raises(BtfError, match="no struct or union mm_struct"):
        btf.offsetof("mm_struct", "pgd")
    with pytest.raises(BtfError, match="not BTF"):
        Btf(b"\0" * 64)
    bad = bytearray(blob)
    struct.pack_into("<I", bad, 12, 1 << 20)  # type_len beyond the blob
    with pytest.raises(BtfError, match="outside"):
        Btf(bytes(bad))
    bad = bytearray(blob)
    bad[24 + 4 + 3] = 0x1F  # first type's kind byte: unknown kind 31
    with pytest.raises(BtfError, match="unknown kind"):
        Btf(bytes(bad))
