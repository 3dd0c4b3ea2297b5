"""The task list, kernel stacks, modules and a memory summary, from BTF layouts.

Why BTF: ``task_struct`` changes with every kernel and config; VMCOREINFO
does not describe it, and a dump path has no debug info. The kernel's own
BTF (see :mod:`btf`) gives every offset used here, so the same code reads
any BTF-enabled kernel.

Tasks are found as the kernel's ``for_each_process_thread`` does: the
``init_task.tasks`` ring of thread-group leaders, and in each group the
``signal->thread_head`` ring linked through ``thread_node``. The task
running on each CPU comes from the per-cpu ``current_task``. Every list
walk is bounded and stops, with a note, at the first unreadable or
inconsistent link.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from progdump.layers.linux.btf import BtfError
from progdump.layers.linux.kernel import LinuxKernel
from progdump.layers.linux.modules import ModuleInfo, read_modules
from progdump.layers.linux.modules import list_entries as _list
from progdump.layers.linux.translate import FaultError
from progdump.layers.linux.unwind import THREAD_SIZE, Frame, orc_unwind, stack_scan

__all__ = [
    "TaskInfo",
    "ModuleInfo",
    "TaskLayout",
    "read_tasks",
    "read_modules",
    "memory_summary",
    "task_state_letter",
    "backtrace_task",
    "current_tasks",
]

MAX_TASKS = 1 << 16
PF_KTHREAD = 0x00200000
INACTIVE_FRAME_SIZE = 56  # struct inactive_task_frame: r15 r14 r13 r12 bx bp ret_addr


@dataclass
class TaskInfo:
    address: int
    pid: int
    tgid: int
    ppid: int
    comm: str
    state: str
    cpu: int
    on_cpu: bool
    kthread: bool
    stack: int
    thread_sp: int
    frames: list[Frame] = field(default_factory=list)
    unwind_note: str = ""
    last_ran_ns: int = 0  # rq-clock time it was last on a CPU (max of sched_info.last_arrival, se.exec_start)
    idle_ns: int | None = None  # how long before the panic that was, by its CPU's rq clock

    def as_dict(self) -> dict[str, object]:
        return {
            "task": f"{self.address:#x}",
            "pid": self.pid,
            "tgid": self.tgid,
            "ppid": self.ppid,
            "comm": self.comm,
            "state": self.state,
            "cpu": self.cpu,
            "on_cpu": self.on_cpu,
            "kthread": self.kthread,
            "stack": f"{self.stack:#x}",
            "last_ran_ns_before_panic": self.idle_ns,
            "backtrace": [f.as_dict() for f in self.frames],
            "unwind_note": self.unwind_note,
        }


class TaskLayout:
    """``task_struct`` member offsets from BTF (raises BtfError naming what is missing)."""

    def __init__(self, btf) -> None:  # type: ignore[no-untyped-def]
        o = btf.offsetof
        self.tasks = o("task_struct", "tasks")
        self.pid = o("task_struct", "pid")
        self.tgid = o("task_struct", "tgid")
        self.comm = o("task_struct", "comm")
        self.state = o("task_struct", "__state")
        self.exit_state = o("task_struct", "exit_state")
        self.stack = o("task_struct", "stack")
        self.real_parent = o("task_struct", "real_parent")
        self.flags = o("task_struct", "flags")
        self.on_cpu = o("task_struct", "on_cpu")
        self.signal = o("task_struct", "signal")
        self.thread_node = o("task_struct", "thread_node")
        self.thread_head = o("signal_struct", "thread_head")
        self.thread_sp = o("task_struct", "thread.sp")
        self.sched_times: list[int] = []  # optional: when the task last ran (rq clock ns)
        for path in ("sched_info.last_arrival", "se.exec_start"):
            try:
                self.sched_times.append(o("task_struct", path))
            except BtfError:
                pass
        try:
            self.cpu = o("task_struct", "thread_info.cpu")
        except BtfError:
            self.cpu = o("task_struct", "cpu")
        self.size = btf.struct_size("task_struct")


_STATE_LETTERS = "RSDTtXZPI"


def task_state_letter(state: int, exit_state: int) -> str:
    """The letter ``ps`` shows, as ``task_state_index()`` computes it."""
    s = (state | exit_state) & 0x7F
    if state == 0x402 and not exit_state:  # TASK_IDLE = UNINTERRUPTIBLE | NOLOAD
        return "I"
    if s == 0:
        return "R"
    return _STATE_LETTERS[min((s & -s).bit_length(), 8)]


def current_tasks(k: LinuxKernel, ncpus: int) -> dict[int, int]:
    """cpu -> task_struct address of the task running there (per-cpu current_task)."""
    out: dict[int, int] = {}
    off = k.syms.address("current_task")
    if off is None:
        return out
    for cpu in range(ncpus):
        try:
            out[cpu] = k.mem.u64(k.percpu_offset(cpu) + off)
        except FaultError:
            pass
    return out


def _read_task(k: LinuxKernel, L: TaskLayout, addr: int) -> TaskInfo:
    raw = k.mem.read(addr, L.size)
    u32 = lambda o: struct.unpack_from("<I", raw, o)[0]  # noqa: E731
    u64 = lambda o: struct.unpack_from("<Q", raw, o)[0]  # noqa: E731
    parent = u64(L.real_parent)
    try:
        ppid = k.mem.u32(parent + L.tgid) if parent and parent != addr else 0
    except FaultError:
        ppid = -1
    return TaskInfo(
        address=addr,
        pid=struct.unpack_from("<i", raw, L.pid)[0],
        tgid=struct.unpack_from("<i", raw, L.tgid)[0],
        ppid=ppid,
        comm=raw[L.comm : L.comm + 16].split(b"\0")[0].decode("utf-8", "replace"),
        state=task_state_letter(u32(L.state), u32(L.exit_state)),
        cpu=u32(L.cpu),
        on_cpu=bool(u32(L.on_cpu)),
        kthread=bool(u32(L.flags) & PF_KTHREAD),
        stack=u64(L.stack),
        thread_sp=u64(L.thread_sp),
        # the idle task (pid 0) is scheduled outside the fair class: its times mean nothing
        last_ran_ns=max((u64(o) for o in L.sched_times), default=0) if struct.unpack_from("<i", raw, L.pid)[0] else 0,
    )


def rq_clocks(k: LinuxKernel, ncpus: int) -> dict[int, int]:
    """cpu -> ``rq->clock`` (ns) of its runqueue: "now" for that CPU's tasks."""
    out: dict[int, int] = {}
    rq = k.syms.address("runqueues")
    try:
        off = k.btf.offsetof("rq", "clock")
    except BtfError:
        return out
    if rq is None:
        return out
    for cpu in range(ncpus):
        try:
            out[cpu] = k.mem.u64(k.percpu_offset(cpu) + rq + off)
        except FaultError:
            pass
    return out


