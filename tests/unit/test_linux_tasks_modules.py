"""read_tasks, current_tasks, backtrace_task, memory_summary and read_modules on a small memory image.

The image is synthetic: nothing in it is recorded from a real guest. It is
built from the real structure layouts the code reads, and the real
:class:`LinuxKernel` constructor reads it the way it reads a guest:

* physical memory, page tables, the kernel image mapping and VMCOREINFO come
  from :class:`test_linux_image.Image`; kallsyms tables are laid out as
  ``scripts/kallsyms.c`` does (``test_linux_kallsyms.build_tables``) and
  found through VMCOREINFO; the BTF blob (``test_linux_btf.BtfBuilder``) sits
  between ``__start_BTF`` and ``__stop_BTF`` and is the only place the code
  learns member offsets from;
* the BTF describes, with x86-64 6.1 member names and types:
  ``struct task_struct`` (``thread_info.cpu``, ``__state``, ``stack``,
  ``flags``, ``on_cpu``, ``se.exec_start``, ``sched_info.last_arrival``,
  ``tasks``, ``exit_state``, ``pid``, ``tgid``, ``real_parent``,
  ``thread_node``, ``comm``, ``signal``, ``thread.sp``), ``struct
  signal_struct`` (``thread_head``), ``struct module`` (6.1
  ``core_layout`` or 6.4 ``mem[]``), ``struct rq`` (``clock``), ``struct
  orc_entry`` (6.1 bitfields) and ``enum zone_stat_item`` / ``enum
  node_stat_item`` with their 6.1 values (CONFIG_ZSMALLOC off);
* the objects sit where a kernel puts them: ``init_task`` and the counters
  in the image's data, other task_structs in the direct map, stacks in
  vmalloc space (THREAD_SIZE aligned, guard gaps), per-cpu areas reached
  through ``__per_cpu_offset``, ``struct module`` in the module area, and
  an ORC table for a few text functions with ``call`` instructions before
  each return address.

Member offsets follow x86-64 where it matters (``thread_info.cpu`` at 20,
``thread_struct.sp`` at 24, ``module.name`` at 24, ``signal_struct.thread_head``
at 16); whole-structure sizes are trimmed.
"""

from __future__ import annotations

import struct

import pytest
from test_linux_btf import BtfBuilder
from test_linux_image import PAGE, PAGE_OFFSET, PHYS_BASE, Image
from test_linux_kallsyms import build_tables
from test_linux_unwind import orc_entry

from progdump.layers.linux import tasks as tasks_mod
from progdump.layers.linux.btf import BtfError
from progdump.layers.linux.kernel import LinuxKernel
from progdump.layers.linux.modules import read_modules
from progdump.layers.linux.tasks import backtrace_task, current_tasks, memory_summary, read_tasks
from progdump.layers.linux.translate import START_KERNEL_MAP, FaultError
from progdump.layers.linux.unwind import THREAD_SIZE
from progdump.snapshot import Note

NCPUS = 2
TEXT = 0xFFFFFFFF81000000  # _stext: the first bytes of the image mapping (KTEXT_VA)
VMALLOC = 0xFFFFC90000000000
MODULES_VADDR = 0xFFFFFFFFC0000000
LIST_POISON1 = 0xDEAD000000000100  # what list_del() leaves in ->next
UNMAPPED = 0xFFFFC900DEAD0000  # a vmalloc address with no page behind it
PF_KTHREAD, PF_IDLE = 0x00200000, 0x00000002
TASK_RUNNING, TASK_INTERRUPTIBLE, TASK_UNINTERRUPTIBLE, TASK_DEAD, TASK_IDLE = 0, 1, 2, 0x80, 0x402
EXIT_ZOMBIE = 0x20

# -- struct layouts (byte offsets) -------------------------------------------------------
TASK_SIZE = 640
T_CPU = 20  # thread_info.cpu (thread_info at 0: flags, syscall_work, status, cpu)
T_STATE, T_STACK, T_FLAGS, T_ON_CPU = 24, 32, 44, 52
T_SE, SE_EXEC_START = 128, 72
T_SCHED_INFO, SI_LAST_ARRIVAL = 256, 16
T_TASKS, T_EXIT_STATE, T_PID, T_TGID, T_REAL_PARENT = 304, 336, 352, 356, 368
T_THREAD_NODE, T_COMM, T_SIGNAL = 432, 456, 488
T_THREAD, THREAD_SP = 576, 24
SIGNAL_SIZE, SIG_THREAD_HEAD = 64, 16
MOD_SIZE, M_STATE, M_LIST, M_NAME, M_CORE = 832, 0, 8, 24, 320  # M_CORE: core_layout (6.1) / mem (6.4)
MODULE_MEMORY_SIZE, MOD_MEM_NUM_TYPES = 72, 7
RQ_SIZE, RQ_CLOCK = 256, 160
PCPU_CURRENT_TASK, PCPU_RUNQUEUES, PCPU_AREA_PAGES = 0x1C40, 0x2000, 4

