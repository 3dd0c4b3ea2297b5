"""A resident writer armed before a real panic, handed the guest at GUEST_PANICKED (issue 13, target 3).

Boots the Linux stand-in (TCG), arms ``python3 -m progdump.resident`` on the
dump disk with the nvme model and a trace, panics the guest by sysrq with
the controller's ``at_event`` hand-over, lets the writer finish, then:

* recovers layer 0 ALONE (the device state replayed at layer 0's commit)
  and checks it against what the serial console showed (panic line, the
  Call Trace's frames, the log lines before the panic) and the log line the
  guest planted at boot: expected values from the console, not from the code
  under test;
* checks the from-event arithmetic against instants taken independently of
  the trace arithmetic: layer 0 cannot be durable before the go line was
  read (the writer's own ``go_monotonic_ns``), nor before the controller
  received the event, and the writer's go-to-layer-0 figure plus the
  event-to-go lead must equal the from-event figure to within the pacing
  slack of the modelled device.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

pytestmark = pytest.mark.vm


def test_resident_writer_at_panic_event_layer0_alone_matches_console(guest_session, tmp_path):
    from harness.crashsim.trace import read_trace
    from harness.eventdump import (
        ResidentWriter,
        after_event_ms,
        check_layer0,
        console_expectations,
        recover_layer0_alone,
        resident_argv,
    )
    from harness.trial import child_env, durable_times, layer_names

    image = tmp_path / "dump.img"
    with open(image, "wb") as f:
        f.truncate(384 << 20)
    base = tmp_path / "base.img"
    g = guest_session(mem_mib=256, dump_disk=image)
    g.boot()
    # something on the disk before the dump: the base image layer 0 is replayed over
    with open(image, "r+b") as f:
        f.write(b"older content " * 4096)
    base.write_bytes(image.read_bytes())
    hand = g.prepare_handoff()
    assert "OSRELEASE=" in hand.vmcoreinfo and hand.ranges
    plan = "progressive-raw"
    trace = tmp_path / "event.trace"
    w = ResidentWriter(resident_argv(str(image), plan, "nvme", str(trace)), child_env(), pass_fds=(hand.ram_fd,))
    try:
        pr = g.panic("sysrq", at_event=w.go, handoff=hand)
        fin = w.wait(300)
    finally:
        w.close()
    assert fin["stopped"] == "done", fin
    assert pr.event_rx_monotonic_ns > 0 and pr.handoff_ms["go_sent"] >= pr.handoff_ms["stop"] >= 0
    # the memory the writer read was the guest's at the event: capture now (still stopped) and compare VMCOREINFO
    live = g.capture()
    try:
        assert (live.vmcoreinfo_raw or b"").rstrip(b"\0").decode() == hand.vmcoreinfo, "VMCOREINFO changed at panic"
    finally:
        live.close()
    assert g.finish_console(), "the guest did not print the end of its panic after cont"
    expect = console_expectations(g.console_since_panic())
    assert expect.panic_message == "sysrq triggered crash"
    assert "sysrq_handle_crash" in expect.frames and "panic" in expect.frames

    names = layer_names(plan)
    tr = read_trace(str(trace))
    try:
        ev = after_event_ms(tr, names, pr.event_rx_monotonic_ns)
        dur = durable_times(tr, names)
        opened = tr.header["open_monotonic_ns"]
    finally:
        tr.close()
    assert set(ev) == set(names)
    go_ns = fin["go_monotonic_ns"]
    assert opened < pr.event_rx_monotonic_ns <= go_ns  # armed before the panic; go read after the event
    # independent path: the writer's own go->layer-0 (its monotonic clock at the flush's return) + event->go
    lead_ms = (go_ns - pr.event_rx_monotonic_ns) / 1e6
    own_ms = fin["go_to_layer_s"]["0"] * 1e3 + lead_ms
    assert ev[names[0]] <= own_ms + 0.5, (ev, own_ms)  # the flush's modelled completion <= its return
    assert own_ms - ev[names[0]] < 25.0, (ev, own_ms)  # ... and not long before it (pacing lateness)
    assert (opened + dur[names[0]] * 1e9) >= go_ns

    out = tmp_path / "layer0"
    t0, statuses = recover_layer0_alone(str(trace), str(base), names, str(out))
    assert abs(t0 - dur[names[0]]) < 1e-9
    problems = check_layer0(str(out), statuses, expect, str(g.markers.get("kmsg", "")))
    assert not problems, problems
    print(
        f"\nlayer 0 durable {ev[names[0]]:.1f} ms after GUEST_PANICKED was received "
        f"(hand-over {pr.handoff_ms}, go->layer 0 {fin['go_to_layer_s']['0'] * 1e3:.1f} ms); "
        f"layer-0-alone statuses {statuses}; console frames {list(expect.frames)}",
        file=sys.stderr,
    )
    json.dumps(ev)
    assert os.path.exists(out / "dmesg.txt")
