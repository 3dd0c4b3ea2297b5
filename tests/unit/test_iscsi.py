"""Unit tests of the iSCSI scenario's pure parts: tgtd/tgtadm command lines, QEMU
initiator arguments, tgtadm's report parser, the missing-tool check, the setup's
parameter checks and the hot-add step list.

Expected command lines are written out by hand from tgtd(8)/tgtadm(8) and the
facts in /work/shared/notes/qemu-guest-facts.md, not produced by the code.
The tgtadm report below is real output of Debian 12's tgt 1.0.85 (``tgtadm
--op show --mode target`` for a target with one 64 MiB disk LUN), pasted.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from harness.errors import MissingTool, SetupError
from harness.iscsi import guest as G
from harness.iscsi import target as T
from harness.setups import get_setup

REAL_SHOW = """\
Target 1: iqn.2026-12.org.progdump:test
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
            SCSI ID: IET     00010000
            SCSI SN: beaf10
            Size: 0 MB, Block size: 1
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: No
            Backing store type: null
            Backing store path: None
            Backing store flags: 
        LUN: 1
            Type: disk
            SCSI ID: IET     00010001
            SCSI SN: beaf11
            Size: 67 MB, Block size: 512
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: No
            Backing store type: rdwr
            Backing store path: /tmp/tgttest/lun1.img
            Backing store flags: 
    Account information:
    ACL information:
        ALL