def read_tasks(k: LinuxKernel, ncpus: int) -> tuple[list[TaskInfo], list[str]]:
    """Every task (threads included, plus each CPU's current task), unsorted backtraces not yet taken."""
    L = TaskLayout(k.btf)
    notes: list[str] = []
    init = k.syms.address("init_task")
    if init is None:
        raise BtfError("no init_task symbol")
    leaders, why = _list(k.mem, init + L.tasks, MAX_TASKS)
    if why:
        notes.append(f"process list: {why}")
    addrs = [init] + [a - L.tasks for a in leaders]
    seen = set()
    out: list[TaskInfo] = []
    for leader in addrs:
        group = [leader]
        try:
            sig = k.mem.u64(leader + L.signal)
            if sig:
                threads, why = _list(k.mem, sig + L.thread_head, MAX_TASKS)
                if why:
                    notes.append(f"threads of {leader:#x}: {why}")
                group = [t - L.thread_node for t in threads] or [leader]
                if leader not in group:  # a damaged ring: keep the leader the process list named
                    notes.append(f"threads of {leader:#x}: the ring does not hold its leader")
                    group.insert(0, leader)
        except FaultError as e:
            notes.append(f"task {leader:#x}: signal_struct unreadable: {e}")
        for t in group:
            if t in seen or len(out) >= MAX_TASKS:
                continue
            seen.add(t)
            try:
                out.append(_read_task(k, L, t))
            except FaultError as e:
                notes.append(f"task {t:#x} unreadable: {e}")
    for cpu, t in current_tasks(k, ncpus).items():
        if t not in seen:  # idle tasks of secondary CPUs are on no list
            try:
                out.append(_read_task(k, L, t))
                seen.add(t)
            except FaultError as e:
                notes.append(f"current task of CPU {cpu} unreadable: {e}")
    clocks = rq_clocks(k, ncpus)
    now = max(clocks.values(), default=0)
    for t in out:
        ref = clocks.get(t.cpu, now)
        if t.last_ran_ns and ref and 0 <= ref - t.last_ran_ns < 1 << 62:
            t.idle_ns = ref - t.last_ran_ns
    return out, notes