# include/linux/mmzone.h, 6.1 (aliases share a value; NR_ZSPAGES only with CONFIG_ZSMALLOC)
ZONE_STAT_ITEMS = [
    "NR_FREE_PAGES",
    ("NR_ZONE_LRU_BASE", "NR_ZONE_INACTIVE_ANON"),
    "NR_ZONE_ACTIVE_ANON",
    "NR_ZONE_INACTIVE_FILE",
    "NR_ZONE_ACTIVE_FILE",
    "NR_ZONE_UNEVICTABLE",
    "NR_ZONE_WRITE_PENDING",
    "NR_MLOCK",
    "NR_BOUNCE",
    "NR_FREE_CMA_PAGES",
    "NR_VM_ZONE_STAT_ITEMS",
]
NODE_STAT_ITEMS = [
    ("NR_LRU_BASE", "NR_INACTIVE_ANON"),
    "NR_ACTIVE_ANON",
    "NR_INACTIVE_FILE",
    "NR_ACTIVE_FILE",
    "NR_UNEVICTABLE",
    "NR_SLAB_RECLAIMABLE_B",
    "NR_SLAB_UNRECLAIMABLE_B",
    "NR_ISOLATED_ANON",
    "NR_ISOLATED_FILE",
    "WORKINGSET_NODES",
    ("WORKINGSET_REFAULT_BASE", "WORKINGSET_REFAULT_ANON"),
    "WORKINGSET_REFAULT_FILE",
    ("WORKINGSET_ACTIVATE_BASE", "WORKINGSET_ACTIVATE_ANON"),
    "WORKINGSET_ACTIVATE_FILE",
    ("WORKINGSET_RESTORE_BASE", "WORKINGSET_RESTORE_ANON"),
    "WORKINGSET_RESTORE_FILE",
    "WORKINGSET_NODERECLAIM",
    "NR_ANON_MAPPED",
    "NR_FILE_MAPPED",
    "NR_FILE_PAGES",
    "NR_FILE_DIRTY",
    "NR_WRITEBACK",
    "NR_WRITEBACK_TEMP",
    "NR_SHMEM",
    "NR_SHMEM_THPS",
    "NR_SHMEM_PMDMAPPED",
    "NR_FILE_THPS",
    "NR_FILE_PMDMAPPED",
    "NR_ANON_THPS",
    "NR_VMSCAN_WRITE",
    "NR_VMSCAN_IMMEDIATE",
    "NR_DIRTIED",
    "NR_WRITTEN",
    "NR_THROTTLED_WRITTEN",
    "NR_KERNEL_MISC_RECLAIMABLE",
    "NR_FOLL_PIN_ACQUIRED",
    "NR_FOLL_PIN_RELEASED",
    "NR_KERNEL_STACK_KB",
    "NR_PAGETABLE",
    "NR_SECONDARY_PAGETABLE",
    "NR_SWAPCACHE",
    "NR_VM_NODE_STAT_ITEMS",
]


def enum_values(items: list) -> dict[str, int]:
    out: dict[str, int] = {}
    for i, it in enumerate(items):
        for name in it if isinstance(it, tuple) else (it,):
            out[name] = i
    return out


ZONE_ENUM, NODE_ENUM = enum_values(ZONE_STAT_ITEMS), enum_values(NODE_STAT_ITEMS)

# -- text: functions, their ORC data and the calls that precede return addresses -------------
FUNCS = {
    "__schedule": 0x100,
    "schedule": 0x200,
    "do_nanosleep": 0x300,
    "ret_from_fork": 0x400,
    "sysrq_handle_crash": 0x480,
}
ETEXT = TEXT + 0x500
CALLS = [0x180, 0x210, 0x340, 0x410]  # e8 rel32 at these offsets: returns at +5
RET_IN___SCHEDULE = TEXT + 0x185
RET_IN_SCHEDULE, RET_IN_DO_NANOSLEEP, RET_IN_RET_FROM_FORK = TEXT + 0x215, TEXT + 0x345, TEXT + 0x415
# CFA = sp + offset (sp_reg 5 = ORC_REG_SP), type call; ret_from_fork ends the stack
ORC = [
    (FUNCS["__schedule"], orc_entry(24, 5)),
    (FUNCS["schedule"], orc_entry(16, 5)),
    (FUNCS["do_nanosleep"], orc_entry(8, 5)),
    (FUNCS["ret_from_fork"], orc_entry(0, 0, end=1)),
    (FUNCS["sysrq_handle_crash"], orc_entry(16, 5)),
]


