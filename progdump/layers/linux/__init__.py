"""The Linux producer: layers from a panicked Linux guest's own memory.

Why: layer 0 must read like the console's panic output and layer 1 must
hold every task's stack, with no debug-info package (a real dump path has
none). Everything comes from VMCOREINFO and guest-physical memory: kallsyms
(Linux >= 6.0 publishes its tables in VMCOREINFO), the printk ring buffer,
the in-memory BTF, the ORC unwind tables and ``mem_map``.

The constructor raises :class:`LinuxUnsupported` (with the reason) when the
snapshot is not a usable x86-64 Linux one; the layer code falls back to the
generic producer. After construction nothing raises out of ``panic()``,
``tasks()`` or ``page_classes()``: a missing or corrupt piece degrades the
output with a reason in :attr:`degraded` and in the layer's notes.
"""

from __future__ import annotations

import json
import re
import time

from progdump.layers.base import Artifact, KernelMap, LayerContent, PageClassMap, Producer
from progdump.layers.generic import CONSOLE_TAIL_MAX, core_artifacts, find_panic_message
from progdump.layers.linux.kernel import LinuxKernel, LinuxUnsupported
from progdump.layers.linux.printk import LogRecord, PrintkError, format_records, read_log
from progdump.layers.linux.render import render_panic, render_tasks
from progdump.layers.linux.unwind import THREAD_SIZE, orc_unwind, stack_scan, stacks_of
from progdump.layers.registry import ProducerEntry, register_producer
from progdump.snapshot import PAGE_SIZE, Snapshot

__all__ = ["LinuxProducer", "LinuxUnsupported"]