def backtrace_task(k: LinuxKernel, t: TaskInfo, regs: dict[str, int] | None) -> None:
    """Fill ``t.frames``: ORC from the CPU registers (running) or the switch frame (blocked).

    When ORC cannot start or stops at once, a stack scan (labelled as such) fills in.
    """
    try:
        orc = k.orc
    except Exception as e:  # no ORC: scan only
        orc = None
        t.unwind_note = f"ORC unavailable ({e}); "
    hi = t.stack + THREAD_SIZE if t.stack else 0
    try:
        if regs is not None:
            ip, sp, bp, valid = regs.get("rip", 0), regs.get("rsp", 0), regs.get("rbp", 0), True
            start = "CPU registers"
        else:
            frame = k.u64s(t.thread_sp, 7)
            ip, sp, bp, valid = frame[6], t.thread_sp + INACTIVE_FRAME_SIZE, frame[5], False
            start = "saved switch frame (thread.sp)"
    except FaultError as e:
        t.unwind_note += f"no starting frame: {e}"
        return
    frames: list[Frame] = []
    why = "ORC unavailable"
    if orc is not None:
        frames, why = orc_unwind(k.mem, k.syms, orc, ip, sp, bp, valid)
    t.unwind_note += f"from {start}; {why}"
    if len(frames) <= 1 and hi and t.stack <= sp < hi:
        scan, swhy = stack_scan(k.mem, k.syms, sp, hi)
        frames += scan
        t.unwind_note += f"; stack scan: {swhy}"
    t.frames = frames


def memory_summary(k: LinuxKernel) -> tuple[dict[str, int], list[str]]:
    """Page counters the kernel keeps (``/proc/meminfo``'s sources), in pages."""
    out: dict[str, int] = {}
    notes: list[str] = []
    syms = k.syms
    try:
        if syms.address("_totalram_pages") is not None:
            out["totalram_pages"] = k.mem.s64(syms.address("_totalram_pages"))  # type: ignore[arg-type]
    except FaultError as e:
        notes.append(f"memory counters: totalram_pages: {e}")
    groups = (
        (
            (
                "NR_FREE_PAGES",
                "NR_ZONE_ACTIVE_ANON",
                "NR_ZONE_INACTIVE_ANON",
                "NR_ZONE_ACTIVE_FILE",
                "NR_ZONE_INACTIVE_FILE",
                "NR_MLOCK",
                "NR_BOUNCE",
                "NR_ZSPAGES",
            ),
            "vm_zone_stat",
            "zone_stat_item",
        ),
        (
            (
                "NR_FILE_PAGES",
                "NR_ANON_MAPPED",
                "NR_SHMEM",
                "NR_FILE_DIRTY",
                "NR_WRITEBACK",
                "NR_SLAB_RECLAIMABLE_B",
                "NR_SLAB_UNRECLAIMABLE_B",
                "NR_KERNEL_STACK_KB",
                "NR_PAGETABLE",
            ),
            "vm_node_stat",
            "node_stat_item",
        ),
    )
    for names, sym, enum_name in groups:  # each group on its own: one missing enum loses only its counters
        base = syms.address(sym)
        if base is None:
            continue
        try:
            enum = k.btf.enum_values(enum_name)
            for n in names:
                if n in enum:
                    # per-CPU deltas not yet folded in can leave a global counter briefly negative;
                    # /proc/meminfo shows 0 then, and so do we
                    out[n.lower()] = max(0, k.mem.s64(base + 8 * enum[n]))
        except (BtfError, FaultError) as e:
            notes.append(f"memory counters ({enum_name}): {e}")
    return out, notes