def build_btf(module_layout: str = "6.1", node_enum: bool = True) -> bytes:
    b = BtfBuilder()

    def integer(name: str, size: int, signed: bool = False) -> int:
        return b.add(1, name, size, extra=struct.pack("<I", (1 << 24 if signed else 0) | 8 * size))

    def array(elem: int, n: int) -> int:
        return b.add(3, "", 0, extra=struct.pack("<III", elem, int_, n))

    def struct_(name: str, size: int, members: list[tuple[str, int, int]]) -> int:
        return b.struct(name, size, [(m, tid, 8 * off, 0) for m, tid, off in members])

    def enum(name: str, values: dict[str, int]) -> int:
        extra = b"".join(struct.pack("<Ii", b.s(n), v) for n, v in values.items())
        return b.add(6, name, 4, len(values), extra=extra)

    int_ = integer("int", 4, True)
    uint = integer("unsigned int", 4)
    ulong = integer("long unsigned int", 8)
    char = integer("char", 1)
    short = integer("short int", 2, True)
    u64 = b.add(8, "u64", integer("long long unsigned int", 8))
    pid_t = b.add(8, "pid_t", int_)
    voidp = b.add(2, "", 0)
    lh_ptr = b.add(2, "", b.n + 2)  # struct list_head *, a forward reference as in vmlinux BTF
    lh = struct_("list_head", 16, [("next", lh_ptr, 0), ("prev", lh_ptr, 8)])
    ti = struct_(
        "thread_info", 24, [("flags", ulong, 0), ("syscall_work", ulong, 8), ("status", uint, 16), ("cpu", uint, T_CPU)]
    )
    se = struct_(
        "sched_entity",
        128,
        [("on_rq", uint, 64), ("exec_start", u64, SE_EXEC_START), ("sum_exec_runtime", u64, 80), ("vruntime", u64, 88)],
    )
    si = struct_(
        "sched_info",
        32,
        [
            ("pcount", ulong, 0),
            ("run_delay", ulong, 8),
            ("last_arrival", ulong, SI_LAST_ARRIVAL),
            ("last_queued", ulong, 24),
        ],
    )
    th = struct_(
        "thread_struct",
        64,
        [("tls_array", array(ulong, 3), 0), ("sp", ulong, THREAD_SP), ("es", short, 32), ("fsbase", ulong, 40)],
    )
    struct_(
        "task_struct",
        TASK_SIZE,
        [
            ("thread_info", ti, 0),
            ("__state", uint, T_STATE),
            ("stack", voidp, T_STACK),
            ("usage", int_, 40),
            ("flags", uint, T_FLAGS),
            ("ptrace", uint, 48),
            ("on_cpu", int_, T_ON_CPU),
            ("se", se, T_SE),
            ("sched_info", si, T_SCHED_INFO),
            ("tasks", lh, T_TASKS),
            ("mm", voidp, 320),
            ("active_mm", voidp, 328),
            ("exit_state", int_, T_EXIT_STATE),
            ("exit_code", int_, 340),
            ("pid", pid_t, T_PID),
            ("tgid", pid_t, T_TGID),
            ("real_parent", voidp, T_REAL_PARENT),
            ("parent", voidp, 376),
            ("children", lh, 384),
            ("sibling", lh, 400),
            ("group_leader", voidp, 416),
            ("thread_node", lh, T_THREAD_NODE),
            ("comm", array(char, 16), T_COMM),
            ("signal", voidp, T_SIGNAL),
            ("thread", th, T_THREAD),
        ],
    )
    struct_(
        "signal_struct",
        SIGNAL_SIZE,
        [("sigcnt", int_, 0), ("live", int_, 4), ("nr_threads", int_, 8), ("thread_head", lh, SIG_THREAD_HEAD)],
    )
    mstate = enum(
        "module_state",
        {"MODULE_STATE_LIVE": 0, "MODULE_STATE_COMING": 1, "MODULE_STATE_GOING": 2, "MODULE_STATE_UNFORMED": 3},
    )
    common = [("state", mstate, M_STATE), ("list", lh, M_LIST), ("name", array(char, 56), M_NAME)]
    if module_layout == "6.1":
        ml = struct_(
            "module_layout",
            80,
            [
                ("base", voidp, 0),
                ("size", uint, 8),
                ("text_size", uint, 12),
                ("ro_size", uint, 16),
                ("ro_after_init_size", uint, 20),
            ],
        )
        struct_("module", MOD_SIZE, common + [("core_layout", ml, M_CORE), ("init_layout", ml, M_CORE + 80)])
    else:  # 6.4+: struct module_memory mem[MOD_MEM_NUM_TYPES], mem[MOD_TEXT] first
        mm = struct_("module_memory", MODULE_MEMORY_SIZE, [("base", voidp, 0), ("size", uint, 8)])
        struct_("module", MOD_SIZE, common + [("mem", array(mm, MOD_MEM_NUM_TYPES), M_CORE)])
    struct_(
        "rq",
        RQ_SIZE,
        [("__lock", uint, 0), ("nr_running", uint, 4), ("clock", u64, RQ_CLOCK), ("clock_task", u64, RQ_CLOCK + 8)],
    )
    b.struct(
        "orc_entry",
        6,
        [
            ("sp_offset", short, 0, 0),
            ("bp_offset", short, 16, 0),
            ("sp_reg", uint, 32, 4),
            ("bp_reg", uint, 36, 4),
            ("type", uint, 40, 2),
            ("end", uint, 42, 1),
        ],
    )
    enum("zone_stat_item", ZONE_ENUM)
    if node_enum:
        enum("node_stat_item", NODE_ENUM)
    return b.blob()


