"""The illumos thread list (layer 1), read through the manifest's offsets.

``allthreads`` (``kthread_t *``, ``usr/src/uts/common/os/thread.c``) heads a
circular list through ``t_next``; each thread names its process
(``t_procp``), its kernel stack (``t_stkbase`` .. ``t_stk``), state
(``t_state``), thread id (``t_tid``) and priority (``t_pri``). A process's pid
is ``p_pidp->pid_id`` and its command name ``p_user.u_comm``
(``usr/src/uts/common/sys/{thread,proc,user}.h``). No offset is assumed: every
one comes from the manifest (``mdb ::offsetof`` on the live guest), and a
missing one degrades the layer with a note.

Field widths (from the same headers): ``t_state`` ``ushort_t``, ``t_tid``
``uint_t``, ``t_pri`` ``pri_t`` (short), ``pid_id`` ``pid_t`` (int),
``u_comm`` ``char[MAXCOMLEN + 1]`` (17).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ThreadInfo", "walk_threads", "THREAD_STATES", "MAX_THREADS", "MAX_STACK"]

MAX_THREADS = 200_000
MAX_STACK = 1 << 20  # a kernel stack larger than this is taken as garbage
MAXCOMLEN = 16
# sys/thread.h
THREAD_STATES = {0: "free", 1: "sleep", 2: "run", 4: "onproc", 8: "zomb", 0x10: "stopped", 0x20: "wait"}


@dataclass(frozen=True)
class ThreadInfo:
    addr: int
    tid: int
    state: str
    pri: int
    stkbase: int
    stk: int
    proc: int
    pid: int | None
    comm: str


def walk_threads(
    read: Callable[[int, int], bytes], allthreads_sym: int, off: dict[str, int]
) -> tuple[list[ThreadInfo], list[str]]:
    """Threads from ``*allthreads`` round the ``t_next`` ring; ``read(va, n)`` raises on a fault."""
    need = [
        "kthread_t.t_next",
        "kthread_t.t_stk",
        "kthread_t.t_stkbase",
        "kthread_t.t_state",
        "kthread_t.t_tid",
        "kthread_t.t_pri",
        "kthread_t.t_procp",
    ]
    missing = [k for k in need if k not in off]
    if missing:
        return [], [f"thread list skipped: manifest lacks {', '.join(missing)}"]
    notes: list[str] = []
    u64 = lambda va: struct.unpack("<Q", read(va, 8))[0]  # noqa: E731
    try:
        head = u64(allthreads_sym)
    except Exception as e:  # noqa: BLE001
        return [], [f"allthreads unreadable: {e}"]
    procs: dict[int, tuple[int | None, str]] = {}
    out: list[ThreadInfo] = []
    seen: set[int] = set()
    t = head
    while t and len(out) < MAX_THREADS:
        if t in seen:
            if t != head:
                notes.append(f"thread ring loops at {t:#x} without returning to allthreads")
            break
        seen.add(t)
        try:
            nxt = u64(t + off["kthread_t.t_next"])
            stk = u64(t + off["kthread_t.t_stk"])
            stkbase = u64(t + off["kthread_t.t_stkbase"])
            (state,) = struct.unpack("<H", read(t + off["kthread_t.t_state"], 2))
            (tid,) = struct.unpack("<I", read(t + off["kthread_t.t_tid"], 4))
            (pri,) = struct.unpack("<h", read(t + off["kthread_t.t_pri"], 2))
            procp = u64(t + off["kthread_t.t_procp"])
        except Exception as e:  # noqa: BLE001
            notes.append(f"thread {t:#x} unreadable: {e}; list cut here")
            break
        if procp not in procs:
            procs[procp] = _proc(read, u64, procp, off, notes)
        pid, comm = procs[procp]
        if not 0 < stk - stkbase <= MAX_STACK:
            notes.append(f"thread {t:#x}: stack bounds {stkbase:#x}..{stk:#x} implausible")
        out.append(ThreadInfo(t, tid, THREAD_STATES.get(state, f"{state:#x}"), pri, stkbase, stk, procp, pid, comm))
        t = nxt
    if len(out) >= MAX_THREADS:
        notes.append(f"thread list cut at {MAX_THREADS}")
    return out, notes


def _proc(
    read: Callable[[int, int], bytes], u64: Callable[[int], int], p: int, off: dict[str, int], notes: list[str]
) -> tuple[int | None, str]:
    pid: int | None = None
    comm = ""
    try:
        if "proc_t.p_pidp" in off and "struct pid.pid_id" in off:
            pidp = u64(p + off["proc_t.p_pidp"])
            (pid,) = struct.unpack("<i", read(pidp + off["struct pid.pid_id"], 4))
        if "proc_t.p_user" in off and "user_t.u_comm" in off:
            raw = read(p + off["proc_t.p_user"] + off["user_t.u_comm"], MAXCOMLEN + 1)
            comm = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    except Exception as e:  # noqa: BLE001
        notes.append(f"process {p:#x} unreadable: {e}")
    return pid, comm
