"""Text renderings of the Linux layers: panic.txt and tasks.txt.

Why plain text in the console's own shapes: the first reader of a recovered
dump is a person with ``less``, not a debugger. Every backtrace line carries
the method that produced it, so a guess never reads as a fact. Functions
here are pure (dicts in, text out) so golden tests pin the format.
"""

from __future__ import annotations

__all__ = ["render_panic", "render_tasks", "fmt_regs"]

_REG_ROWS = (
    ("rip", "rsp", "rflags"),
    ("rax", "rbx", "rcx"),
    ("rdx", "rsi", "rdi"),
    ("rbp", "r8", "r9"),
    ("r10", "r11", "r12"),
    ("r13", "r14", "r15"),
    ("cs", "ss", "fs_base"),
    ("gs_base", "cr0", "cr2"),
    ("cr3", "cr4", "efer"),
)


def fmt_regs(regs: dict[str, int]) -> list[str]:
    lines = []
    for row in _REG_ROWS:
        cells = [f"{n.upper():>7}: {regs[n]:016x}" for n in row if n in regs]
        if cells:
            lines.append("  " + " ".join(cells))
    return lines


def _frame_lines(frames: list[dict], guess_prefix: bool = True) -> list[str]:
    out = []
    for i, f in enumerate(frames):
        mark = " " if f["reliable"] else "?"
        where = f" (stack {f['stack_addr']})" if f.get("stack_addr") else ""
        out.append(f" #{i:<2} {mark} {f['symbol']:<48} [{f['method']}]{where}")
    return out


def render_panic(d: dict) -> str:
    """panic.txt from the panic.json dict (see LinuxProducer.panic)."""
    L: list[str] = []
    ident = d.get("identity", {})
    L.append("progdump layer 0: Linux panic, read from the frozen guest's memory (no debug info used)")
    L.append("")
    L.append(
        f"Kernel panic - not syncing: {d['panic_message']}"
        if d.get("panic_message")
        else "panic message: (not found in the log or on the console)"
    )
    if d.get("panic_message_source"):
        L.append(f"  (message from {d['panic_message_source']})")
    for k in (
        "release",
        "version",
        "hostname",
        "machine",
        "uptime",
        "ram",
        "kaslr_offset",
        "panic_cpu",
        "panic_task",
        "capture",
    ):
        if ident.get(k) not in (None, ""):
            L.append(f"{k + ':':<14}{ident[k]}")
    for note in d.get("degraded", []):
        L.append(f"degraded:     {note}")
    L.append("")
    for cpu in d.get("cpus", []):
        tag = " (panicking)" if cpu.get("panicking") else ""
        task = f"  task {cpu['task']}" if cpu.get("task") else ""
        L.append(f"---- CPU {cpu['cpu']}{tag}: RIP {cpu.get('rip_symbol', '?')}{task}")
        L += fmt_regs({k: int(v, 16) for k, v in cpu.get("regs", {}).items()})
        if "orc" in cpu:
            L.append(f"  backtrace of CPU {cpu['cpu']} (method: orc):")
            L += _frame_lines(cpu["orc"]["frames"]) or ["  (no frames)"]
            L.append(f"  unwind ended: {cpu['orc']['end']}")
    L.append("")
    bt = d.get("backtrace", {})
    log_trace = bt.get("log", [])
    L.append(
        "---- panic backtrace 1: the kernel's own Call Trace, from the log "
        "(method: log; lines with '?' are the kernel's own guesses)"
    )
    L += [f"  {line}" for line in log_trace] if log_trace else ["  (no Call Trace in the log)"]
    L.append("")
    orc = bt.get("orc", {})
    L.append(
        f"---- panic backtrace 2: ORC unwind of CPU {orc.get('cpu', '?')} from its frozen registers "
        "(method: orc; reliable while stack and tables are intact)"
    )
    L += _frame_lines(orc.get("frames", [])) or ["  (no frames)"]
    if orc.get("end"):
        L.append(f"  unwind ended: {orc['end']}")
    L.append("")
    scan = bt.get("scan", {})
    L.append(
        "---- panic backtrace 3: stack scan of every stack the unwind crossed "
        "(method: stack scan; text addresses after a call instruction: may be stale, '?')"
    )
    L += _frame_lines(scan.get("frames", [])) or ["  (no frames)"]
    if scan.get("end"):
        L.append(f"  scan ended: {scan['end']}")
    L.append("")
    log = d.get("log_tail", "")
    L.append(
        f"---- kernel log: last {len(log.encode())} bytes of {d.get('log_bytes', 0)} "
        f"({d.get('log_records', 0)} records; dmesg.txt has the log as recovered) ----"
    )
    L.append(log.rstrip("\n"))
    L.append("")
    con = d.get("console_tail", "")
    L.append(f"---- console tail (last {len(con.encode())} bytes; console.txt has more) ----")
    L.append(con.rstrip("\n"))
    L.append("")
    return "\n".join(L)


def _secs(ns: int | None) -> str:
    if ns is None:
        return "-"
    return f"{ns / 1e9:.3f}s"


def render_tasks(d: dict) -> str:
    """tasks.txt from the tasks.json dict (see LinuxProducer.tasks)."""
    L: list[str] = ["progdump layer 1: Linux tasks, read from the frozen guest's memory with its own BTF", ""]
    for note in d.get("notes", []):
        L.append(f"note: {note}")
    tasks = d.get("tasks", [])
    L.append(f"{len(tasks)} tasks")
    stuck = [t for t in tasks if t["state"] == "D"]
    if stuck:
        L.append(
            f"{len(stuck)} in D state (uninterruptible): "
            + ", ".join(
                f"{t['comm']}[{t['pid']}]"
                + (
                    f" idle {_secs(t.get('last_ran_ns_before_panic'))}"
                    if t.get("last_ran_ns_before_panic") is not None
                    else ""
                )
                for t in stuck
            )
        )
    L.append(f"{'PID':>7} {'PPID':>7} {'TGID':>7} CPU ST {'LAST RAN':>10} {'TASK':<18} COMM")
    for t in tasks:
        ago = _secs(t.get("last_ran_ns_before_panic"))
        L.append(
            f"{t['pid']:>7} {t['ppid']:>7} {t['tgid']:>7} {t['cpu']:>3} {t['state']:<2} {ago:>10} {t['task']:<18} "
            f"{t['comm']}{' [kthread]' if t['kthread'] else ''}{' (on cpu)' if t['on_cpu'] else ''}"
        )
    L.append("(LAST RAN: how long before the panic the task was last on a CPU, by that CPU's run-queue clock)")
    L.append("")
    L.append("---- kernel stacks ('?' marks stack-scan guesses; [method] on every frame) ----")
    for t in tasks:
        L.append(
            f"PID {t['pid']} ({t['comm']}) state {t['state']} cpu {t['cpu']} task {t['task']} "
            f"stack {t['stack']}: {t['unwind_note']}"
        )
        L += _frame_lines(t["backtrace"])
        L.append("")
    mods = d.get("modules", [])
    L.append(f"---- modules ({len(mods)}) ----")
    for m in mods:
        L.append(f"  {m['name']:<24} {m['size']:>8}  {m['state']:<8} {m['base']}")
    L.append("")
    mem = d.get("memory", {})
    L.append("---- memory (kernel counters, 4 KiB pages) ----")
    for k, v in mem.items():
        L.append(
            f"  {k:<28} {v:>10}  ({v * 4096 / 1048576:.1f} MiB)" if not k.endswith("_kb") else f"  {k:<28} {v:>10}"
        )
    L.append("")
    return "\n".join(L)