class Scene:
    """A synthetic x86-64 6.1 kernel being built; :meth:`kernel` freezes it into a :class:`LinuxKernel`."""

    def __init__(
        self, module_layout: str = "6.1", orc: bool = True, node_enum: bool = True, omit: tuple[str, ...] = ()
    ) -> None:
        self.img = img = Image()
        self.module_layout = module_layout
        self.omit = set(omit)
        self.syms: dict[str, tuple[str, int]] = {}
        self.vnext = VMALLOC
        self.mnext = MODULES_VADDR + 0x100000
        self.slab_va, self.slab_end = 0, 0
        # text first: it starts the image mapping, as _stext does
        assert img.image_alloc(0x1000, align=0x1000) == TEXT
        self.sym("T", "_stext", TEXT)
        for name, off in FUNCS.items():
            self.sym("t", name, TEXT + off)
        self.sym("T", "_etext", ETEXT)
        for off in CALLS:
            self.poke(TEXT + off, b"\xe8\0\0\0\0")
        if orc:
            ip_va = img.image_alloc(4 * len(ORC), align=4)
            rel = [TEXT + off - (ip_va + 4 * i) for i, (off, _) in enumerate(ORC)]  # ip = &table[i] + table[i]
            self.poke(ip_va, struct.pack(f"<{len(rel)}i", *rel))
            e_va = img.image_alloc(6 * len(ORC), align=2)
            self.poke(e_va, b"".join(e for _, e in ORC))
            self.sym("R", "__start_orc_unwind_ip", ip_va)
            self.sym("R", "__stop_orc_unwind_ip", ip_va + 4 * len(ORC))
            self.sym("R", "__start_orc_unwind", e_va)
        blob = build_btf(module_layout, node_enum)
        a = self.data("R", "__start_BTF", blob)
        self.sym("R", "__stop_BTF", a + len(blob))
        self.data("D", "page_offset_base", struct.pack("<Q", PAGE_OFFSET))
        # per-cpu areas in the direct map; __per_cpu_offset[cpu] is the area's address (per-cpu symbols are offsets)
        self.pcpu = [PAGE_OFFSET + img.alloc_page(PCPU_AREA_PAGES) for _ in range(NCPUS)]
        self.data("D", "__per_cpu_offset", struct.pack(f"<{8}Q", *self.pcpu, *[0] * (8 - NCPUS)))
        self.sym("A", "current_task", PCPU_CURRENT_TASK)
        self.sym("A", "runqueues", PCPU_RUNQUEUES)
        self.init_task = self.data("D", "init_task", bytes(TASK_SIZE), align=64)
        self.modules_head = self.data("d", "modules", bytes(16))
        self.link(self.modules_head, [])
        self.totalram = self.data("D", "_totalram_pages", bytes(8))
        self.zone_stat = self.data("D", "vm_zone_stat", bytes(8 * ZONE_ENUM["NR_VM_ZONE_STAT_ITEMS"]), align=64)
        self.node_stat = self.data("D", "vm_node_stat", bytes(8 * NODE_ENUM["NR_VM_NODE_STAT_ITEMS"]), align=64)

    # -- memory -------------------------------------------------------------------
    def sym(self, typ: str, name: str, addr: int) -> int:
        self.syms[name] = (typ, addr)
        return addr

    def data(self, typ: str, name: str, content: bytes, align: int = 8) -> int:
        va = self.img.image_alloc(len(content), align)
        self.poke(va, content)
        return self.sym(typ, name, va)

    def poke(self, va: int, data: bytes) -> None:
        """Write what is mapped of ``[va, va+len)`` (a struct straddling an unmapped page keeps its mapped part)."""
        km = self.img.kmem()
        off = 0
        while off < len(data):
            n = min(len(data) - off, PAGE - ((va + off) & 0xFFF))
            try:
                pa, _ = km.to_phys(va + off)
            except FaultError:
                pass
            else:
                self.img.put(pa, data[off : off + n])
            off += n

    def q(self, va: int, v: int) -> None:
        self.poke(va, struct.pack("<Q", v & (1 << 64) - 1))

    def u64(self, va: int) -> int:
        return self.img.kmem().u64(va)

    def map_pages(self, va: int, n: int) -> int:
        for i in range(n):
            self.img.map(va + i * PAGE, self.img.alloc_page())
        return va

    def vmalloc(self, pages: int) -> int:
        va = self.map_pages(self.vnext, pages)
        self.vnext += (pages + 4) * PAGE  # a guard gap, and THREAD_SIZE alignment kept
        return va

    def slab(self, size: int) -> int:
        """A direct-map object (task_struct and signal_struct caches)."""
        if self.slab_va + size > self.slab_end:
            self.slab_va = PAGE_OFFSET + self.img.alloc_page(4)
            self.slab_end = self.slab_va + 4 * PAGE
        va = self.slab_va
        self.slab_va += (size + 63) & ~63
        return va

    def link(self, head: int, nodes: list[int]) -> None:
        """A ``list_head`` ring: head, nodes..., back to head (next and prev)."""
        ring = [head] + nodes
        for i, n in enumerate(ring):
            self.q(n, ring[(i + 1) % len(ring)])
            self.q(n + 8, ring[i - 1])

    # -- objects ------------------------------------------------------------------
    def task(
        self,
        pid: int,
        comm: str,
        *,
        tgid: int | None = None,
        state: int = TASK_INTERRUPTIBLE,
        exit_state: int = 0,
        flags: int = 0,
        cpu: int = 0,
        on_cpu: int = 0,
        parent: int | None = None,
        last_arrival: int = 0,
        exec_start: int = 0,
        addr: int | None = None,
    ) -> int:
        addr = addr if addr is not None else self.slab(TASK_SIZE)
        stack = self.vmalloc(THREAD_SIZE // PAGE)
        raw = bytearray(TASK_SIZE)
        struct.pack_into("<I", raw, T_CPU, cpu)
        struct.pack_into("<I", raw, T_STATE, state)
        struct.pack_into("<Q", raw, T_STACK, stack)
        struct.pack_into("<I", raw, T_FLAGS, flags)
        struct.pack_into("<i", raw, T_ON_CPU, on_cpu)
        struct.pack_into("<Q", raw, T_SE + SE_EXEC_START, exec_start)
        struct.pack_into("<Q", raw, T_SCHED_INFO + SI_LAST_ARRIVAL, last_arrival)
        struct.pack_into("<i", raw, T_EXIT_STATE, exit_state)
        struct.pack_into("<ii", raw, T_PID, pid, pid if tgid is None else tgid)
        struct.pack_into("<Q", raw, T_REAL_PARENT, addr if parent is None else parent)
        raw[T_COMM : T_COMM + 16] = comm.encode().ljust(16, b"\0")[:16]
        struct.pack_into("<Q", raw, T_THREAD + THREAD_SP, stack + THREAD_SIZE - 0x100)
        self.poke(addr, bytes(raw))
        return addr

    def thread_group(self, members: list[int]) -> int:
        """One signal_struct for these tasks (leader first): its thread_head ring through thread_node."""
        sig = self.slab(SIGNAL_SIZE)
        self.poke(sig, struct.pack("<iii", 1, len(members), len(members)))
        for t in members:
            self.q(t + T_SIGNAL, sig)
        self.link(sig + SIG_THREAD_HEAD, [t + T_THREAD_NODE for t in members])
        return sig

    def module(self, name: bytes, state: int, base: int, size: int, text_size: int, addr: int | None = None) -> int:
        if addr is None:
            addr = self.map_pages(self.mnext, 1)
            self.mnext += 2 * PAGE
        raw = bytearray(MOD_SIZE)
        struct.pack_into("<I", raw, M_STATE, state)
        raw[M_NAME : M_NAME + len(name)] = name
        if self.module_layout == "6.1":
            struct.pack_into("<QII", raw, M_CORE, base, size, text_size)
        else:  # mem[MOD_TEXT] is the text; the other types follow it
            struct.pack_into("<QI", raw, M_CORE, base, text_size)
            struct.pack_into("<QI", raw, M_CORE + MODULE_MEMORY_SIZE, base + text_size, size - text_size)
        self.poke(addr, bytes(raw))
        return addr

    def set_counters(self, totalram: int, zone: dict[str, int], node: dict[str, int]) -> None:
        """Every slot gets a decoy (so a wrong index shows), then the named counters their value."""
        self.q(self.totalram, totalram)
        for base, enum, values in ((self.zone_stat, ZONE_ENUM, zone), (self.node_stat, NODE_ENUM, node)):
            n = max(enum.values())
            self.poke(base, struct.pack(f"<{n}q", *(900000 + i for i in range(n))))
            for k, v in values.items():
                self.poke(base + 8 * enum[k], struct.pack("<q", v))

    # -- freeze ---------------------------------------------------------------------
    def kernel(self) -> LinuxKernel:
        symbols = sorted(((t, n, a) for n, (t, a) in self.syms.items() if n not in self.omit), key=lambda s: s[2])
        num, names, table, index, offsets = build_tables(symbols, TEXT)
        vi = {
            "OSRELEASE": "6.1.0-synthetic",
            "PAGESIZE": "4096",
            "NUMBER(phys_base)": str(PHYS_BASE),
            "SYMBOL(init_top_pgt)": f"{self.img.pgd - PHYS_BASE + START_KERNEL_MAP:x}",
            "SYMBOL(_stext)": f"{TEXT:x}",
        }
        for key, data in (
            ("kallsyms_offsets", offsets),
            ("kallsyms_relative_base", struct.pack("<Q", TEXT)),
            ("kallsyms_num_syms", struct.pack("<I", num)),
            ("kallsyms_names", names),
            ("kallsyms_token_table", table),
            ("kallsyms_token_index", index),
        ):
            va = self.img.image_alloc(len(data))
            self.poke(va, data)
            vi[f"SYMBOL({key})"] = f"{va:x}"
        text = "".join(f"{k}={v}\n" for k, v in vi.items()).encode()
        return LinuxKernel(self.img.snapshot(notes=[Note("VMCOREINFO", 0, text)]))


# -- the standard scene ------------------------------------------------------------------
CLOCK = {0: 5_000_000_000, 1: 5_000_100_000}  # rq->clock of each CPU


def standard(scene: Scene | None = None) -> tuple[Scene, dict[str, int]]:
    """Tasks as a small 6.1 guest has them: idle, init, a kthread, a worker kthread, a shell running on
    CPU 0, a two-thread process, a zombie, a process forked by a thread, and CPU 1's idle task (on no
    list); per-cpu current_task and rq->clock; three modules. (Counters: :meth:`Scene.set_counters`.)"""
    s = scene or Scene()
    init_task = s.task(0, "swapper/0", state=TASK_RUNNING, flags=PF_KTHREAD | PF_IDLE, cpu=0, addr=s.init_task)
    t = {"swapper/0": init_task}
    t["systemd"] = s.task(1, "systemd", parent=init_task, cpu=1, last_arrival=4_000_000_000, exec_start=4_100_000_000)
    t["kthreadd"] = s.task(2, "kthreadd", flags=PF_KTHREAD, parent=init_task, last_arrival=6_000_000_000)
    t["kworker/0:1"] = s.task(20, "kworker/0:1", state=TASK_IDLE, flags=PF_KTHREAD, parent=t["kthreadd"])
    t["bash"] = s.task(
        200,
        "bash",
        state=TASK_RUNNING,
        on_cpu=1,
        cpu=0,
        parent=t["systemd"],
        last_arrival=4_999_000_000,
        exec_start=4_999_500_000,
    )
    t["worker"] = s.task(300, "worker", parent=t["bash"], cpu=0)
    t["worker-io"] = s.task(
        301, "worker-io", tgid=300, state=TASK_UNINTERRUPTIBLE, parent=t["bash"], cpu=1, last_arrival=5_000_000_000
    )
    t["defunct"] = s.task(400, "defunct", state=TASK_DEAD, exit_state=EXIT_ZOMBIE, parent=t["bash"])
    t["sh"] = s.task(310, "sh", parent=t["worker-io"])  # forked by a thread: its ppid is the thread's tgid
    t["swapper/1"] = s.task(
        0, "swapper/1", state=TASK_RUNNING, flags=PF_KTHREAD | PF_IDLE, cpu=1, on_cpu=1, parent=init_task
    )
    for group in (
        ["swapper/0"],
        ["systemd"],
        ["kthreadd"],
        ["kworker/0:1"],
        ["bash"],
        ["worker", "worker-io"],
        ["defunct"],
        ["sh"],
        ["swapper/1"],
    ):
        s.thread_group([t[n] for n in group])
    leaders = ["systemd", "kthreadd", "kworker/0:1", "bash", "worker", "defunct", "sh"]
    s.link(init_task + T_TASKS, [t[n] + T_TASKS for n in leaders])
    s.q(s.pcpu[0] + PCPU_CURRENT_TASK, t["bash"])
    s.q(s.pcpu[1] + PCPU_CURRENT_TASK, t["swapper/1"])
    for cpu in range(NCPUS):
        s.q(s.pcpu[cpu] + PCPU_RUNQUEUES + RQ_CLOCK, CLOCK[cpu])
    # modules, newest first (load_module() adds at the head)
    t["pd_crash"] = s.module(b"pd_crash", 1, MODULES_VADDR + 0x1000, 0x3000, 0x1000)
    t["virtio_net"] = s.module(b"virtio_net", 0, MODULES_VADDR + 0x8000, 0xB000, 0x7000)
    t["xfs"] = s.module(b"xfs", 2, MODULES_VADDR + 0x20000, 0x1A0000, 0x120000)
    s.link(s.modules_head, [t[n] + M_LIST for n in ("pd_crash", "virtio_net", "xfs")])
    return s, t


# (pid, tgid, ppid, comm, state, cpu, on_cpu, kthread, idle_ns) of every task planted by standard()
EXPECTED = sorted(
    [
        (0, 0, 0, "swapper/0", "R", 0, False, True, None),
        (1, 1, 0, "systemd", "S", 1, False, False, CLOCK[1] - 4_100_000_000),  # the later of the two times
        (2, 2, 0, "kthreadd", "S", 0, False, True, None),  # last ran "after" its CPU's clock: no age
        (20, 20, 2, "kworker/0:1", "I", 0, False, True, None),
        (200, 200, 1, "bash", "R", 0, True, False, CLOCK[0] - 4_999_500_000),
        (300, 300, 200, "worker", "S", 0, False, False, None),
        (301, 300, 200, "worker-io", "D", 1, False, False, CLOCK[1] - 5_000_000_000),
        (400, 400, 200, "defunct", "Z", 0, False, False, None),
        (310, 310, 300, "sh", "S", 0, False, False, None),
        (0, 0, 0, "swapper/1", "R", 1, True, True, None),
    ]
)


def summary(tasks: list) -> list[tuple]:  # type: ignore[type-arg]
    return sorted((t.pid, t.tgid, t.ppid, t.comm, t.state, t.cpu, t.on_cpu, t.kthread, t.idle_ns) for t in tasks)


def by_comm(tasks: list) -> dict:  # type: ignore[type-arg]
    return {t.comm: t for t in tasks}


# -- tasks ----------------------------------------------------------------------------------
def test_read_tasks_finds_every_planted_task_with_its_fields() -> None:
    s, t = standard()
    k = s.kernel()
    tasks, notes = read_tasks(k, NCPUS)
    assert notes == []
    assert summary(tasks) == EXPECTED
    assert len({x.address for x in tasks}) == len(tasks) == 10  # CPU 0's current (bash) is not added twice
    found = by_comm(tasks)
    assert {c: x.address for c, x in found.items()} == {c: t[c] for c in found}
    for c, x in found.items():
        assert x.stack == s.u64(t[c] + T_STACK) and x.stack % THREAD_SIZE == 0 and x.stack >= VMALLOC
        assert x.thread_sp == x.stack + THREAD_SIZE - 0x100
    assert found["systemd"].last_ran_ns == 4_100_000_000
    assert found["swapper/0"].last_ran_ns == 0  # pid 0: scheduled outside the fair class, times ignored


def test_current_tasks_reads_each_cpus_current_task() -> None:
    s, t = standard()
    k = s.kernel()
    assert current_tasks(k, NCPUS) == {0: t["bash"], 1: t["swapper/1"]}
    # a CPU past the possible ones has __per_cpu_offset 0 here: its slot is unreadable, so it is left out
    assert current_tasks(k, NCPUS + 1) == {0: t["bash"], 1: t["swapper/1"]}


def test_without_current_task_symbol_idle_of_cpu1_is_not_found() -> None:
    s, _ = standard(Scene(omit=("current_task",)))
    k = s.kernel()
    assert current_tasks(k, NCPUS) == {}
    tasks, notes = read_tasks(k, NCPUS)
    assert notes == []
    assert summary(tasks) == [e for e in EXPECTED if e[3] != "swapper/1"]


def test_without_init_task_symbol_read_tasks_raises_btf_error() -> None:
    s, _ = standard(Scene(omit=("init_task",)))
    with pytest.raises(BtfError, match="no init_task symbol"):
        read_tasks(s.kernel(), NCPUS)


def test_process_list_that_loops_is_bounded_and_noted() -> None:
    s, t = standard()
    s.q(t["sh"] + T_TASKS, t["kthreadd"] + T_TASKS)  # the last leader points back into the ring, not at its head
    tasks, notes = read_tasks(s.kernel(), NCPUS)
    assert summary(tasks) == EXPECTED  # each task once
    assert notes == [f"process list: list at {s.init_task + T_TASKS:#x} loops or exceeds {tasks_mod.MAX_TASKS} entries"]


def test_process_list_length_is_bounded(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    s, _ = standard()
    monkeypatch.setattr(tasks_mod, "MAX_TASKS", 3)
    tasks, notes = read_tasks(s.kernel(), NCPUS)
    assert notes == [f"process list: list at {s.init_task + T_TASKS:#x} loops or exceeds 3 entries"]
    # at most MAX_TASKS from the lists (swapper/0, systemd, kthreadd), then the CPUs' current tasks
    assert [x.comm for x in tasks] == ["swapper/0", "systemd", "kthreadd", "bash", "swapper/1"]


def test_wild_pointer_in_process_list_keeps_what_came_before() -> None:
    s, t = standard()
    s.q(t["bash"] + T_TASKS, LIST_POISON1)
    tasks, notes = read_tasks(s.kernel(), NCPUS)
    assert summary(tasks) == [e for e in EXPECTED if e[3] not in ("worker", "worker-io", "defunct", "sh")]
    assert notes[0].startswith(f"process list: list at {s.init_task + T_TASKS:#x} broken: ")
    assert f"{LIST_POISON1:#x}" in notes[0] and "not canonical" in notes[0]  # faults, aliases nothing
    assert len(notes) == 1  # the unreadable pointer is not handed back as an entry


def test_leader_missing_from_its_thread_ring_is_kept_and_noted() -> None:
    s, t = standard()
    sig = s.thread_group([t["worker"], t["worker-io"]])
    s.link(sig + SIG_THREAD_HEAD, [t["worker-io"] + T_THREAD_NODE])  # a damaged ring without its leader
    tasks, notes = read_tasks(s.kernel(), NCPUS)
    got = {x.comm: x.pid for x in tasks}
    assert got["worker"] == 300 and got["worker-io"] == 301
    assert f"threads of {t['worker']:#x}: the ring does not hold its leader" in notes


def test_wild_pointers_in_thread_list_parent_and_current_task_are_noted() -> None:
    s, t = standard()
    s.q(t["worker-io"] + T_THREAD_NODE, UNMAPPED)  # the thread ring breaks after the second thread
    s.q(t["defunct"] + T_REAL_PARENT, UNMAPPED + 0x40)  # a parent we cannot read: ppid -1
    s.q(s.pcpu[1] + PCPU_CURRENT_TASK, UNMAPPED + 0x80)
    tasks, notes = read_tasks(s.kernel(), NCPUS)
    got = {x.comm: (x.pid, x.ppid) for x in tasks}
    assert got["worker"] == (300, 200) and got["worker-io"] == (301, 200)  # both threads read before the break
    assert got["defunct"] == (400, -1)
    assert "swapper/1" not in got
    assert len(tasks) == 9
    assert notes[0].startswith(f"threads of {t['worker']:#x}: list at ") and "broken" in notes[0]
    assert notes[-1].startswith("current task of CPU 1 unreadable: ") and f"{UNMAPPED + 0x80:#x}" in notes[-1]
    # (the unreadable thread_node pointer is also handed back as a thread: a note about it alone may sit between)
    assert all(f"{UNMAPPED - T_THREAD_NODE:#x}" in n for n in notes[1:-1])


def test_task_struct_partly_outside_the_image_is_noted_not_raised() -> None:
    s = Scene()
    # two leaders in vmalloc space, each with one mapped page: A's tasks node is at that page's end and its
    # signal field beyond it; B starts on the page before its mapped one (its fields up to comm are readable)
    page_a = s.map_pages(VMALLOC + 0x100000, 1)
    a = page_a + PAGE - (T_TASKS + 16)
    page_b = s.map_pages(VMALLOC + 0x200000, 1)
    b = page_b - 200
    standard(s)
    s.task(500, "half-a", addr=a)
    s.task(501, "half-b", addr=b)
    s.thread_group([b])  # A's signal field cannot be written: it stays unreadable
    init = s.init_task
    nodes = []
    cur = s.u64(init + T_TASKS)
    while cur != init + T_TASKS:
        nodes.append(cur)
        cur = s.u64(cur)
    s.link(init + T_TASKS, nodes + [a + T_TASKS, b + T_TASKS])
    tasks, notes = read_tasks(s.kernel(), NCPUS)
    assert summary(tasks) == EXPECTED  # the others are all there
    assert len(notes) == 3
    assert notes[0].startswith(f"task {a:#x}: signal_struct unreadable: ")
    assert notes[1].startswith(f"task {a:#x} unreadable: ")
    assert notes[2].startswith(f"task {b:#x} unreadable: ")


# -- backtraces -------------------------------------------------------------------------------
def plant_switch_frame(s: Scene, task: int, ret: int) -> tuple[int, int]:
    """struct inactive_task_frame (r15 r14 r13 r12 bx bp ret_addr) at thread.sp, then the frames above it."""
    stack = s.u64(task + T_STACK)
    tsp = stack + 0x3E00
    s.q(task + T_THREAD + THREAD_SP, tsp)
    s.poke(tsp, struct.pack("<7Q", 15, 14, 13, 12, 0xB0B0, tsp + 0x100, ret))
    sp0 = tsp + 56
    words = [
        0x1234,
        task,  # __schedule's saved registers (not text)
        RET_IN_SCHEDULE,  # __schedule returns into schedule (CFA sp+24)
        0x5678,
        RET_IN_DO_NANOSLEEP,  # schedule's frame (CFA sp+16)
        RET_IN_RET_FROM_FORK,  # do_nanosleep's frame (CFA sp+8); ret_from_fork ends the stack
        TEXT + FUNCS["__schedule"] + 0x50,  # text not after a call: data, never a frame
        RET_IN___SCHEDULE,
    ]  # stale: left by an earlier call
    s.poke(sp0, struct.pack(f"<{len(words)}Q", *words))
    return tsp, stack


def test_backtrace_of_blocked_task_from_its_switch_frame_by_orc() -> None:
    s, t = standard()
    tsp, _ = plant_switch_frame(s, t["worker-io"], RET_IN___SCHEDULE)
    k = s.kernel()
    task = by_comm(read_tasks(k, NCPUS)[0])["worker-io"]
    assert task.thread_sp == tsp
    backtrace_task(k, task, None)
    assert [f.symbol for f in task.frames] == [
        "__schedule+0x85/0x100",
        "schedule+0x15/0x100",
        "do_nanosleep+0x45/0x100",
        "ret_from_fork+0x15/0x80",
    ]
    assert all(f.method == "orc" and f.reliable for f in task.frames)
    assert task.unwind_note == "from saved switch frame (thread.sp); end of stack (ORC)"


def test_backtrace_of_running_task_from_cpu_registers() -> None:
    s, t = standard()
    stack = s.u64(t["bash"] + T_STACK)
    rsp = stack + 0x3F00
    s.poke(rsp, struct.pack("<QQQ", 0x1111, RET_IN_DO_NANOSLEEP, RET_IN_RET_FROM_FORK))
    k = s.kernel()
    task = by_comm(read_tasks(k, NCPUS)[0])["bash"]
    backtrace_task(k, task, {"rip": TEXT + FUNCS["sysrq_handle_crash"] + 0x10, "rsp": rsp, "rbp": 0})
    assert [f.symbol for f in task.frames] == [
        "sysrq_handle_crash+0x10/0x80",
        "do_nanosleep+0x45/0x100",
        "ret_from_fork+0x15/0x80",
    ]
    assert task.unwind_note == "from CPU registers; end of stack (ORC)"


def test_backtrace_without_orc_falls_back_to_a_labelled_stack_scan() -> None:
    s, t = standard(Scene(orc=False))
    tsp, stack = plant_switch_frame(s, t["worker-io"], RET_IN___SCHEDULE)
    k = s.kernel()
    task = by_comm(read_tasks(k, NCPUS)[0])["worker-io"]
    backtrace_task(k, task, None)
    assert [f.symbol for f in task.frames] == [
        "schedule+0x15/0x100",
        "do_nanosleep+0x45/0x100",
        "ret_from_fork+0x15/0x80",
        "__schedule+0x85/0x100",
    ]
    assert [f.stack_addr for f in task.frames] == [tsp + 56 + 8 * i for i in (2, 4, 5, 7)]
    assert all(f.method == "stack scan" and not f.reliable for f in task.frames)
    assert task.unwind_note.startswith("ORC unavailable (no ORC tables in kallsyms")
    assert task.unwind_note.endswith("; from saved switch frame (thread.sp); ORC unavailable; stack scan: top of stack")


def test_backtrace_where_orc_stops_at_once_adds_the_stack_scan() -> None:
    s, t = standard()
    plant_switch_frame(s, t["worker-io"], TEXT + 0x50)  # text before the first ORC entry
    k = s.kernel()
    task = by_comm(read_tasks(k, NCPUS)[0])["worker-io"]
    backtrace_task(k, task, None)
    assert [(f.symbol, f.method) for f in task.frames] == [
        ("_stext+0x50/0x100", "orc"),
        ("schedule+0x15/0x100", "stack scan"),
        ("do_nanosleep+0x45/0x100", "stack scan"),
        ("ret_from_fork+0x15/0x80", "stack scan"),
        ("__schedule+0x85/0x100", "stack scan"),
    ]
    assert f"no ORC entry for {TEXT + 0x50:#x} (text without ORC data)" in task.unwind_note
    assert task.unwind_note.endswith("; stack scan: top of stack")


def test_backtrace_with_wild_thread_sp_is_noted() -> None:
    s, t = standard()
    s.q(t["worker"] + T_THREAD + THREAD_SP, UNMAPPED)
    k = s.kernel()
    task = by_comm(read_tasks(k, NCPUS)[0])["worker"]
    backtrace_task(k, task, None)
    assert task.frames == []
    assert task.unwind_note.startswith("no starting frame: ") and f"{UNMAPPED:#x}" in task.unwind_note


# -- modules ------------------------------------------------------------------------------------
MODULES = [
    ("pd_crash", "coming", MODULES_VADDR + 0x1000, 0x3000, 0x1000),
    ("virtio_net", "live", MODULES_VADDR + 0x8000, 0xB000, 0x7000),
    ("xfs", "going", MODULES_VADDR + 0x20000, 0x1A0000, 0x120000),
]


def mods(found: list) -> list[tuple]:  # type: ignore[type-arg]
    return [(m.name, m.state, m.base, m.size, m.text_size) for m in found]


def test_read_modules_6_1_core_layout() -> None:
    s, t = standard()
    found, notes = read_modules(s.kernel())
    assert notes == []
    assert mods(found) == MODULES
    assert [m.address for m in found] == [t["pd_crash"], t["virtio_net"], t["xfs"]]


def test_read_modules_6_4_mem_array_uses_mod_text() -> None:
    s, t = standard(Scene(module_layout="6.4"))
    found, notes = read_modules(s.kernel())
    assert notes == []
    # mem[MOD_TEXT] only: size is the text's, and so is text_size
    assert mods(found) == [(n, st, base, text, text) for n, st, base, _size, text in MODULES]


def test_module_list_loop_wild_pointer_and_unreadable_entry() -> None:
    s, t = standard()
    s.q(t["xfs"] + M_LIST, t["virtio_net"] + M_LIST)  # loops back into the ring
    found, notes = read_modules(s.kernel())
    assert mods(found) == MODULES
    assert notes == [f"module list: list at {s.modules_head:#x} loops or exceeds 4096 entries"]

    s, t = standard()
    s.q(t["virtio_net"] + M_LIST, LIST_POISON1)
    found, notes = read_modules(s.kernel())
    assert mods(found) == MODULES[:2]
    assert notes[0].startswith(f"module list: list at {s.modules_head:#x} broken: ")
    assert f"{LIST_POISON1:#x}" in notes[0]
    assert all(f"{LIST_POISON1 - M_LIST:#x}" in n for n in notes[1:])  # the wild pointer handed back as an entry

    s, t = standard()
    # a struct module whose first bytes (state) are on an unmapped page; its list node and name are not
    page = s.map_pages(MODULES_VADDR + 0x400000, 1)
    half = s.module(b"half", 0, MODULES_VADDR + 0x300000, 0x2000, 0x1000, addr=page - 8)
    s.link(s.modules_head, [t["pd_crash"] + M_LIST, half + M_LIST, t["virtio_net"] + M_LIST, t["xfs"] + M_LIST])
    found, notes = read_modules(s.kernel())
    assert mods(found) == MODULES
    assert len(notes) == 1 and notes[0].startswith(f"module at {half:#x} unreadable: ")


def test_read_modules_without_modules_symbol() -> None:
    s, _ = standard(Scene(omit=("modules",)))
    assert read_modules(s.kernel()) == ([], ["no modules symbol"])


# -- memory summary -------------------------------------------------------------------------------
ZONE = {
    "NR_FREE_PAGES": 2100,
    "NR_ZONE_ACTIVE_ANON": 120,
    "NR_ZONE_INACTIVE_ANON": 80,
    "NR_ZONE_ACTIVE_FILE": 300,
    "NR_ZONE_INACTIVE_FILE": 250,
    "NR_MLOCK": 4,
    "NR_BOUNCE": 0,
}
NODE = {
    "NR_FILE_PAGES": 560,
    "NR_ANON_MAPPED": 190,
    "NR_SHMEM": 12,
    "NR_FILE_DIRTY": 3,
    "NR_WRITEBACK": 1,
    "NR_SLAB_RECLAIMABLE_B": 140,
    "NR_SLAB_UNRECLAIMABLE_B": 310,
    "NR_KERNEL_STACK_KB": 9 * 16,
    "NR_PAGETABLE": 40,
}
TOTALRAM = 3800


def test_memory_summary_reads_the_planted_counters() -> None:
    s, _ = standard()
    s.set_counters(TOTALRAM, ZONE, NODE)
    out, notes = memory_summary(s.kernel())
    assert notes == []
    want = {"totalram_pages": TOTALRAM, **{n.lower(): v for n, v in {**ZONE, **NODE}.items()}}
    assert out == want  # NR_ZSPAGES is not in this kernel's enum: no key; no decoy slot read
    assert 0 <= out["nr_free_pages"] <= out["totalram_pages"]
    assert out["nr_file_pages"] + out["nr_anon_mapped"] + out["nr_free_pages"] <= out["totalram_pages"]


def test_memory_summary_degrades_per_missing_source() -> None:
    s, _ = standard(Scene(omit=("vm_node_stat", "_totalram_pages")))
    s.set_counters(TOTALRAM, ZONE, NODE)
    out, notes = memory_summary(s.kernel())
    assert notes == []
    assert out == {n.lower(): v for n, v in ZONE.items()}  # only the zone counters have a symbol

    s, _ = standard(Scene(node_enum=False))
    s.set_counters(TOTALRAM, ZONE, NODE)
    out, notes = memory_summary(s.kernel())
    assert out["totalram_pages"] == TOTALRAM
    assert notes == ["memory counters (node_stat_item): BTF has no enum node_stat_item"]
    # the zone counters do not depend on the node enum
    assert {k: v for k, v in out.items() if k != "totalram_pages"} == {n.lower(): v for n, v in ZONE.items()}
