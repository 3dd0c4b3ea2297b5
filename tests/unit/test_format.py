"""docs/FORMAT.md layouts: headers and records pack, parse, and refuse what they must."""

from __future__ import annotations

import os
import struct

import pytest
import xxhash

from progdump import format as F


def _hdr(**kw) -> F.DumpHeader:
    base = dict(version=1, dump_id=bytes(range(16)), dump_time_ns=123456789, device_size=1 << 20, align=512,
                copy=0, nlayers=5, info={"plan": "progressive", "layers": ["a", "b"]})  # fmt: skip
    base.update(kw)
    return F.DumpHeader(**base)


def _reseal_header(block: bytearray) -> bytes:
    block[4088:] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(block[:4088])))
    return bytes(block)


def _rec(offset: int = 8192, **kw) -> bytes:
    args = dict(rtype=F.RecordType.PAGES, layer=2, dump_id=b"\x11" * 16, dump_time_ns=99, seq=7, offset=offset,
                stored_len=100, raw_len=200, aux0=5, aux1=6, compression=F.Compression.ZSTD, payload_sum=b"\x22" * 16)  # fmt: skip
    args.update(kw)
    return F.pack_record_header(**args)


def _reseal_record(raw: bytearray) -> bytes:
    raw[120:128] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(raw[:120])))
    return bytes(raw)


def test_R_HDR_header_roundtrip():
    h = _hdr()
    b = F.pack_header(h)
    assert len(b) == F.HEADER_BLOCK and b[:8] == F.HEADER_MAGIC
    assert F.parse_header(b) == h


def test_R_HDR_2_every_header_byte_flipped_is_rejected():
    """R-HDR-2: any single corrupted byte of the used header area makes the header invalid."""
    b = F.pack_header(_hdr())
    info_end = 128 + len(b[128:4088].rstrip(b"\0"))
    for i in list(range(0, info_end)) + list(range(4088, 4096)) + [2000, 4087]:
        c = bytearray(b)
        c[i] ^= 0x01
        assert F.parse_header(bytes(c)) is None, f"flip at byte {i} accepted"


@pytest.mark.parametrize(
    "off,value,why",
    [(8, struct.pack("<H", 2), "version"), (12, struct.pack("<I", 1), "incompatible"), (70, b"\x01", "reserved"),
     (3000, b"\x01", "padding"), (10, struct.pack("<H", 512), "size")],
)  # fmt: skip
def test_R_VER_1_checksum_valid_but_unsupported_header_raises(off, value, why):
    """R-VER-1: a real header the reader cannot accept is reported, never used."""
    c = bytearray(F.pack_header(_hdr()))
    c[off : off + len(value)] = value
    with pytest.raises(F.FormatError):
        F.parse_header(_reseal_header(c))


def test_R_HDR_2_unknown_compat_flags_are_ignored():
    c = bytearray(F.pack_header(_hdr()))
    c[16:20] = struct.pack("<I", 0x80)
    assert F.parse_header(_reseal_header(c)).compat == 0x80


def test_R_REC_2_record_roundtrip():
    raw = _rec()
    h = F.parse_record_header(raw, 8192)
    assert (h.rtype, h.layer, h.seq, h.offset, h.stored_len, h.raw_len, h.aux0, h.aux1) == (
        3,
        2,
        7,
        8192,
        100,
        200,
        5,
        6,
    )
    assert h.raw_header == raw and len(raw) == F.RECORD_HEADER_SIZE


def test_R_REC_4_every_record_header_byte_flipped_is_rejected():
    """Every field of a record header, flipped (one bit of each byte), fails the header checksum."""
    raw = _rec()
    for i in range(F.RECORD_HEADER_SIZE):
        for bit in (0, 7):
            c = bytearray(raw)
            c[i] ^= 1 << bit
            assert F.parse_record_header(bytes(c), 8192) is None, f"byte {i} bit {bit}"


def test_R_REC_3_record_valid_only_at_its_own_offset():
    assert F.parse_record_header(_rec(8192), 8704) is None


@pytest.mark.parametrize(
    "off,value",
    [(8, struct.pack("<H", 2)), (81, b"\x01"), (110, b"\x01"), (12, struct.pack("<H", 99)), (80, b"\x07"),
     (60, struct.pack("<I", F.MAX_RAW_LEN + 1))],
)  # fmt: skip
def test_R_VER_2_checksum_valid_unknown_record_raises(off, value):
    c = bytearray(_rec())
    c[off : off + len(value)] = value
    with pytest.raises(F.RecordVersionError):
        F.parse_record_header(_reseal_record(c), 8192)


def test_R_REC_4_stored_longer_than_raw_or_uncompressed_mismatch_refused():
    with pytest.raises(F.RecordVersionError):
        F.parse_record_header(_rec(stored_len=300, raw_len=200), 8192)
    with pytest.raises(F.RecordVersionError):
        F.parse_record_header(_rec(compression=F.Compression.NONE, stored_len=100, raw_len=200), 8192)


def test_R_REC_1_record_span_aligned():
    assert F.record_span(0) == 512
    assert F.record_span(384) == 512
    assert F.record_span(385) == 1024
    assert F.record_span(100, 4096) == 4096


def test_R_MAP_1_log_end_leaves_backup_header():
    assert F.log_end(1 << 20) == (1 << 20) - 4096
    assert F.log_end((1 << 20) + 100) == (1 << 20) - 4096


def test_R_COM_commit_roundtrip_and_reserved():
    c = F.CommitInfo(3, 9, b"\x33" * 16, 12345, 0.25, {"pages": 4})
    p = F.pack_commit(c)
    assert F.parse_commit(p) == c
    bad = bytearray(p)
    bad[50] = 1
    with pytest.raises(F.FormatError):
        F.parse_commit(bytes(bad))
    with pytest.raises(F.FormatError):
        F.parse_commit(b"short")


def test_R_PAG_1_map_len():
    assert F.pages_map_len(1) == 8
    assert F.pages_map_len(64) == 8
    assert F.pages_map_len(65) == 16
    assert F.pages_map_len(256) == 32


def test_R_MAG_1_magics_distinct_and_non_ascii():
    assert F.HEADER_MAGIC != F.RECORD_MAGIC
    for m in (F.HEADER_MAGIC, F.RECORD_MAGIC):
        assert len(m) == 8 and m[0] == 0x89 and m.endswith(b"\r\n")


def test_random_blocks_never_parse():
    rng = os.urandom
    for _ in range(200):
        assert F.parse_record_header(F.RECORD_MAGIC + rng(120), 4096) is None
        assert F.parse_header(F.HEADER_MAGIC + rng(4088)) is None


def test_every_requirement_id_is_cited_by_a_test():
    """Each R-xxx of docs/FORMAT.md appears (as R-X-n or R_X_n) in some test of the format's tests."""
    import glob
    import re

    here = os.path.dirname(os.path.abspath(__file__))
    doc = open(os.path.join(here, "..", "..", "docs", "FORMAT.md")).read()
    ids = set(re.findall(r"R-[A-Z]+-\d+", doc))
    assert len(ids) > 20
    text = ""
    for pat in ("test_format*.py", "test_writer*.py", "test_reader*.py", "test_cli*.py", "test_device*.py"):
        for f in glob.glob(os.path.join(here, pat)):
            text += open(f).read()
    uncited = sorted(i for i in ids if i not in text and i.replace("-", "_") not in text)
    assert not uncited, f"requirement IDs no test cites: {uncited}"
