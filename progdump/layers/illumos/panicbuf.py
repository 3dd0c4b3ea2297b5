"""``panicbuf``: the panic message and registers illumos records at panic time.

Layout (illumos-gate ``usr/src/uts/common/sys/panic.h``; LP64, little-endian
on amd64)::

    char panicbuf[PANICBUFSIZE]            PANICBUFSIZE = 8192
    typedef struct panic_data {
        uint32_t   pd_version;             @0   PANICBUFVERS = 2
        uint32_t   pd_msgoff;              @4   byte offset of the message in panicbuf
        char       pd_uuid[36 + 1];        @8   image uuid, NUL-terminated
        panic_nv_t pd_nvdata[1];           @48  (aligned to 8: panic_nv_t holds a uint64_t)
    } panic_data_t;                        sizeof = 72
    typedef struct panic_nv {
        char     pnv_name[PANICNVNAMELEN]; @0   PANICNVNAMELEN = 16
        uint64_t pnv_value;                @16
    } panic_nv_t;                          sizeof = 24

The number of name/value pairs is, as the header says,
``(pd_msgoff - (sizeof (panic_data_t) - sizeof (panic_nv_t))) / sizeof (panic_nv_t)``;
the NUL-terminated message starts at ``pd_msgoff``. On amd64,
``panic_saveregs()`` (``i86pc/os/machdep.c``) records rdi, rsi, rdx, rcx, r8..r15,
rax, rbx, rbp, fsbase, gsbase, ds, es, fs, gs, trapno, err, rip, cs, rflags,
rsp, ss.

SPARC is big-endian: pass ``endian=">"``. The decoder never trusts the buffer:
offsets are bounded by the buffer, names must be printable.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from progdump.errors import ProgdumpError

__all__ = [
    "PANICBUFSIZE",
    "PANICBUFVERS",
    "PanicData",
    "PanicbufError",
    "decode_panicbuf",
    "PD_NVDATA_OFFSET",
    "PANIC_NV_SIZE",
]

PANICBUFSIZE = 8192
PANICBUFVERS = 2
PANICNVNAMELEN = 16
PD_NVDATA_OFFSET = 48  # 8 + 37 rounded up to 8
PANIC_NV_SIZE = PANICNVNAMELEN + 8
SIZEOF_PANIC_DATA = PD_NVDATA_OFFSET + PANIC_NV_SIZE  # 72


class PanicbufError(ProgdumpError, ValueError):
    """panicbuf does not hold a panic_data_t this decoder understands."""


@dataclass
class PanicData:
    version: int
    msgoff: int
    uuid: str
    registers: list[tuple[str, int]] = field(default_factory=list)  # in recorded order
    message: str = ""

    def regs(self) -> dict[str, int]:
        return dict(self.registers)


def _printable(b: bytes) -> bool:
    return all(0x20 <= c < 0x7F for c in b)


def decode_panicbuf(buf: bytes, endian: str = "<") -> PanicData:
    """Decode ``panicbuf`` bytes (at most :data:`PANICBUFSIZE` are looked at)."""
    buf = bytes(buf[:PANICBUFSIZE])
    if len(buf) < SIZEOF_PANIC_DATA:
        raise PanicbufError(f"panicbuf of {len(buf)} bytes is shorter than panic_data_t ({SIZEOF_PANIC_DATA})")
    version, msgoff = struct.unpack_from(endian + "II", buf, 0)
    if version == 0 and msgoff == 0:
        raise PanicbufError("panicbuf is empty (pd_version 0): the kernel has not panicked, or it was cleared")
    if version != PANICBUFVERS:
        raise PanicbufError(f"pd_version {version} (this decoder knows {PANICBUFVERS})")
    if not PD_NVDATA_OFFSET <= msgoff < len(buf):
        raise PanicbufError(f"pd_msgoff {msgoff} outside [{PD_NVDATA_OFFSET}, {len(buf)})")
    if (msgoff - PD_NVDATA_OFFSET) % PANIC_NV_SIZE:
        raise PanicbufError(f"pd_msgoff {msgoff} does not end a whole panic_nv_t array")
    uuid_raw = buf[8 : 8 + 37].split(b"\0", 1)[0]
    uuid = uuid_raw.decode("ascii", "replace") if _printable(uuid_raw) else ""
    regs: list[tuple[str, int]] = []
    for i in range((msgoff - PD_NVDATA_OFFSET) // PANIC_NV_SIZE):
        o = PD_NVDATA_OFFSET + i * PANIC_NV_SIZE
        name = buf[o : o + PANICNVNAMELEN].split(b"\0", 1)[0]
        if not name or not _printable(name):
            raise PanicbufError(f"pd_nvdata[{i}] has no printable name")
        (value,) = struct.unpack_from(endian + "Q", buf, o + PANICNVNAMELEN)
        regs.append((name.decode("ascii"), value))
    msg = buf[msgoff:].split(b"\0", 1)[0]
    return PanicData(version, msgoff, uuid, regs, msg.decode("utf-8", "replace").rstrip("\n"))
