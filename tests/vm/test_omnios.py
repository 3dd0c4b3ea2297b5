"""The omnios guest under real QEMU.

* Without an image: QEMU starts (paused, never run) with the exact omnios
  command line on a stand-in qcow2, and QEMU itself reports the devices,
  the boot disk and the one SSH forward. The controller's console-based
  panic detection runs against the Linux stand-in (a real panic; the only
  guest that boots here), so that path is exercised for real.
* With ``OMNIOS_IMAGE`` set: the full cycle (boot, uadmin panic, capture,
  write, reset, recover). Skipped otherwise, saying why (``pytest -rs``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.guests.linux import LinuxGuest
from progdump.elfcore import save_elf_snapshot

pytestmark = pytest.mark.vm
REPO = Path(__file__).resolve().parent.parent.parent


def _need_qemu() -> None:
    for tool in ("qemu-system-x86_64", "qemu-img"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (make setup installs qemu-system-x86 and qemu-utils)")


def test_qemu_takes_the_omnios_machine(tmp_path, monkeypatch):
    _need_qemu()
    from harness.controller import GuestSession
    from harness.guests.omnios import OmniosGuest
    from harness.qemu.machine import Machine, RunDir

    base = tmp_path / "stand-in.qcow2"  # empty: QEMU is never let run, nothing boots
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    monkeypatch.setenv("OMNIOS_IMAGE", str(base))
    prof = OmniosGuest(run_dir=tmp_path / "run")
    with GuestSession(
        profile=prof, dump_disk=tmp_path / "dump.img", accel="tcg", workdir=tmp_path / "w", mem_mib=256
    ) as s:
        s.accel = "tcg"
        rundir = RunDir(shm=False)
        m = Machine(s._config(rundir), rundir, s.t, tmp_path / "console.log", tmp_path / "qemu.log")
        try:
            s.call(m.launch())
            assert s.call(m.status()) == "prelaunch"
            blocks = {b["device"] or b.get("qdev", ""): b for b in s.call(m.execute("query-block"))}
            qdevs = " ".join(str(b.get("qdev", "")) for b in blocks.values())
            assert "omroot" in qdevs and "omseed" in qdevs and "pddump" in qdevs
            usernet = s.call(m.hmp("info usernet"))
            assert f"127.0.0.1 {prof.ssh_port}" in " ".join(usernet.split()), usernet
            assert usernet.count("HOST_FORWARD") == 1
        finally:
            s.call(m.close())
            rundir.remove()


class _LinuxSeenOnTheConsole(LinuxGuest):
    """The Linux stand-in, but its panic is detected as on illumos: from the console, not pvpanic."""

    panic_detection = "console"


def test_console_panic_detection_on_a_real_panic(guest_session):
    s = guest_session(profile=_LinuxSeenOnTheConsole(), mem_mib=256)
    s.boot()
    p = s.panic("sysrq")
    assert p.status == "paused"
    assert p.panic_string == "sysrq triggered crash"
    assert p.event_latency_ms > 0 and p.stop_ms >= 0


def _omnios_skip_reason() -> str | None:
    if not os.environ.get("OMNIOS_IMAGE"):
        return (
            "OMNIOS_IMAGE not set: the OmniOS full cycle needs an official cloud image "
            "(omnios-rNNNNNN.cloud.qcow2); none can be downloaded on this machine"
        )
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not installed"
    return None


def test_omnios_full_cycle(tmp_path):
    reason = _omnios_skip_reason()
    if reason:
        print(f"\nSKIP: {reason}", file=sys.stderr)
        pytest.skip(reason)
    from harness.controller import GuestSession
    from harness.guests.omnios import OmniosGuest

    dump = tmp_path / "dump.img"
    with open(dump, "wb") as f:
        f.truncate((2048 + 256) << 20)  # larger than guest RAM, as for Linux: a full dump must fit
    prof = OmniosGuest(run_dir=tmp_path / "run")
    with GuestSession(profile=prof, dump_disk=dump, workdir=tmp_path / "w", mem_mib=2048) as s:
        b = s.boot()
        assert prof.manifest is not None, prof.manifest_error
        assert {"panicbuf", "log_recentq", "allthreads"} <= set(prof.manifest.symbols)
        r = s.run("uname -s; zonename")
        assert r.status == 0 and r.text.split()[:2] == ["SunOS", "global"]
        p = s.panic("uadmin")
        assert p.status == "paused"
        assert "forced crash dump initiated at user request" in p.panic_string
        snap = s.capture()
        core = tmp_path / "core.elf"
        try:
            save_elf_snapshot(snap, core)
        finally:
            snap.close()
        t0 = time.monotonic()
        w = subprocess.run(
            [sys.executable, "-m", "progdump", "write", "--json", str(core), str(dump)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        assert w.returncode == 0, w.stderr
        print(f"\nwrite: {time.monotonic() - t0:.1f} s", file=sys.stderr)
        b2 = s.reset()
        assert b2.boot_id != b.boot_id
    out = tmp_path / "recovered"
    r = subprocess.run(
        [sys.executable, "-m", "progdump", "recover", str(dump), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    panic_json = next(out.rglob("panic.json"))
    d = json.loads(panic_json.read_text())
    assert d["producer"] == "illumos"
    assert "forced crash dump initiated at user request" in (d["panic_message"] or "")
    assert d["panicbuf"] is not None and "rip" in d["panicbuf"]["registers"]
    assert d["log_messages"] > 0
