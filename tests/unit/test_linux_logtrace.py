"""Which log lines layer 0 quotes as the kernel's own Call Trace."""

from __future__ import annotations

from progdump.layers.linux import LinuxProducer
from progdump.layers.linux.printk import LogRecord


def recs(lines: list[str]) -> list[LogRecord]:
    return [LogRecord(i, i * 1000, ln.encode()) for i, ln in enumerate(lines)]


def test_trace_after_the_panic_line() -> None:
    log = [
        "boot",
        "Kernel panic - not syncing: sysrq triggered crash",
        "CPU: 0 PID: 1",
        "Call Trace:",
        " <TASK>",
        " sysrq_handle_crash+0x16/0x20",
        " </TASK>",
        "Kernel Offset: 0x1 from 0x2",
        "---[ end Kernel panic - not syncing: sysrq triggered crash ]---",
    ]
    assert LinuxProducer._log_call_trace(recs(log)) == log[1:7]


def test_oops_report_before_the_panic_line() -> None:
    log = [
        "WARNING: old report",
        "Call Trace:",
        " old+0x1/0x2",
        "---[ end trace 0000000000000000 ]---",
        "BUG: kernel NULL pointer dereference, address: 0000000000000000",
        "#PF: supervisor read",
        "Oops: 0000 [#1] PREEMPT SMP NOPTI",
        "CPU: 0 PID: 7",
        "RIP: 0010:foo+0x1/0x10",
        "Call Trace:",
        " <TASK>",
        " bar+0x5/0x20",
        " </TASK>",
        "Modules linked in: x",
        "---[ end trace 0000000000000000 ]---",
        "Kernel panic - not syncing: Fatal exception",
        "Kernel Offset: 0x1 from 0x2",
        "---[ end Kernel panic - not syncing: Fatal exception ]---",
    ]
    assert LinuxProducer._log_call_trace(recs(log)) == log[4:16]


def test_no_panic_line_no_trace() -> None:
    assert LinuxProducer._log_call_trace(recs(["Call Trace:", " x+0x1/0x2"])) == []
