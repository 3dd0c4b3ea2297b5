"""A real loopback tgtd, QEMU's iSCSI initiator and the guest's dm-multipath.

The guest must see each LUN through two paths as one multipath device with
the identity the *target* reports: the expected identifier is taken from
``tgtadm --op show`` (tgtd's own report), and the guest's VPD page 0x83 is
decoded here by a parser written for this test (SPC-4 7.8.6), not by the
code under test. Teardown must leave nothing: no tgtd, no QEMU, no control
socket, nothing listening on the portals.

Skips (saying why) without QEMU, the guest image, tgt or qemu-block-extra.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness.errors import MissingTool
from harness.iscsi import guest as G
from harness.iscsi.target import PORTALS, TGT_IPC_DIR, Target, check_tools

pytestmark = pytest.mark.vm


@pytest.fixture
def iscsi_tools() -> None:
    try:
        check_tools()
    except MissingTool as e:
        print(f"\nSKIP: {e}", file=sys.stderr)
        pytest.skip(str(e))


def t10_vendor_ids(vpd83: bytes) -> list[str]:
    """T10 vendor-ID designators (type 1) of a VPD 0x83 page, as text (SPC-4 7.8.6.1)."""
    assert len(vpd83) >= 4 and vpd83[1] == 0x83, f"not a VPD 0x83 page: {vpd83[:8].hex()}"
    end = min(len(vpd83), 4 + int.from_bytes(vpd83[2:4], "big"))
    out, i = [], 4
    while i + 4 <= end:
        dtype, dlen = vpd83[i + 1] & 0x0F, vpd83[i + 3]
        if dtype == 1:
            out.append(vpd83[i + 4 : i + 4 + dlen].rstrip(b"\0").decode("ascii", "replace"))  # tgtd pads with NULs
        i += 4 + dlen
    return out


def guest_vpd83(g: Any, dev: str) -> bytes:
    res = g.run(f"od -An -v -tx1 /sys/block/{dev}/device/vpd_pg83 | tr -d ' \\n'", check=True)
    return bytes.fromhex(res.text.strip())


def paths_of(g: Any, lun: int) -> list[str]:
    return g.run(G.wait_paths_script(lun, 60), check=True).text.split()


def check_multipath(g: Any, target: Target, lun: int) -> None:
    devs = paths_of(g, lun)
    assert len(devs) == 2, devs
    want = target.show()[lun]["SCSI ID"]  # tgtd's own report
    ids = [t10_vendor_ids(guest_vpd83(g, d)) for d in devs]
    assert ids[0] == ids[1] and want in ids[0], f"guest sees {ids}, tgtadm reports {want!r}"
    g.run(G.assemble_script(lun, True), check=True)
    majmin = sorted(g.run(f"cat /sys/block/{d}/dev", check=True).text.strip() for d in devs)
    table = g.run(f"dmsetup table mpath{lun}", check=True).text.split()
    assert sorted(t for t in table if ":" in t) == majmin, table
    status = g.run(f"dmsetup status mpath{lun}", check=True).text.split()
    # "<maj:min> A <fail count>" per path: both active
    assert [status[i + 1] for i, t in enumerate(status) if t in majmin] == ["A", "A"], status


def io_rounds(g: Any, lun: int) -> int:
    return int(g.run(f"cat /run/pdio{lun}.count", check=True).text.strip())


def test_lun_two_paths_multipath_io_hotadd_teardown(
    iscsi_tools: None, guest_session: Callable[..., Any], tmp_path: Path
) -> None:
    target = Target(tmp_path / "target")
    qemu_pid = None
    try:
        target.start()
        target.add_lun(32)
        g = guest_session(
            mem_mib=256, dump_disk=tmp_path / "dump.img", extra_args=G.boot_args(target.iqn, target.port, [1])
        )
        g.boot()
        qemu_pid = g.machine.proc.pid
        check_multipath(g, target, 1)
        g.run(G.mkfs_mount_script(1), check=True)
        g.run(G.start_io_script(1), check=True)
        n0 = io_rounds(g, 1)
        time.sleep(3)
        assert io_rounds(g, 1) > n0, "the writer/verifier made no progress"

        target.add_lun(32)  # hot-add: both paths, then the guest finds and joins them
        for p in (0, 1):
            g.hotplug([G.blockdev_node(target.iqn, target.port, 2, p)], G.scsi_block_device(2, p))
        check_multipath(g, target, 2)
        g.run(G.mkfs_mount_script(2), check=True)
        g.run(G.start_io_script(2), check=True)
        assert "PDIO-MISMATCH" not in g.run("dmesg", check=True).text
        g.close()
    finally:
        target.close()
    # nothing left
    assert target.proc is not None and target.proc.poll() is not None, "tgtd still running"
    if qemu_pid is not None:
        with pytest.raises(ProcessLookupError):
            import os

            os.kill(qemu_pid, 0)
    assert not (TGT_IPC_DIR / f"socket.{target.control_port}").exists()
    assert not (TGT_IPC_DIR / f"socket.{target.control_port}.lock").exists()
    for addr in PORTALS:
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(2)
            s.connect((addr, target.port))


CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from harness.iscsi.target import Target
t = Target(Path({work!r}))
try:
    t.start()
    t.add_lun(8)
    print("READY", t.proc.pid, t.control_port, t.port, flush=True)
    time.sleep(600)
finally:
    t.close()
"""


def _start_child(tmp_path: Path) -> tuple[Any, int, int, int]:
    import subprocess

    root = str(Path(__file__).resolve().parents[2])
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(root=root, work=str(tmp_path / "t"))], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None
    line = p.stdout.readline().split()
    assert line and line[0] == "READY", line
    return p, int(line[1]), int(line[2]), int(line[3])


def _gone(pid: int, timeout: float = 10.0) -> bool:

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[-1].startswith("Z"):
                    return True  # a zombie: dead, waiting for its (dead) parent's reaper
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_ctrl_c_stops_tgtd_and_removes_its_socket(iscsi_tools: None, tmp_path: Path) -> None:
    import signal

    p, tgtd_pid, cp, port = _start_child(tmp_path)
    p.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the runner (tgtd is in its own session)
    p.wait(30)
    assert _gone(tgtd_pid), "tgtd still running after Ctrl-C"
    assert not (TGT_IPC_DIR / f"socket.{cp}").exists()
    assert not (TGT_IPC_DIR / f"socket.{cp}.lock").exists()
    for addr in PORTALS:
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(2)
            s.connect((addr, port))


def test_runner_killed_outright_takes_tgtd_along(iscsi_tools: None, tmp_path: Path) -> None:
    import signal

    p, tgtd_pid, cp, port = _start_child(tmp_path)
    p.send_signal(signal.SIGKILL)  # no cleanup code runs: PR_SET_PDEATHSIG must stop tgtd
    p.wait(30)
    try:
        assert _gone(tgtd_pid), "tgtd outlived its killed parent"
    finally:
        for suffix in ("", ".lock"):  # what only the runner's close() removes
            (TGT_IPC_DIR / f"socket.{cp}{suffix}").unlink(missing_ok=True)
