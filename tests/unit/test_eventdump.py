"""harness.eventdump without a VM: the from-event arithmetic on a hand-made trace, the console parser.

The trace is written record by record with hand-picked times (no device
model, no writer); the expected figures are worked out by hand in the test.
The console text is a copy of what the stand-in guest printed for a sysrq
panic (trimmed), plus made-up variants for the oops order and bad input.
"""

from __future__ import annotations

import pytest

from harness.crashsim.trace import read_trace
from harness.errors import TrialError
from harness.eventdump import after_event_ms, check_layer0, console_expectations
from progdump.devmodel import K_FLUSH, K_MARK, K_WRITE, TraceWriter

OPEN_NS = 5_000_000_000_000  # the writer opened its device at CLOCK_MONOTONIC 5000 s (armed)


def _trace(tmp_path, open_ns=OPEN_NS):
    """Layer 0 written at 2.0 s after open, flushed 2.0004 -> 2.0060; layer 1 flushed -> 2.5000."""
    p = str(tmp_path / "hand.trace")
    w = TraceWriter(p, {"format": "progdump-trace", "device_size": 1 << 20, "sector_size": 512,
                        "open_monotonic_ns": open_ns, "open_realtime_ns": 1})  # fmt: skip
    w.record(K_WRITE, 0, 4096, 4096, 2.0000, 2.0004, 2.0004, payload=b"a" * 4096)
    w.record(K_FLUSH, 1, 0, 0, 2.0004, 2.0060, 2.0060)
    w.record(K_MARK, 2, 0, 7, 2.0060, 2.0060, 2.0060, payload=b"layer 0")
    w.record(K_WRITE, 3, 8192, 4096, 2.0060, 2.1000, 2.1000, payload=b"b" * 4096)
    w.record(K_FLUSH, 4, 0, 0, 2.1000, 2.5000, 2.5000)
    w.record(K_MARK, 5, 0, 7, 2.5000, 2.5000, 2.5000, payload=b"layer 1")
    w.close()
    return read_trace(p)


def test_after_event_counts_from_the_event_reception_to_the_durable_flush(tmp_path):
    tr = _trace(tmp_path)
    try:
        # event received 1.995 s after the open: layer 0 durable at 2.006 s -> 11.0 ms; layer 1 at 2.5 s -> 505.0 ms
        ev = after_event_ms(tr, ["panic", "tasks"], OPEN_NS + 1_995_000_000)
    finally:
        tr.close()
    assert ev == {"panic": 11.0, "tasks": 505.0}


def test_after_event_refuses_a_layer_durable_before_the_event_and_a_trace_without_monotonic_open(tmp_path):
    tr = _trace(tmp_path)
    try:
        with pytest.raises(TrialError, match="before the panic event"):
            after_event_ms(tr, ["panic", "tasks"], OPEN_NS + 2_100_000_000)
    finally:
        tr.close()
    (tmp_path / "n").mkdir()
    tr = _trace(tmp_path / "n", open_ns=None)
    try:
        with pytest.raises(TrialError, match="open_monotonic_ns"):
            after_event_ms(tr, ["panic"], 0)
    finally:
        tr.close()


SYSRQ_CONSOLE = """\
echo c > /proc/sysrq-trigger\r
[    6.699458] sysrq: Trigger a crash\r
[    6.699879] Kernel panic - not syncing: sysrq triggered crash\r
[    6.700120] CPU: 0 PID: 206 Comm: sh Not tainted 6.1.0-57-cloud-amd64 #1  Debian 6.1.192-3\r
[    6.700563] Call Trace:\r
[    6.701144]  <TASK>\r
[    6.701293]  dump_stack_lvl+0x44/0x5c\r
[    6.701579]  panic+0x118/0x2f4\r
[    6.701651]  ? _printk+0x68/0x83\r
[    6.701708]  sysrq_handle_crash+0x16/0x20\r
[    6.701775]  __handle_sysrq.cold+0x41/0x11c\r
[    6.702537] RIP: 0033:0x47b7a0\r
[    6.703746]  </TASK>\r
[    6.704274] Kernel Offset: 0x2b600000 from 0xffffffff81000000\r
[    6.704614] ---[ end Kernel panic - not syncing: sysrq triggered crash ]---\r
"""


