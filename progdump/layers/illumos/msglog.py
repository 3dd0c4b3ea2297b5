"""The illumos kernel message log, from ``log_recentq``.

illumos keeps no linear message buffer. ``strlog``/``cmn_err`` messages are
STREAMS messages; ``log_recentq`` (``static queue_t *`` in
``usr/src/uts/common/os/log.c``) holds the recent ones, which is what
``mdb ::msgbuf`` walks: from ``q_first`` along ``b_next``; each message's
first block holds a ``log_ctl_t`` at ``b_rptr`` and the text is in the
continuation block ``b_cont`` (``b_rptr`` .. ``b_wptr``, NUL-terminated).

Layouts (LP64; the manifest's ``mdb ::offsetof`` values win where present):

* ``queue_t`` (``usr/src/uts/common/sys/stream.h``): ``q_qinfo`` @0,
  ``q_first`` @8;
* ``struct msgb`` / ``mblk_t`` (same header): ``b_next`` @0, ``b_prev`` @8,
  ``b_cont`` @16, ``b_rptr`` @24, ``b_wptr`` @32;
* ``log_ctl_t`` (``usr/src/uts/common/sys/strlog.h``): ``short mid`` @0,
  ``short sid`` @2, ``char level`` @4, ``short flags`` @6, ``clock32_t ltime``
  @8, ``time32_t ttime`` @12, ``int seq_no`` @16, ``int pri`` @20 (sizeof 24).

Untrusted memory: the walk stops at a loop, an unreadable block, or
:data:`MAX_MESSAGES`; each text is cut at :data:`MAX_TEXT` bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LogOffsets", "LogMessage", "read_recent_log", "format_log", "MAX_MESSAGES", "MAX_TEXT", "SL_PANICMSG"]

MAX_MESSAGES = 65536
MAX_TEXT = 4096
SL_PANICMSG = 0x8000  # strlog.h: message was created while panicking


@dataclass(frozen=True)
class LogOffsets:
    q_first: int = 8
    b_next: int = 0
    b_cont: int = 16
    b_rptr: int = 24
    b_wptr: int = 32
    lc_level: int = 4
    lc_flags: int = 6
    lc_ttime: int = 12
    lc_seq_no: int = 16

    @classmethod
    def from_manifest(cls, offsets: dict[str, int]) -> tuple[LogOffsets, list[str]]:
        """Offsets from a manifest's ``type.member`` map; header defaults (named in the notes) where absent."""
        keys = {
            "q_first": "queue_t.q_first",
            "b_next": "mblk_t.b_next",
            "b_cont": "mblk_t.b_cont",
            "b_rptr": "mblk_t.b_rptr",
            "b_wptr": "mblk_t.b_wptr",
            "lc_level": "log_ctl_t.level",
            "lc_flags": "log_ctl_t.flags",
            "lc_ttime": "log_ctl_t.ttime",
            "lc_seq_no": "log_ctl_t.seq_no",
        }
        vals, defaulted = {}, []
        for attr, key in keys.items():
            if key in offsets:
                vals[attr] = offsets[key]
            else:
                defaulted.append(key)
        return cls(**vals), defaulted


@dataclass(frozen=True)
class LogMessage:
    seq_no: int
    ttime: int  # seconds since 1970 (time32_t)
    level: int
    flags: int
    text: str


def read_recent_log(
    read: Callable[[int, int], bytes], log_recentq_sym: int, off: LogOffsets = LogOffsets()
) -> tuple[list[LogMessage], list[str]]:
    """Walk the queue ``*log_recentq``; ``read(va, n)`` reads kernel memory (raises on a fault).

    Returns the messages in queue order and notes on anything skipped.
    """
    notes: list[str] = []
    u64 = lambda va: struct.unpack("<Q", read(va, 8))[0]  # noqa: E731
    try:
        q = u64(log_recentq_sym)
        if q == 0:
            return [], ["log_recentq is NULL (log not initialised)"]
        mp = u64(q + off.q_first)
    except Exception as e:  # noqa: BLE001 - any fault ends the walk, with the reason
        return [], [f"log_recentq unreadable: {e}"]
    out: list[LogMessage] = []
    seen: set[int] = set()
    while mp and len(out) < MAX_MESSAGES:
        if mp in seen:
            notes.append(f"message chain loops at {mp:#x}")
            break
        seen.add(mp)
        try:
            blk = read(mp, max(off.b_wptr, off.b_rptr, off.b_cont, off.b_next) + 8)
            nxt, cont, rptr = (struct.unpack_from("<Q", blk, o)[0] for o in (off.b_next, off.b_cont, off.b_rptr))
            lc = read(rptr, max(off.lc_seq_no, off.lc_ttime) + 4)
            level = lc[off.lc_level]
            (flags,) = struct.unpack_from("<H", lc, off.lc_flags)
            (ttime,) = struct.unpack_from("<i", lc, off.lc_ttime)
            (seq,) = struct.unpack_from("<i", lc, off.lc_seq_no)
            text = ""
            if cont:
                cb = read(cont, max(off.b_rptr, off.b_wptr) + 8)
                (t0,) = struct.unpack_from("<Q", cb, off.b_rptr)
                (t1,) = struct.unpack_from("<Q", cb, off.b_wptr)
                n = t1 - t0
                if not 0 <= n <= MAX_TEXT:
                    notes.append(f"message {seq}: text length {n} out of range, cut to {MAX_TEXT}")
                    n = MAX_TEXT if n > 0 else 0
                raw = read(t0, n) if n else b""
                text = raw.split(b"\0", 1)[0].decode("utf-8", "replace").rstrip("\n")
        except Exception as e:  # noqa: BLE001
            notes.append(f"message block {mp:#x} unreadable: {e}; log cut here")
            break
        out.append(LogMessage(seq, ttime, level, flags, text))
        mp = nxt
    if len(out) >= MAX_MESSAGES:
        notes.append(f"log cut at {MAX_MESSAGES} messages")
    return out, notes


def format_log(msgs: list[LogMessage]) -> str:
    """One line per message, as ``mdb ::msgbuf`` shows them (text only), panic messages marked."""
    return "".join(f"{m.text}{'  [panic]' if m.flags & SL_PANICMSG else ''}\n" for m in msgs)