LOG_TAIL_BYTES = 64 * 1024
JSON_LOG_TAIL_BYTES = 32 * 1024
CONSOLE_IN_PANIC_TXT = 16 * 1024  # console.txt (a core artifact) holds the full 64 KiB tail
CONSOLE_IN_PANIC_JSON = 8 * 1024
LAYER0_BUDGET = 256 * 1024  # all of layer 0, before compression, core artifacts included
MAX_CALL_TRACE_LINES = 128
PANIC_PREFIX = b"Kernel panic - not syncing: "
_REPORT_HEADER = re.compile(
    r"^(BUG:|Oops:|general protection fault|kernel BUG at|WARNING:|INFO: task|"
    r"Unable to handle|divide error|invalid opcode|stack segment|watchdog:|NMI )"
)


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class LinuxProducer(Producer):
    name = "linux"

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__(snapshot)
        t = time.perf_counter()
        self.k = LinuxKernel(snapshot)
        self.timings: dict[str, float] = {"init_s": time.perf_counter() - t}
        self.degraded += self.k.notes
        self._log: tuple[list[LogRecord], list[str]] | None = None
        self._task_stacks: list[int] | None = None  # layer 1's walk, reused by kernel_map()

    # -- shared pieces -------------------------------------------------------------
    def log(self) -> tuple[list[LogRecord], list[str]]:
        if self._log is None:
            try:
                self._log = read_log(self.k.mem, self.k.vi)
            except PrintkError as e:
                self._log = ([], [f"kernel log unavailable: {e}"])
                self.degraded.append(f"kernel log unavailable: {e}")
        return self._log

    def _panic_cpu(self) -> int | None:
        a = self.k.syms.address("panic_cpu")
        try:
            v = self.k.mem.s32(a) if a is not None else -1
        except Exception:
            return None
        return v if 0 <= v < 8192 else None

    # -- never raise ------------------------------------------------------------------
    def panic(self) -> LayerContent:
        """Layer 0; on an unexpected failure, the generic producer's layer 0 plus the reason."""
        return self._guarded("panic", self._panic)

    def tasks(self) -> LayerContent:
        """Layer 1; on an unexpected failure, an empty layer 1 with the reason."""
        return self._guarded("tasks", self._tasks)

    def _guarded(self, what: str, fn) -> LayerContent:  # type: ignore[no-untyped-def]
        try:
            return fn()
        except Exception as e:  # guest memory is untrusted: a bug or a corruption degrades, never aborts
            msg = f"linux {what}() failed: {_err(e)}; generic output used"
            self.degraded.append(msg)
            from progdump.layers.generic import GenericProducer  # noqa: PLC0415

            content = getattr(GenericProducer(self.snapshot), what)()
            content.notes.append(msg)
            return content

    # -- layer 0 -------------------------------------------------------------------
    def _panic(self) -> LayerContent:
        t0 = time.perf_counter()
        notes: list[str] = []
        d: dict = {"producer": "linux", "degraded": []}

        def degrade(msg: str) -> None:
            d["degraded"].append(msg)
            notes.append(msg)
            if msg not in self.degraded:
                self.degraded.append(msg)

        self.k.load_modules()
        notes += self.k.module_notes
        records, lnotes = self.log()
        notes += [n for n in lnotes if n not in self.degraded]  # degradations reach the notes once, via the plan
        text = format_records(records)
        # panic message: the kernel's own line in the log, else the console
        msg, src = None, None
        start = panic_record_index(records)
        if start is not None:
            msg = records[start].text[len(PANIC_PREFIX) :].decode("utf-8", "replace").strip()
            src = "the kernel log"

        if msg is None:
            msg = find_panic_message(self.snapshot.console_tail)
            src = "the console" if msg else None
        if msg is None:
            degrade("no panic message in the log or on the console")
        d["panic_message"], d["panic_message_source"] = msg, src
        # identity
        ident: dict[str, object] = {}
        try:
            u = self.k.uts()
            ident.update(release=u["release"], version=u["version"], hostname=u["nodename"], machine=u["machine"])
        except Exception as e:
            degrade(f"utsname unreadable: {_err(e)}")
            ident["release"] = self.k.release
        if records:
            ident["uptime"] = f"{records[-1].ts_nsec / 1e9:.3f} s (time stamp of the last log record)"
        try:
            a = self.k.syms.address("_totalram_pages")
            total = self.k.mem.s64(a) if a is not None else None
        except Exception:
            total = None
        ident["ram"] = f"{self.snapshot.total_bytes} bytes in the snapshot" + (
            f"; {total * PAGE_SIZE} bytes managed by the kernel" if total else ""
        )
        ident["kaslr_offset"] = f"{self.k.vi.kerneloffset():#x}"
        if "capture_method" in self.snapshot.metadata:
            ident["capture"] = str(self.snapshot.metadata["capture_method"])
        pcpu = self._panic_cpu()
        ident["panic_cpu"] = pcpu
        # CPUs
        currents: dict[int, int] = {}
        comm_of: dict[int, str] = {}
        try:
            from progdump.layers.linux.tasks import TaskLayout, current_tasks  # noqa: PLC0415

            currents = current_tasks(self.k, len(self.snapshot.cpus))
            L = TaskLayout(self.k.btf)
            for cpu_i, task_va in currents.items():
                comm = self.k.mem.read(task_va + L.comm, 16).split(b"\0")[0].decode("utf-8", "replace")
                comm_of[cpu_i] = f"{comm}[{self.k.mem.s32(task_va + L.pid)}]"
        except Exception as e:
            notes.append(f"current tasks unknown: {_err(e)}")
        if pcpu is not None and pcpu in comm_of:
            ident["panic_task"] = comm_of[pcpu]
        d["identity"] = ident
        d["cpus"] = []
        for c in self.snapshot.cpus:
            rip = c.regs.get("rip", 0)
            entry = {
                "cpu": c.index,
                "panicking": c.index == pcpu,
                "rip_symbol": self.k.syms.format(rip),
                "task": comm_of.get(c.index),
                "regs": {k: f"{v:#x}" for k, v in c.regs.items()},
            }
            if c.index != pcpu and len(self.snapshot.cpus) > 1:  # what the other CPUs were doing
                try:
                    frames, why = orc_unwind(
                        self.k.mem,
                        self.k.syms,
                        self.k.orc,
                        rip,
                        c.regs.get("rsp", 0),
                        c.regs.get("rbp", 0),
                        True,
                        max_frames=24,
                    )
                    entry["orc"] = {"frames": [f.as_dict() for f in frames], "end": why}
                except Exception as e:
                    entry["orc"] = {"frames": [], "end": f"ORC unavailable: {_err(e)}"}
            d["cpus"].append(entry)
        # backtraces
        d["backtrace"] = {"log": self._log_call_trace(records), "orc": {}, "scan": {}}
        if records and not d["backtrace"]["log"]:
            notes.append("no Call Trace block in the log")
        cpu = next(
            (c for c in self.snapshot.cpus if c.index == pcpu), self.snapshot.cpus[0] if self.snapshot.cpus else None
        )
        if cpu is None:
            degrade("no CPU registers in the snapshot: no unwind")
        else:
            r = cpu.regs
            sps = [r.get("rsp", 0)]
            try:
                frames, why = orc_unwind(
                    self.k.mem, self.k.syms, self.k.orc, r.get("rip", 0), r.get("rsp", 0), r.get("rbp", 0), True
                )
                d["backtrace"]["orc"] = {"cpu": cpu.index, "frames": [f.as_dict() for f in frames], "end": why}
                sps += [f.sp for f in frames]
            except Exception as e:
                degrade(f"ORC unwind unavailable: {_err(e)}")
            # scan every stack the unwind crossed (NMI -> IRQ -> task), like the kernel's own trace
            scan: list = []
            ends: list[str] = []
            try:
                for lo, hi in stacks_of(sps)[:4]:
                    frames, why = stack_scan(self.k.mem, self.k.syms, lo, hi)
                    scan += frames
                    ends.append(f"{lo:#x}..{hi:#x}: {len(frames)} frames, {why}")
                d["backtrace"]["scan"] = {
                    "cpu": cpu.index,
                    "frames": [f.as_dict() for f in scan],
                    "end": "; ".join(ends),
                }
            except Exception as e:
                degrade(f"stack scan failed: {_err(e)}")
        # log and console
        d["log_records"] = len(records)
        d["log_bytes"] = len(text.encode())
        d["log_tail"] = tail_utf8(text, LOG_TAIL_BYTES)
        d["console_tail"] = tail_utf8(
            self.snapshot.console_tail[-CONSOLE_TAIL_MAX:].decode("utf-8", "replace"), CONSOLE_IN_PANIC_TXT
        )
        d["log_notes"] = lnotes
        panic_txt = render_panic(d).encode()
        dj = dict(d)
        dj["log_tail"] = tail_utf8(text, JSON_LOG_TAIL_BYTES)
        dj["console_tail"] = tail_utf8(d["console_tail"], CONSOLE_IN_PANIC_JSON)
        panic_json = json.dumps(dj, indent=1).encode()
        dmesg = text.encode()
        core = sum(len(a.data) for a in core_artifacts(self.snapshot))  # the plan adds these to layer 0
        room = LAYER0_BUDGET - core - len(panic_txt) - len(panic_json)
        if len(dmesg) > room:
            cut = len(dmesg) - max(room, 0)
            nl = dmesg.find(b"\n", cut)
            dmesg = dmesg[nl + 1 :] if nl >= 0 else b""
            notes.append(
                f"dmesg.txt holds the newest {len(dmesg)} of {d['log_bytes']} log bytes (layer 0 budget); "
                "the whole ring buffer is in the kernel layer's memory"
            )
        self.timings["panic_s"] = time.perf_counter() - t0
        arts = [Artifact("panic.txt", panic_txt), Artifact("panic.json", panic_json), Artifact("dmesg.txt", dmesg)]
        return LayerContent(artifacts=arts, notes=notes)

    @staticmethod
    def _log_call_trace(records: list[LogRecord]) -> list[str]:
        """The kernel's own report of the panic, as printed in the log.

        From panic()'s line through the Call Trace that follows it; when
        panic() printed no trace (after an oops it does not: the oops report
        came first), the last report before it, from its header line
        (``BUG:``, ``Oops:``, ``general protection fault`` ...) on.
        """
        start = panic_record_index(records)
        if start is None:
            return []
        after = [r.text.decode("utf-8", "replace").rstrip() for r in records[start : start + MAX_CALL_TRACE_LINES]]
        out: list[str] = []
        for line in after:
            if line.startswith("---[ end Kernel panic"):
                break
            if not line.startswith("Kernel Offset:"):
                out.append(line)
        if any(ln.startswith("Call Trace:") for ln in out):
            return out
        before = [
            r.text.decode("utf-8", "replace").rstrip() for r in records[max(0, start - MAX_CALL_TRACE_LINES) : start]
        ]
        traces = [i for i, ln in enumerate(before) if ln.startswith("Call Trace:")]
        if not traces:
            return out
        trace = traces[-1]
        lo = max(0, trace - 40)
        for i in range(trace - 1, lo - 1, -1):
            if before[i].startswith("---[ end trace"):  # the previous report ends here
                lo = i + 1
                break
        head = next((i for i in range(lo, trace) if _REPORT_HEADER.match(before[i])), trace)
        return before[head:] + out

    # -- layer 1 -------------------------------------------------------------------
    def _tasks(self) -> LayerContent:
        from progdump.layers.linux.tasks import backtrace_task, current_tasks, memory_summary, read_tasks  # noqa: PLC0415

        t0 = time.perf_counter()
        self.k.load_modules()
        notes: list[str] = list(self.k.module_notes)
        d: dict = {"producer": "linux", "notes": notes}
        stack_pfns: list[int] = []
        try:
            tasks, tn = read_tasks(self.k, len(self.snapshot.cpus))
            notes += tn
        except Exception as e:
            msg = f"task list unavailable: {_err(e)}"
            self.degraded.append(msg)
            return LayerContent(notes=[msg])
        self._task_stacks = [t.stack for t in tasks if t.stack]
        regs_of: dict[int, dict[str, int]] = {}
        try:
            for cpu_i, task_va in current_tasks(self.k, len(self.snapshot.cpus)).items():
                c = next((c for c in self.snapshot.cpus if c.index == cpu_i), None)
                if c is not None:
                    regs_of[task_va] = c.regs
        except Exception as e:
            notes.append(f"running tasks unknown: {_err(e)}")
        for t in tasks:
            try:
                backtrace_task(self.k, t, regs_of.get(t.address))
            except Exception as e:
                t.unwind_note = f"unwind failed: {_err(e)}"
            if t.stack:
                for off in range(0, THREAD_SIZE, PAGE_SIZE):
                    try:
                        pa, _ = self.k.mem.to_phys(t.stack + off)
                        if self.snapshot.has_phys(pa, PAGE_SIZE):
                            stack_pfns.append(pa // PAGE_SIZE)
                    except Exception:
                        pass
        tasks.sort(key=lambda t: (t.tgid, t.pid))
        d["tasks"] = [t.as_dict() for t in tasks]
        mods = self.k.load_modules()
        d["modules"] = [{"name": m.name, "state": m.state, "base": f"{m.base:#x}", "size": m.size} for m in mods]
        mem, mn = memory_summary(self.k)
        notes += mn
        d["memory"] = mem
        d["kernel_stack_pages"] = len(stack_pfns)
        runs = _runs(sorted(set(stack_pfns)))
        self.timings["tasks_s"] = time.perf_counter() - t0
        arts = [
            Artifact("tasks.txt", render_tasks(d).encode()),
            Artifact("tasks.json", json.dumps(d, indent=1).encode()),
        ]
        return LayerContent(artifacts=arts, page_runs=lambda: iter(runs), notes=list(notes))

    # -- layers 2-4 ------------------------------------------------------------------
    def page_classes(self) -> PageClassMap | None:
        from progdump.layers.linux.pages import build_page_classes  # noqa: PLC0415

        try:
            pcm, notes, timings = build_page_classes(self.k)
        except ImportError as e:
            self.degraded.append(f"page classes need numpy: {e}")
            return None
        except Exception as e:
            self.degraded.append(f"page classes unavailable: {_err(e)}")
            return None
        self.degraded += notes
        self.timings.update({f"pages_{k}": v for k, v in timings.items()})
        return pcm

    def kernel_map(self, classes: PageClassMap) -> KernelMap | None:
        """Kernel pages by what they hold (see :mod:`kmem`); None, with the reason, when unreadable."""
        from progdump.layers.linux.kmem import build_kernel_map  # noqa: PLC0415
        from progdump.layers.linux.tasks import read_tasks  # noqa: PLC0415

        stacks = self._task_stacks
        if stacks is None:  # layer 1 did not walk the tasks (another plan, or it failed)
            try:
                tasks, _ = read_tasks(self.k, len(self.snapshot.cpus))
                stacks = [t.stack for t in tasks if t.stack]
            except Exception as e:
                stacks = []
                self.degraded.append(f"kernel stacks not classed (task list unavailable: {_err(e)})")
        try:
            km, timings = build_kernel_map(self.k, classes, stacks)
        except ImportError as e:
            self.degraded.append(f"kernel page kinds need numpy: {e}")
            return None
        except Exception as e:
            self.degraded.append(f"kernel page kinds unavailable: {_err(e)}")
            return None
        self.timings.update({f"kmem_{k}": v for k, v in timings.items()})
        return km


def panic_record_index(records: list[LogRecord]) -> int | None:
    """Index of the last record that is panic()'s own line."""
    for i in range(len(records) - 1, -1, -1):
        if records[i].text.startswith(PANIC_PREFIX):
            return i
    return None


def tail_utf8(text: str, nbytes: int) -> str:
    """The last whole lines of ``text`` within ``nbytes`` bytes."""
    b = text.encode()
    if len(b) <= nbytes:
        return text
    cut = b[-nbytes:]
    nl = cut.find(b"\n")
    return cut[nl + 1 :].decode("utf-8", "replace")


def _runs(pfns: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for p in pfns:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


def _raw_panic(snapshot: Snapshot) -> LayerContent:
    from progdump.layers.linux.rawpanic import raw_panic  # noqa: PLC0415

    return raw_panic(snapshot)


def _accepts(snapshot: Snapshot) -> str | None:
    return None if snapshot.vmcoreinfo is not None else "no VMCOREINFO note"


def _raw_page_classes(snapshot: Snapshot) -> tuple[PageClassMap, list[str]]:
    from progdump.layers.linux.pages import raw_page_classes  # noqa: PLC0415

    return raw_page_classes(snapshot)


register_producer(
    ProducerEntry(
        name="linux",
        accepts=_accepts,
        factory=LinuxProducer,
        priority=10,
        preload=(
            "progdump.layers.linux.tasks",
            "progdump.layers.linux.modules",
            "progdump.layers.linux.pages",
            "progdump.layers.linux.rawpanic",
            "progdump.layers.linux.kmem",
        ),
        raw_panic=_raw_panic,
        raw_page_classes=_raw_page_classes,
    )
)