def test_console_expectations_of_a_sysrq_panic():
    e = console_expectations(SYSRQ_CONSOLE)
    assert e.panic_message == "sysrq triggered crash"
    # '?' frames are not the unwinder's: left out; order kept
    assert e.frames == ("dump_stack_lvl", "panic", "sysrq_handle_crash", "__handle_sysrq.cold")
    assert e.log_lines == ("sysrq: Trigger a crash",)  # the shell's echo has no time stamp: not the kernel's


def test_console_expectations_after_an_oops_take_the_oops_trace():
    text = (
        "[ 5.1] BUG: kernel NULL pointer dereference, address: 0000000000000000\n"
        "[ 5.2] Call Trace:\n[ 5.3]  <TASK>\n[ 5.4]  pdoops_write+0x10/0x20 [pdoops]\n"
        "[ 5.5]  vfs_write+0xc4/0x3f0\n[ 5.6]  </TASK>\n"
        "[ 5.7] Kernel panic - not syncing: Fatal exception\n"
    )
    e = console_expectations(text)
    assert e.panic_message == "Fatal exception"
    assert e.frames == ("pdoops_write", "vfs_write")
    assert e.log_lines == ("BUG: kernel NULL pointer dereference, address: 0000000000000000",)


def test_console_expectations_refuse_text_without_a_panic_and_bound_long_lines():
    with pytest.raises(ValueError, match="no 'Kernel panic"):
        console_expectations("[ 1.0] all fine\n" + "x" * 100_000)
    e = console_expectations("[ 1.0] Kernel panic - not syncing: " + "y" * 100_000)
    assert len(e.panic_message) < 5000


def test_check_layer0_names_what_is_missing(tmp_path):
    e = console_expectations(SYSRQ_CONSOLE)
    (tmp_path / "panic.txt").write_text("Kernel panic - not syncing: sysrq triggered crash\n")
    good = (
        "[    6.699458] sysrq: Trigger a crash\n[    6.699879] Kernel panic - not syncing: sysrq triggered crash\n"
        "[    6.700563] Call Trace:\n[    6.701293]  dump_stack_lvl+0x44/0x5c\n[    6.701579]  panic+0x118/0x2f4\n"
        "[    6.701708]  sysrq_handle_crash+0x16/0x20\n[    6.701775]  __handle_sysrq.cold+0x41/0x11c\n"
    )
    (tmp_path / "dmesg.txt").write_text("[ 2.1] PD-KMSG-1 marker\n" + good)
    assert check_layer0(str(tmp_path), ["complete", "missing"], e, "PD-KMSG-1 marker") == []
    probs = check_layer0(str(tmp_path), ["complete", "complete"], e, "PD-KMSG-2")
    assert any("not layer 0 alone" in p for p in probs) and any("planted" in p for p in probs)
    (tmp_path / "dmesg.txt").write_text(good.replace("  panic+0x118", "  other+0x118"))
    assert any("frame panic" in p for p in check_layer0(str(tmp_path), ["complete"], e))
    # frames out of order are not the kernel's backtrace
    swapped = good.replace("dump_stack_lvl+0x44/0x5c", "TMP").replace(
        "sysrq_handle_crash+0x16/0x20", "dump_stack_lvl+0x44/0x5c"
    )
    (tmp_path / "dmesg.txt").write_text(swapped.replace("TMP", "sysrq_handle_crash+0x16/0x20"))
    assert any("frame" in p for p in check_layer0(str(tmp_path), ["complete"], e))


def test_resident_writer_process_arms_refuses_and_reports_a_death_after_arming(tmp_path):
    """The real progdump.resident child: a missing device is a clear TrialError; a writer that dies after
    arming makes go() quiet and wait() name the failure (no traceback from the controller's loop)."""
    import os
    import signal

    from harness.eventdump import ResidentWriter, resident_argv
    from harness.trial import child_env

    with pytest.raises(TrialError, match="did not arm"):
        ResidentWriter(resident_argv(str(tmp_path / "nope.img"), "progressive-raw", "nvme", str(tmp_path / "t")),
                       child_env())  # fmt: skip
    dev = tmp_path / "dev.img"
    dev.write_bytes(b"\0" * (4 << 20))
    w = ResidentWriter(resident_argv(str(dev), "progressive-raw", "nvme", str(tmp_path / "t")), child_env())
    try:
        assert w.armed["armed"] is True
        os.kill(w.proc.pid, signal.SIGKILL)
        w.proc.wait(10)
        w.go({"ram": "/nonexistent", "ranges": [[0, 0, 4096]]})
        with pytest.raises(TrialError, match="exited"):
            w.wait(30)
    finally:
        w.close()
