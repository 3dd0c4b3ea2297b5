"""Render ``dmesg.txt`` and ``panic.txt`` at recovery, from layer 0's raw pages (see rawpanic.py).

The same printk reader the writer-side producer uses (:func:`read_log`,
:func:`format_records`) and the same panic.txt renderer, over a snapshot of
whatever pages were recovered: with layer 0 alone, the printk ring, the
stacks and the page tables that map them. Symbols and unwinds need kallsyms
and ORC, which live in later layers; panic.txt then carries the kernel's own
Call Trace from the log and says the rest is missing.

Pure with respect to its input: never writes files, never raises for bad
memory (guest memory is untrusted); returns what it could render and notes.
"""

from __future__ import annotations

from progdump.layers.generic import CONSOLE_TAIL_MAX, find_panic_message
from progdump.layers.linux import LOG_TAIL_BYTES, PANIC_PREFIX, LinuxProducer, panic_record_index, tail_utf8
from progdump.layers.linux.printk import PrintkError, format_records, read_log
from progdump.layers.linux.rawpanic import RawPanicError, minimal_memory
from progdump.layers.linux.render import render_panic
from progdump.snapshot import Snapshot

__all__ = ["render_from_pages"]

CONSOLE_IN_PANIC_TXT = 8 * 1024


def render_from_pages(snapshot: Snapshot) -> tuple[dict[str, bytes], list[str]]:
    """``({"dmesg.txt": ..., "panic.txt": ...}, notes)``; either file may be missing (notes say why)."""
    notes: list[str] = []
    try:
        mem, vi = minimal_memory(snapshot)
        records, lnotes = read_log(mem, vi)
        notes += lnotes
    except (RawPanicError, PrintkError) as e:
        notes.append(f"kernel log not renderable from the recovered pages: {e}")
        mem, vi, records = None, None, []
    out: dict[str, bytes] = {}
    text = format_records(records)
    if records:
        out["dmesg.txt"] = text.encode()
    msg, src = None, None
    start = panic_record_index(records)
    if start is not None:
        msg, src = records[start].text[len(PANIC_PREFIX) :].decode("utf-8", "replace").strip(), "the kernel log"
    if msg is None:
        msg = find_panic_message(snapshot.console_tail)
        src = "the console" if msg else None
    ident: dict[str, object] = {}
    if vi is not None:
        try:
            ident["release"] = vi.osrelease()
            ident["kaslr_offset"] = f"{vi.kerneloffset():#x}"
        except Exception:  # noqa: BLE001 - untrusted text; identity is best effort
            pass
    if records:
        ident["uptime"] = f"{records[-1].ts_nsec / 1e9:.3f} s (time stamp of the last log record)"
    why = (
        "rendered at recovery from layer 0's raw pages (printk ring, stacks, page tables): no symbols or "
        "unwind tables yet; the full panic.txt is in layer 1"
    )
    d = {
        "panic_message": msg, "panic_message_source": src, "identity": ident, "degraded": [why, *notes],
        "cpus": [{"cpu": c.index, "rip_symbol": f"{c.regs.get('rip', 0):#x}",
                  "regs": {k: f"{v:#x}" for k, v in c.regs.items()}} for c in snapshot.cpus],
        "backtrace": {"log": LinuxProducer._log_call_trace(records), "orc": {"end": "needs ORC tables (a later layer)"},
                      "scan": {"end": "needs kallsyms (a later layer)"}},
        "log_records": len(records), "log_bytes": len(text.encode()), "log_tail": tail_utf8(text, LOG_TAIL_BYTES),
        "console_tail": tail_utf8(snapshot.console_tail[-CONSOLE_TAIL_MAX:].decode("utf-8", "replace"), CONSOLE_IN_PANIC_TXT),
    }  # fmt: skip
    out["panic.txt"] = render_panic(d).encode()
    return out, notes
