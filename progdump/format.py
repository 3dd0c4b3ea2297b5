"""progdump on-disk format, version 1: struct layouts, magics, limits.

The normative description is ``docs/FORMAT.md``; requirement IDs (R-xxx) in
comments here point into it. This module is pure: it packs and parses bytes
and never touches a device. Everything it parses is untrusted: every parser
checks magic, checksum, version, reserved fields and bounds, and returns
``None`` or raises :class:`FormatError` with a message naming what is wrong.

Device map (R-MAP-1)::

    [0, 4096)               primary dump header     (DumpHeader, copy 0)
    [4096, S - 4096)        record log, from 4096 upward, records back to back
    [S - 4096, S)           backup dump header      (DumpHeader, copy 1)
    where S = device size rounded down to 4096

Checksums are XXH3 (xxhash): 64-bit over every header, 128-bit over payloads
and over a layer's record headers in the commit digest (R-SUM-1).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from enum import IntEnum

import xxhash

from progdump.errors import ProgdumpError

__all__ = [
    "FORMAT_VERSION",
    "FormatError",
    "RecordType",
    "Compression",
    "HEADER_MAGIC",
    "RECORD_MAGIC",
    "HEADER_BLOCK",
    "LOG_START",
    "RESYNC_WINDOW",
    "LANDING",
    "MAX_HOLE",
    "RECORD_ALIGN",
    "RECORD_HEADER_SIZE",
    "MAX_RAW_LEN",
    "MAX_PAGES_PER_RECORD",
    "MAX_STORED_LEN",
    "DumpHeader",
    "RecordHeader",
    "CommitInfo",
    "pack_header",
    "parse_header",
    "pack_record_header",
    "parse_record_header",
    "payload_checksum",
    "record_span",
    "log_end",
    "pack_commit",
    "parse_commit",
    "pages_map_len",
    "ARTIFACT_NAME_FIELD",
    "ARTIFACT_NAME_RE",
    "LAYER_NAME_RE",
    "MAX_ARTIFACT",
    "MAX_INFO_LEN",
    "MAX_LAYERS",
    "MAX_PFN_END",
    "MAX_ZERO_PAGES",
    "ALIGNMENTS",
    "UnsupportedError",
    "HeaderUnsupported",
    "RecordVersionError",
]

FORMAT_VERSION = 1

# Magics (R-MAG-1): 8 bytes each, PNG style. The leading 0x89 is not ASCII so
# a text file or console log never starts a match; "\r\n" catches line-ending
# conversion; the middle letters say what the block is to a human with a hex
# dump. A header and a record have different magics so a reader can never
# take one for the other.
HEADER_MAGIC = b"\x89PDHDR\r\n"
RECORD_MAGIC = b"\x89PDREC\r\n"

HEADER_BLOCK = 4096  # size of each dump header copy (R-MAP-1)
LOG_START = 4096  # first record offset (R-MAP-2)
RECORD_ALIGN = 512  # records start on, and are padded to, multiples of this (R-REC-1)
RECORD_HEADER_SIZE = 128

MAX_PAGES_PER_RECORD = 1024  # pages in one PAGES record (R-PAG-1)
MAX_RAW_LEN = (4 << 20) + 4096  # largest decompressed payload a reader accepts (R-LIM-1)
MAX_STORED_LEN = MAX_RAW_LEN  # writers store a payload uncompressed when zstd does not shrink it
MAX_INFO_LEN = HEADER_BLOCK - 128 - 8
#: R-RD-2: how far past a bad spot a reader searches byte by byte for the next record
RESYNC_WINDOW = 4 << 20
#: R-WR-7: after a failed write the writer restarts its log on a multiple of this
LANDING = 1 << 20
#: R-WR-7: the farthest a landing may lie past the last good write (a reader probes that far)
MAX_HOLE = 8 << 20
ARTIFACT_NAME_FIELD = 64  # bytes of NUL-padded name that lead every ARTIFACT payload
#: R-TYP-2: an artifact's name (the name field up to its first NUL; the rest of the field is NUL)
ARTIFACT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
#: R-TYP-2: the most bytes one artifact may hold (writers truncate and say so in the layer's notes)
MAX_ARTIFACT = 64 << 20
#: R-TYP-1: a layer name (header info ``layers``, LAYER_INFO ``name``); others are shown as ``layer<i>``
LAYER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}\Z")
#: R-LIM-2: layer indexes a reader reports (records of higher layers are ignored)
MAX_LAYERS = 64
#: R-PAG-4: PAGES and ZERO records end at or below this page frame (52-bit physical addresses)
MAX_PFN_END = 1 << 40
#: R-PAG-3: pages in one ZERO record (a u32 count; writers start a new record past it)
MAX_ZERO_PAGES = (1 << 32) - 1
#: R-HDR-4: the writer alignments a version-1 header may name (each divides 4096)
ALIGNMENTS = (512, 1024, 2048, 4096)


class FormatError(ProgdumpError, ValueError):
    """Bytes that do not follow the format; the message says which field and why."""


class UnsupportedError(FormatError):
    """A checksum-valid header or record that this reader cannot read (R-VER-1, R-VER-2).

    It was written by a newer format (or a writer that breaks version 1);
    its dump id and time come from the frozen fields every version keeps
    (R-VER-3), so the reader knows which dump it cannot read.
    """

    def __init__(self, message: str, dump_id: bytes, dump_time_ns: int, version: int) -> None:
        super().__init__(message)
        self.dump_id = dump_id
        self.dump_time_ns = dump_time_ns
        self.version = version


class HeaderUnsupported(UnsupportedError):
    """A checksum-valid dump header this reader cannot accept (R-HDR-2)."""


class RecordType(IntEnum):
    LAYER_INFO = 1  # JSON: layer name, plan, notes, producer (R-TYP-1)
    ARTIFACT = 2  # name field + a chunk of one artifact (R-TYP-2)
    PAGES = 3  # a run of page frames: zero map + data of non-zero pages (R-TYP-3)
    ZERO = 4  # a run of page frames known to be all zero; no payload (R-TYP-4)
    COMMIT = 5  # a layer's commit: seq range + digest over its records (R-COM-1)
    END = 6  # the writer stopped (all done, deadline, device full); JSON reason (R-TYP-6)


class Compression(IntEnum):
    NONE = 0
    ZSTD = 1


# --------------------------------------------------------------------------
# dump header (R-HDR-*)
#
#   off size
#   0   8   magic HEADER_MAGIC
#   8   2   u16 format version
#   10  2   u16 header block size (4096)
#   12  4   u32 incompatible feature flags (reader refuses unknown bits; v1: 0)
#   16  4   u32 compatible feature flags (reader ignores unknown bits; v1: 0)
#   20  2   u16 copy (0 primary at offset 0, 1 backup at the end)
#   22  2   u16 number of layers in the plan
#   24  16  dump id (random, 128 bits)
#   40  8   u64 dump time, ns since the Unix epoch (writer's wall clock)
#   48  8   u64 device size the writer saw
#   56  4   u32 writer alignment (max(512, device sector size))
#   60  4   u32 info length n (JSON at offset 128)
#   64  64  reserved, zero
#   128 n   UTF-8 JSON info
#   ..      zero up to 4088
#   4088 8  u64 XXH3-64 of bytes [0, 4088)
_HDR = struct.Struct("<8sHHIIHH16sQQII64s")
assert _HDR.size == 128


@dataclass(frozen=True)
class DumpHeader:
    version: int
    dump_id: bytes
    dump_time_ns: int
    device_size: int
    align: int
    copy: int
    nlayers: int
    info: dict
    incompat: int = 0
    compat: int = 0


def pack_header(h: DumpHeader) -> bytes:
    info = json.dumps(h.info, sort_keys=True, separators=(",", ":")).encode()
    if len(info) > MAX_INFO_LEN:
        raise FormatError(f"header info is {len(info)} bytes, more than {MAX_INFO_LEN}")
    head = _HDR.pack(
        HEADER_MAGIC, h.version, HEADER_BLOCK, h.incompat, h.compat, h.copy, h.nlayers,
        h.dump_id, h.dump_time_ns, h.device_size, h.align, len(info), bytes(64),
    )  # fmt: skip
    block = bytearray(HEADER_BLOCK)
    block[:128] = head
    block[128 : 128 + len(info)] = info
    block[HEADER_BLOCK - 8 :] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(block[: HEADER_BLOCK - 8])))
    return bytes(block)


def parse_header(block: bytes) -> DumpHeader | None:
    """A verified header, ``None`` when the block is not one (no magic, bad checksum).

    Raises :class:`HeaderUnsupported` for a block whose checksum is right but
    whose content this reader cannot accept (newer version, unknown
    incompatible flag, non-zero reserved or unused bytes, info too long or
    not a JSON object, block size, copy or alignment out of range): that is a
    real header of a dump this reader must not read (R-HDR-2, R-VER-1).
    """
    if len(block) < HEADER_BLOCK or block[:8] != HEADER_MAGIC:
        return None
    stored = struct.unpack_from("<Q", block, HEADER_BLOCK - 8)[0]
    if xxhash.xxh3_64_intdigest(bytes(block[: HEADER_BLOCK - 8])) != stored:
        return None
    (_, ver, size, incompat, compat, copy, nlayers, dump_id, t_ns, dev_size, align, info_len, reserved) = (
        _HDR.unpack_from(block, 0)
    )
    did = bytes(dump_id)

    def bad(why: str) -> HeaderUnsupported:
        return HeaderUnsupported(why, did, t_ns, ver)

    if ver != FORMAT_VERSION:
        raise bad(f"dump header format version {ver}; this reader knows version {FORMAT_VERSION}")
    if size != HEADER_BLOCK:
        raise bad(f"dump header size {size}, expected {HEADER_BLOCK}")
    if incompat:
        raise bad(f"dump header has unknown incompatible feature flags {incompat:#x}")
    if any(reserved):
        raise bad("dump header reserved bytes 64..127 are not zero")
    if info_len > MAX_INFO_LEN:
        raise bad(f"dump header info length {info_len} exceeds {MAX_INFO_LEN}")
    if any(block[128 + info_len : HEADER_BLOCK - 8]):
        raise bad("dump header bytes after the info are not zero")
    if copy > 1 or align not in ALIGNMENTS:
        raise bad(f"dump header copy {copy} or alignment {align} invalid")
    try:
        info = json.loads(bytes(block[128 : 128 + info_len]).decode())
        if not isinstance(info, dict):
            raise ValueError("not an object")
    except (ValueError, RecursionError) as e:
        raise bad(f"dump header info is not a JSON object: {type(e).__name__}") from None
    return DumpHeader(ver, bytes(dump_id), t_ns, dev_size, align, copy, nlayers, info, incompat, compat)


# --------------------------------------------------------------------------
# record header (R-REC-*)
#
#   off size
#   0   8   magic RECORD_MAGIC
#   8   2   u16 format version
#   10  2   u16 header size (128)
#   12  2   u16 record type (RecordType)
#   14  2   u16 layer index
#   16  16  dump id
#   32  8   u64 dump time ns (same value as the dump header's)
#   40  8   u64 sequence number (0, 1, 2 ... per dump, in write order)
#   48  8   u64 device offset of this record (self-locating)
#   56  4   u32 stored payload length (bytes after the header, before padding)
#   60  4   u32 raw payload length (after decompression)
#   64  8   u64 aux0 (PAGES/ZERO: first pfn; ARTIFACT: chunk offset; else 0)
#   72  8   u64 aux1 (PAGES/ZERO: page count; ARTIFACT: total artifact length; else 0)
#   80  1   u8 compression (Compression)
#   81  7   reserved, zero
#   88  16  XXH3-128 of the stored payload (big-endian digest bytes, as xxhash gives them)
#   104 16  reserved, zero
#   120 8   u64 XXH3-64 of bytes [0, 120)
_REC = struct.Struct("<8sHHHH16sQQQIIQQB7s16s16s")
assert _REC.size == 120


@dataclass(frozen=True)
class RecordHeader:
    rtype: int
    layer: int
    dump_id: bytes
    dump_time_ns: int
    seq: int
    offset: int
    stored_len: int
    raw_len: int
    aux0: int
    aux1: int
    compression: int
    payload_sum: bytes
    raw_header: bytes = b""  # the 128 bytes as on the device (for the commit digest)

    @property
    def span(self) -> int:
        return record_span(self.stored_len)


def record_span(stored_len: int, align: int = RECORD_ALIGN) -> int:
    """Bytes a record with ``stored_len`` payload bytes occupies on the device."""
    n = RECORD_HEADER_SIZE + stored_len
    return n + (-n % align)


def payload_checksum(data: bytes | bytearray | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


def pack_record_header(
    rtype: int, layer: int, dump_id: bytes, dump_time_ns: int, seq: int, offset: int,
    stored_len: int, raw_len: int, aux0: int, aux1: int, compression: int, payload_sum: bytes,
) -> bytes:  # fmt: skip
    head = _REC.pack(
        RECORD_MAGIC, FORMAT_VERSION, RECORD_HEADER_SIZE, rtype, layer, dump_id, dump_time_ns, seq, offset,
        stored_len, raw_len, aux0, aux1, compression, bytes(7), payload_sum, bytes(16),
    )  # fmt: skip
    return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head))


class RecordVersionError(UnsupportedError):
    """A record whose checksum verifies but whose version or fields this reader does not know (R-VER-2)."""


def parse_record_header(buf: bytes | memoryview, at_offset: int) -> RecordHeader | None:
    """A verified record header read at device offset ``at_offset``, or ``None``.

    ``None`` means "not a valid record here": wrong magic, bad checksum, or a
    record that says it lives elsewhere (a stale copy). A checksum-valid
    header with an unknown version, type, compression or non-zero reserved
    bytes raises :class:`RecordVersionError` (R-VER-2).
    """
    if len(buf) < RECORD_HEADER_SIZE or bytes(buf[:8]) != RECORD_MAGIC:
        return None
    raw = bytes(buf[:RECORD_HEADER_SIZE])
    if xxhash.xxh3_64_intdigest(raw[:120]) != struct.unpack_from("<Q", raw, 120)[0]:
        return None
    (_, ver, hsize, rtype, layer, dump_id, t_ns, seq, offset, stored, rawlen, aux0, aux1, comp, res1, psum, res2) = (
        _REC.unpack_from(raw, 0)
    )
    if offset != at_offset:
        return None  # R-REC-3: a record is only valid where it says it is
    did = bytes(dump_id)

    def bad(why: str) -> RecordVersionError:
        return RecordVersionError(f"record at {at_offset:#x}: {why}", did, t_ns, ver)

    if ver != FORMAT_VERSION or hsize != RECORD_HEADER_SIZE:
        raise bad(f"format version {ver}, header size {hsize}")
    if any(res1) or any(res2):
        raise bad("reserved bytes are not zero")
    if rtype not in RecordType._value2member_map_:
        raise bad(f"unknown record type {rtype}")
    if comp not in Compression._value2member_map_:
        raise bad(f"unknown compression {comp}")
    if stored > rawlen or rawlen > MAX_RAW_LEN:
        raise bad(f"payload lengths {stored}/{rawlen} exceed the limits")
    if comp == Compression.NONE and stored != rawlen:
        raise bad("uncompressed payload with stored != raw length")
    return RecordHeader(
        rtype, layer, bytes(dump_id), t_ns, seq, offset, stored, rawlen, aux0, aux1, comp, bytes(psum), raw
    )


def log_end(device_size: int) -> int:
    """End of the record log: where the backup header starts (R-MAP-1)."""
    return (device_size - device_size % HEADER_BLOCK) - HEADER_BLOCK


def pages_map_len(npages: int) -> int:
    """Bytes of the zero map that leads a PAGES payload: one bit per page, padded to 8 bytes."""
    n = (npages + 7) // 8
    return n + (-n % 8)


# --------------------------------------------------------------------------
# commit payload (R-COM-*)
#
#   off size
#   0   8   u64 first sequence number of the layer's records
#   8   8   u64 number of records in the layer (the commit itself excluded)
#   16  16  XXH3-128 over the 128-byte headers of those records, in sequence order
#   32  8   u64 sum of stored payload bytes of those records
#   40  8   f64 device clock when the layer's records were flushed (seconds)
#   48  16  reserved, zero
#   64  n   UTF-8 JSON: statistics (pages, zero pages, artifacts; informative only)
_COMMIT = struct.Struct("<QQ16sQd16s")
assert _COMMIT.size == 64


@dataclass(frozen=True)
class CommitInfo:
    first_seq: int
    count: int
    digest: bytes
    payload_bytes: int
    t_flushed: float
    stats: dict


def pack_commit(c: CommitInfo) -> bytes:
    return (
        _COMMIT.pack(c.first_seq, c.count, c.digest, c.payload_bytes, c.t_flushed, bytes(16))
        + json.dumps(c.stats, sort_keys=True, separators=(",", ":")).encode()
    )


def parse_commit(payload: bytes) -> CommitInfo:
    if len(payload) < _COMMIT.size:
        raise FormatError("commit payload shorter than 64 bytes")
    first, count, digest, nbytes, t, res = _COMMIT.unpack_from(payload, 0)
    if any(res):
        raise FormatError("commit reserved bytes are not zero")
    try:
        stats = json.loads(payload[_COMMIT.size :].decode()) if len(payload) > _COMMIT.size else {}
    except (ValueError, RecursionError):
        raise FormatError("commit statistics are not JSON") from None
    if not isinstance(stats, dict):
        raise FormatError("commit statistics are not a JSON object")  # R-JSON-1
    return CommitInfo(first, count, bytes(digest), nbytes, t, stats)