"""


def test_tgtd_argv_private_instance_on_loopback() -> None:
    assert T.tgtd_argv(917, "127.0.0.1", 13260) == ["tgtd", "-f", "-C", "917", "--iscsi", "portal=127.0.0.1:13260"]


@pytest.mark.parametrize("addr", ["0.0.0.0", "10.0.2.2", "::", "127.0.0.1; rm -rf /", "localhost"])
def test_portals_refuse_non_loopback(addr: str) -> None:
    with pytest.raises(SetupError, match="loopback"):
        T.tgtd_argv(917, addr, 3260)
    with pytest.raises(SetupError, match="loopback"):
        T.new_portal_argv(917, addr, 3260)


def test_tgtadm_command_lines() -> None:
    pre = ["tgtadm", "-C", "917", "--lld", "iscsi"]
    assert T.new_target_argv(917, 1, "iqn.x:y") == pre + [
        "--op",
        "new",
        "--mode",
        "target",
        "--tid",
        "1",
        "-T",
        "iqn.x:y",
    ]
    assert T.new_lun_argv(917, 1, 3, Path("/r/lun3.img")) == pre + [
        "--op",
        "new",
        "--mode",
        "logicalunit",
        "--tid",
        "1",
        "--lun",
        "3",
        "-b",
        "/r/lun3.img",
    ]
    assert T.bind_all_argv(917, 1) == pre + ["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"]
    assert T.new_portal_argv(917, "127.0.0.2", 13260) == pre + [
        "--op",
        "new",
        "--mode",
        "portal",
        "--param",
        "portal=127.0.0.2:13260",
    ]
    assert T.delete_target_argv(917, 1) == pre + ["--op", "delete", "--mode", "target", "--tid", "1", "--force"]
    assert T.delete_lun_argv(917, 1, 3) == pre + ["--op", "delete", "--mode", "logicalunit", "--tid", "1", "--lun", "3"]
    assert T.stop_system_argv(917) == pre + ["--op", "delete", "--mode", "system"]


def test_iqn_tag_checked() -> None:
    assert T.iqn_for("pd123") == "iqn.2026-12.org.progdump:pd123"
    for bad in ("", "UPPER", "a b", "x" * 41, "a:b"):
        with pytest.raises(SetupError):
            T.iqn_for(bad)


def test_parse_show_target_real_output() -> None:
    luns = T.parse_show_target(REAL_SHOW)
    assert sorted(luns) == [0, 1]
    assert luns[1]["Type"] == "disk"
    assert luns[1]["SCSI ID"] == "IET     00010001"
    assert luns[1]["SCSI SN"] == "beaf11"
    assert luns[1]["Backing store path"] == "/tmp/tgttest/lun1.img"
    assert luns[0]["Type"] == "controller"
    assert "ALL" not in luns[1]  # the ACL section after the LUNs is not a LUN field


def test_parse_show_target_hostile_input_bounded() -> None:
    assert T.parse_show_target("") == {}
    assert T.parse_show_target("\x00garbage\n  LUN: x\n") == {}
    big = "        LUN: 1\n            SCSI ID: " + "A" * 100_000 + "\n"
    assert len(T.parse_show_target(big)[1]["SCSI ID"]) == 256


def test_missing_tgtd_named(tmp_path: Path) -> None:
    with pytest.raises(MissingTool, match="tgtd not found.*tgt"):
        T.check_tools(path=str(tmp_path), qemu_module_dirs=(str(tmp_path),), euid=0)


def test_missing_tgtadm_named(tmp_path: Path) -> None:
    exe = tmp_path / "tgtd"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    with pytest.raises(MissingTool, match="tgtadm not found"):
        T.check_tools(path=str(tmp_path), qemu_module_dirs=(str(tmp_path),), euid=0)


def test_missing_qemu_iscsi_driver_named(tmp_path: Path) -> None:
    for name in ("tgtd", "tgtadm"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    with pytest.raises(MissingTool, match="qemu-block-extra"):
        T.check_tools(path=str(tmp_path), qemu_module_dirs=(str(tmp_path / "none"),), euid=0)
    (tmp_path / "block-iscsi.so").write_bytes(b"")
    T.check_tools(path=str(tmp_path), qemu_module_dirs=(str(tmp_path),), euid=0)
    with pytest.raises(MissingTool, match="root"):
        T.check_tools(path=str(tmp_path), qemu_module_dirs=(str(tmp_path),), euid=1000)


def test_qemu_blockdev_per_path() -> None:
    n0 = G.blockdev_node("iqn.2026-12.org.progdump:t", 13260, 3, 0)
    n1 = G.blockdev_node("iqn.2026-12.org.progdump:t", 13260, 3, 1)
    assert n0["driver"] == n1["driver"] == "iscsi"
    assert (n0["portal"], n1["portal"]) == ("127.0.0.1:13260", "127.0.0.2:13260")
    assert n0["lun"] == n1["lun"] == 3
    assert n0["node-name"] != n1["node-name"]
    assert n0["initiator-name"] != n1["initiator-name"]  # one session per path, never reinstated
    d = G.scsi_block_device(3, 1)
    assert d["driver"] == "scsi-block" and d["drive"] == n1["node-name"] and d["bus"] == "pdiscsi.0"
    assert d["scsi-id"] == 31


def test_boot_args_shape() -> None:
    a = G.boot_args("iqn.2026-12.org.progdump:t", 4000, [1, 2])
    assert a[:2] == ["-device", "virtio-scsi-pci,id=pdiscsi"]
    blockdevs = [json.loads(a[i + 1]) for i in range(len(a)) if a[i] == "-blockdev"]
    devices = [a[i + 1] for i in range(len(a)) if a[i] == "-device"][1:]
    assert [(b["lun"], b["portal"]) for b in blockdevs] == [
        (1, "127.0.0.1:4000"),
        (1, "127.0.0.2:4000"),
        (2, "127.0.0.1:4000"),
        (2, "127.0.0.2:4000"),
    ]
    assert devices[0] == "scsi-block,bus=pdiscsi.0,drive=iscsi-l1p0,id=iscsi-l1p0,scsi-id=10,lun=0"
    assert len(devices) == 4


def test_scsi_id_bounds() -> None:
    with pytest.raises(ValueError):
        G.scsi_id(0, 0)
    with pytest.raises(ValueError):
        G.scsi_id(1, 2)


def test_free_ports_are_free() -> None:
    p = T.free_port(random.Random(1))
    assert 20000 <= p < 60000
    c = T.free_control_port(random.Random(1))
    assert not (T.TGT_IPC_DIR / f"socket.{c}").exists()


class _Sc:
    guest = "linux"


@pytest.mark.parametrize(
    "params,key",
    [
        ({"mode": "nmi"}, "mode"),
        ({"boot_luns": 0}, "boot_luns"),
        ({"hotadd_luns": 99}, "hotadd_luns"),
        ({"lun_mib": "64"}, "lun_mib"),
        ({"queue_if_no_path": 1}, "queue_if_no_path"),
        ({"bogus": 1}, "bogus"),
        ({"hung_task_timeout": True}, "hung_task_timeout"),
    ],
)
def test_setup_params_checked(tmp_path: Path, params: dict, key: str) -> None:
    with pytest.raises(SetupError, match=key):
        get_setup("iscsi")(_Sc, tmp_path, params, lambda s: None)


def test_hotadd_steps_order() -> None:
    from harness.setups.iscsi import hotadd_steps

    steps = hotadd_steps(3, 2)
    assert steps[0] == (3, "target-lun") and steps[-1] == (4, "io")
    assert len(steps) == 14
    # both paths of a LUN are plugged before the guest is asked to see them
    assert steps.index((3, "path1")) < steps.index((3, "rescan")) < steps.index((3, "multipath"))


def test_close_without_start_is_safe(tmp_path: Path) -> None:
    s = get_setup("iscsi")(_Sc, tmp_path, {}, lambda s: None)
    s.close()
    s.close()
    t = T.Target(tmp_path)
    t.close()
    t.close()
    assert os.listdir(tmp_path) == []
