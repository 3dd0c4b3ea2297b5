"""The kernel log, read from the lockless printk ring buffer (Linux 5.10+).

Why: the log is the first thing an operator reads after a panic, and it is
in memory even when the console missed the tail. VMCOREINFO publishes
``SYMBOL(prb)`` (a pointer to the ``struct printk_ringbuffer``) and every
offset and size the reader needs, so no debug info is used.

Layout (kernel/printk/printk_ringbuffer.h):

* ``desc_ring``: ``count_bits``, ``descs`` (``prb_desc``: ``state_var``,
  ``text_blk_lpos{begin,next}``), ``infos`` (``printk_info``: ``seq``,
  ``ts_nsec``, ``text_len``, ``caller_id``, ``dev_info``), ``head_id``,
  ``tail_id``. ``state_var``'s top two bits are the state (0 reserved,
  1 committed, 2 finalized, 3 reusable), the rest the descriptor id.
* ``text_data_ring``: ``size_bits``, ``data``, ``head_lpos``, ``tail_lpos``;
  a data block is ``unsigned long id`` then the text (a block whose id is
  not its descriptor's was reused: the record is skipped). A block whose
  ``begin`` and ``next`` lie in different wraps of the ring starts at
  offset 0 of the data array. ``begin & 1`` marks a data-less block.

Records are emitted in descriptor-id order from tail to head, which is
sequence order. Formatting follows ``makedumpfile --dump-dmesg``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from progdump.errors import ProgdumpError

__all__ = ["LogRecord", "PrintkError", "read_log", "ring_geometry", "ring_regions", "format_records", "escape_text"]

DESC_SV_BITS = 64
DESC_FLAGS_SHIFT = DESC_SV_BITS - 2
DESC_FLAGS_MASK = 3 << DESC_FLAGS_SHIFT
DESC_ID_MASK = (1 << 64) - 1 & ~DESC_FLAGS_MASK
STATE_COMMITTED = 1
STATE_FINALIZED = 2
STATE_REUSABLE = 3
MAX_COUNT_BITS = 24  # 16 Mi descriptors: far above any real log_buf_len
MAX_SIZE_BITS = 28  # 256 MiB text ring (log_buf_len far above any real setting)
MAX_RING_BYTES = 512 << 20  # descriptors + infos + text read at once


class PrintkError(ProgdumpError):
    """The ring buffer cannot be read; the message names what failed."""


@dataclass(frozen=True)
class LogRecord:
    seq: int
    ts_nsec: int
    text: bytes
    caller_id: int = 0
    facility_level: int = 0
    subsystem: str = ""
    device: str = ""


@dataclass(frozen=True)
class _Layout:
    """The VMCOREINFO offsets the reader uses (pure data: tests build it)."""

    rb_desc_ring: int
    rb_text_data_ring: int
    dr_count_bits: int
    dr_descs: int
    dr_infos: int
    dr_head_id: int
    dr_tail_id: int
    desc_size: int
    desc_state_var: int
    desc_text_blk_lpos: int
    lpos_begin: int
    lpos_next: int
    info_size: int
    info_seq: int
    info_ts_nsec: int
    info_text_len: int
    info_caller_id: int
    info_dev_info: int
    dev_subsystem: int
    dev_device: int
    len_subsystem: int
    len_device: int
    data_size_bits: int
    data_data: int
    data_head_lpos: int
    data_tail_lpos: int

    @classmethod
    def from_vmcoreinfo(cls, v) -> _Layout:  # type: ignore[no-untyped-def]
        return cls(
            rb_desc_ring=v.offset("printk_ringbuffer.desc_ring"),
            rb_text_data_ring=v.offset("printk_ringbuffer.text_data_ring"),
            dr_count_bits=v.offset("prb_desc_ring.count_bits"),
            dr_descs=v.offset("prb_desc_ring.descs"),
            dr_infos=v.offset("prb_desc_ring.infos"),
            dr_head_id=v.offset("prb_desc_ring.head_id"),
            dr_tail_id=v.offset("prb_desc_ring.tail_id"),
            desc_size=v.size("prb_desc"),
            desc_state_var=v.offset("prb_desc.state_var"),
            desc_text_blk_lpos=v.offset("prb_desc.text_blk_lpos"),
            lpos_begin=v.offset("prb_data_blk_lpos.begin"),
            lpos_next=v.offset("prb_data_blk_lpos.next"),
            info_size=v.size("printk_info"),
            info_seq=v.offset("printk_info.seq"),
            info_ts_nsec=v.offset("printk_info.ts_nsec"),
            info_text_len=v.offset("printk_info.text_len"),
            info_caller_id=v.offset("printk_info.caller_id"),
            info_dev_info=v.offset("printk_info.dev_info"),
            dev_subsystem=v.offset("dev_printk_info.subsystem"),
            dev_device=v.offset("dev_printk_info.device"),
            len_subsystem=v.length("printk_info_subsystem"),
            len_device=v.length("printk_info_device"),
            data_size_bits=v.offset("prb_data_ring.size_bits"),
            data_data=v.offset("prb_data_ring.data"),
            data_head_lpos=v.offset("prb_data_ring.head_lpos"),
            data_tail_lpos=v.offset("prb_data_ring.tail_lpos"),
        )


def ring_geometry(mem, vmcoreinfo) -> tuple:  # type: ignore[no-untyped-def]
    """Where the ring lives: ``(layout, count_bits, size_bits, descs_va, infos_va, data_va, head_id, tail_id)``.

    Reads only the ring's headers (a few words). Shared by :func:`read_log`
    and by layer 0's raw capture, which copies the ring's pages without
    decoding them (rawpanic.py). Raises :class:`PrintkError`.
    """
    from progdump.layers.linux.translate import FaultError
    from progdump.layers.linux.vmcoreinfo import VmcoreinfoMissing

    try:
        L = _Layout.from_vmcoreinfo(vmcoreinfo)
        prb = mem.u64(vmcoreinfo.symbol("prb"))
        dr = prb + L.rb_desc_ring
        tr = prb + L.rb_text_data_ring
        count_bits = mem.u32(dr + L.dr_count_bits)
        size_bits = mem.u32(tr + L.data_size_bits)
        if not 0 < count_bits <= min(MAX_COUNT_BITS, size_bits) or not 0 < size_bits <= MAX_SIZE_BITS:
            raise PrintkError(f"printk ring sizes out of range (count_bits {count_bits}, size_bits {size_bits})")
        if (1 << count_bits) * (L.desc_size + L.info_size) + (1 << size_bits) > MAX_RING_BYTES:
            raise PrintkError(f"printk ring of 2^{count_bits} records / 2^{size_bits} bytes exceeds the read budget")
        return (
            L,
            count_bits,
            size_bits,
            mem.u64(dr + L.dr_descs),
            mem.u64(dr + L.dr_infos),
            mem.u64(tr + L.data_data),
            mem.u64(dr + L.dr_head_id),
            mem.u64(dr + L.dr_tail_id),
        )
    except VmcoreinfoMissing as e:
        raise PrintkError(f"printk ring buffer: {e}") from None
    except FaultError as e:
        raise PrintkError(f"printk ring buffer unreadable: {e}") from None


def ring_regions(mem, vmcoreinfo) -> list[tuple[str, int, int]]:  # type: ignore[no-untyped-def]
    """``(what, va, length)`` of the descriptor, info and text arrays (what read_log reads)."""
    L, count_bits, size_bits, descs_va, infos_va, data_va, _, _ = ring_geometry(mem, vmcoreinfo)
    count = 1 << count_bits
    return [
        ("printk descs", descs_va, count * L.desc_size),
        ("printk infos", infos_va, count * L.info_size),
        ("printk text", data_va, 1 << size_bits),
    ]


def read_log(mem, vmcoreinfo, max_records: int = 1 << 20) -> tuple[list[LogRecord], list[str]]:  # type: ignore[no-untyped-def]
    """All readable records, oldest first, and notes on what was skipped.

    Raises :class:`PrintkError` only when the ring itself is unusable (missing
    VMCOREINFO fields, unreadable ring headers); single bad records are skipped
    with a note.
    """
    from progdump.layers.linux.translate import FaultError

    L, count_bits, size_bits, descs_va, infos_va, data_va, head_id, tail_id = ring_geometry(mem, vmcoreinfo)
    count = 1 << count_bits
    size = 1 << size_bits
    try:
        descs = mem.read(descs_va, count * L.desc_size)
        infos = mem.read(infos_va, count * L.info_size)
        data = mem.read(data_va, size)
    except FaultError as e:
        raise PrintkError(f"printk ring buffer unreadable: {e}") from None
    return parse_ring(L, count_bits, size_bits, descs, infos, data, head_id, tail_id, max_records)


def parse_ring(
    L: _Layout,
    count_bits: int,
    size_bits: int,
    descs: bytes,
    infos: bytes,
    data: bytes,
    head_id: int,
    tail_id: int,
    max_records: int = 1 << 20,
) -> tuple[list[LogRecord], list[str]]:
    """Walk descriptors ``tail_id .. head_id`` over raw ring bytes (pure)."""
    count = 1 << count_bits
    size = 1 << size_bits
    notes: list[str] = []
    out: list[LogRecord] = []
    skipped = 0
    n = ((head_id - tail_id) & DESC_ID_MASK) + 1
    if n > count:
        notes.append(f"printk head/tail ids inconsistent ({tail_id:#x}..{head_id:#x}); reading the last {count}")
        n = count
        tail_id = (head_id - count + 1) & DESC_ID_MASK
    for k in range(min(n, max_records)):
        did = (tail_id + k) & DESC_ID_MASK
        i = did % count
        d = i * L.desc_size
        sv = struct.unpack_from("<Q", descs, d + L.desc_state_var)[0]
        state = sv >> DESC_FLAGS_SHIFT
        if (sv & DESC_ID_MASK) == did and state == STATE_REUSABLE:
            continue  # recycled (or the ring's initial placeholder): no record, nothing lost now
        if (sv & DESC_ID_MASK) != did or state not in (STATE_COMMITTED, STATE_FINALIZED):
            skipped += 1
            continue
        begin, nxt = struct.unpack_from("<QQ", descs, d + L.desc_text_blk_lpos + min(L.lpos_begin, L.lpos_next))
        if L.lpos_begin > L.lpos_next:
            begin, nxt = nxt, begin
        io = i * L.info_size
        seq, ts = (
            struct.unpack_from("<QQ", infos, io + L.info_seq)[0],
            struct.unpack_from("<Q", infos, io + L.info_ts_nsec)[0],
        )
        text_len = struct.unpack_from("<H", infos, io + L.info_text_len)[0]
        caller = struct.unpack_from("<I", infos, io + L.info_caller_id)[0]
        flev = infos[io + L.info_text_len + 2] if io + L.info_text_len + 3 <= len(infos) else 0
        dev = io + L.info_dev_info
        subsys = infos[dev + L.dev_subsystem : dev + L.dev_subsystem + L.len_subsystem].split(b"\0")[0]
        device = infos[dev + L.dev_device : dev + L.dev_device + L.len_device].split(b"\0")[0]
        if begin & 1 and begin == nxt:
            text = b""  # data-less record (the text was lost or empty)
        else:
            got = _block_text(begin, nxt, size, data, did)
            if got is None:
                skipped += 1
                continue
            text = got
            text = text[:text_len]
        out.append(
            LogRecord(seq, ts, text, caller, flev, subsys.decode("ascii", "replace"), device.decode("ascii", "replace"))
        )
    if skipped:
        notes.append(f"printk: {skipped} descriptors skipped (still reserved, or id/text inconsistent)")
    out.sort(key=lambda r: r.seq)
    return out, notes


def _block_text(begin: int, nxt: int, size: int, data: bytes, expect_id: int | None = None) -> bytes | None:
    """The text of the data block at ``[begin, next)`` (logical positions)."""
    if nxt <= begin or nxt - begin > size:
        return None
    bo = begin % size
    if begin // size != nxt // size:  # wrapped: the block sits at the ring's start
        if nxt % size == 0:
            end = size  # ends exactly at the ring end, no wrap needed
        else:
            bo = 0
            end = nxt % size
    else:
        end = nxt % size if nxt % size else size
    if end - bo < 8:
        return None
    if expect_id is not None and struct.unpack_from("<Q", data, bo)[0] != expect_id:
        return None  # the block was reused by a newer record
    return data[bo + 8 : end]


_PRINTABLE = bytes(range(0x20, 0x7F)) + b"\t\n"
_ESCAPES = {b: f"\\x{b:02x}" for b in range(256) if b not in _PRINTABLE}


def escape_text(text: bytes) -> str:
    """Printable text as makedumpfile prints it: non-printables as ``\\xNN``.

    (Two C-speed passes instead of a loop per byte: the whole log is escaped
    on the layer-0 path.)
    """
    if not text.translate(None, _PRINTABLE):  # nothing to escape
        return text.decode("ascii")
    return text.decode("latin-1").translate(_ESCAPES)


def format_records(records: list[LogRecord]) -> str:
    """``[    5.123456] text`` lines, one per record (makedumpfile's form).

    A record holding several lines has its continuation lines indented by
    the width of the timestamp prefix, as ``makedumpfile --dump-dmesg``
    prints them (checked against makedumpfile 1.7.2 on a real guest's
    vmcore: tests/unit/test_linux_printk.py).
    """
    lines = []
    for r in records:
        sec, ns = divmod(r.ts_nsec, 1_000_000_000)
        prefix = f"[{sec:5d}.{ns // 1000:06d}] "
        text = escape_text(r.text)
        if "\n" in text:
            text = text.replace("\n", "\n" + " " * len(prefix))
        lines.append(f"{prefix}{text}\n")
    return "".join(lines)
