"""The pure QEMU argv builder, and ``--show-command`` (no QEMU is started)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from harness.qemu.argv import ArgvError, DiskSpec, MachineConfig, build_argv, format_argv

REPO = Path(__file__).resolve().parent.parent.parent


def cfg(**kw: object) -> MachineConfig:
    base: dict[str, object] = dict(qmp_socket=Path("/r/qmp.sock"), console_socket=Path("/r/con.sock"))
    base.update(kw)
    return MachineConfig(**base)  # type: ignore[arg-type]


def opts(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_minimal_machine() -> None:
    argv = build_argv(cfg())
    assert argv[0] == "qemu-system-x86_64"
    assert "-S" in argv and "-nodefaults" in argv
    assert opts(argv, "-machine") == ["q35,accel=tcg"]
    assert opts(argv, "-m") == ["512M"]
    assert opts(argv, "-action") == ["panic=none"]
    assert "pvpanic-pci" in opts(argv, "-device")
    assert "vmcoreinfo" in opts(argv, "-device")
    chardevs = opts(argv, "-chardev")
    assert "socket,id=pdqmp,path=/r/qmp.sock,server=on,wait=off" in chardevs
    assert "socket,id=pdcon,path=/r/con.sock,server=on,wait=off" in chardevs
    assert opts(argv, "-mon") == ["chardev=pdqmp,mode=control"]
    assert opts(argv, "-serial") == ["chardev:pdcon"]
    assert "-netdev" not in argv  # no network unless ssh is asked for


def test_shared_ram_backend() -> None:
    argv = build_argv(cfg(ram_file=Path("/dev/shm/x/ram"), mem_mib=4096))
    assert opts(argv, "-object")[0] == "memory-backend-file,id=pdram,size=4096M,mem-path=/dev/shm/x/ram,share=on"
    assert opts(argv, "-machine") == ["q35,accel=tcg,memory-backend=pdram"]
    assert opts(argv, "-m") == ["4096M"]


def test_kernel_boot_and_kvm() -> None:
    argv = build_argv(
        cfg(kernel=Path("/k/vmlinuz"), initrd=Path("/k/initrd"), append="console=ttyS0 a=b", accel="kvm", smp=2)
    )
    assert opts(argv, "-kernel") == ["/k/vmlinuz"]
    assert opts(argv, "-initrd") == ["/k/initrd"]
    assert opts(argv, "-append") == ["console=ttyS0 a=b"]
    assert opts(argv, "-machine") == ["q35,accel=kvm"]
    assert opts(argv, "-smp") == ["2"]


def test_disks_dump_virtio_and_scsi() -> None:
    dump = DiskSpec(Path("/d/dump.img"), "pddump", serial="pddump")
    extra = DiskSpec(Path("/d/x.qcow2"), "data1", fmt="qcow2", bus="scsi", readonly=True)
    argv = build_argv(cfg(dump_disk=dump, disks=(extra,)))
    bd = opts(argv, "-blockdev")
    assert "driver=file,node-name=pddump-file,filename=/d/dump.img,read-only=off" in bd
    assert "driver=raw,node-name=pddump-fmt,file=pddump-file,read-only=off" in bd
    assert "driver=qcow2,node-name=data1-fmt,file=data1-file,read-only=on" in bd
    devs = opts(argv, "-device")
    assert "virtio-blk-pci,drive=pddump-fmt,id=pddump,serial=pddump" in devs
    assert "scsi-hd,bus=scsi0.0,drive=data1-fmt,id=data1" in devs
    # the dump disk comes first: the guest sees it as vda
    assert bd.index("driver=file,node-name=pddump-file,filename=/d/dump.img,read-only=off") == 0


def test_hotplug_slots_and_channels() -> None:
    argv = build_argv(cfg(cmd_socket=Path("/r/cmd.sock"), root_ports=3))
    devs = opts(argv, "-device")
    assert "virtio-scsi-pci,id=scsi0" in devs
    assert [d for d in devs if d.startswith("pcie-root-port")] == [
        "pcie-root-port,id=rp0,chassis=1,slot=1",
        "pcie-root-port,id=rp1,chassis=2,slot=2",
        "pcie-root-port,id=rp2,chassis=3,slot=3",
    ]
    assert "virtserialport,bus=pdvser.0,chardev=pdcmd,name=org.progdump.cmd" in devs


def test_ssh_forward_is_loopback_only_and_the_guest_net_restricted() -> None:
    argv = build_argv(cfg(ssh_port=2222))
    assert opts(argv, "-netdev") == ["user,id=pdnet,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22"]
    argv = build_argv(cfg(ssh_port=2222, net_restrict=False))
    assert opts(argv, "-netdev") == ["user,id=pdnet,hostfwd=tcp:127.0.0.1:2222-:22"]


def test_qemu_runs_sandboxed_unless_told_not_to() -> None:
    assert opts(build_argv(cfg()), "-sandbox") == [
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    ]
    assert opts(build_argv(cfg(sandbox=False)), "-sandbox") == []


def test_commas_in_paths_are_escaped() -> None:
    argv = build_argv(cfg(qmp_socket=Path("/r,x/qmp.sock"), ram_file=Path("/s,1/ram")))
    assert "socket,id=pdqmp,path=/r,,x/qmp.sock,server=on,wait=off" in opts(argv, "-chardev")
    assert "mem-path=/s,,1/ram" in opts(argv, "-object")[0]


@pytest.mark.parametrize(
    "kw",
    [
        dict(mem_mib=10),
        dict(smp=0),
        dict(accel="hvf"),
        dict(panic_action="reboot"),
        dict(ssh_port=70000),
        dict(initrd=Path("/i")),
        dict(disks=(DiskSpec(Path("/a"), "d1"), DiskSpec(Path("/b"), "d1"))),
        dict(scsi_controller=False, disks=(DiskSpec(Path("/a"), "d1", bus="scsi"),)),
        dict(qmp_socket=Path("/r/q\nx")),
    ],
)
def test_bad_configs_rejected(kw: dict[str, object]) -> None:
    with pytest.raises(ArgvError):
        build_argv(cfg(**kw))


@pytest.mark.parametrize("disk_id", ["1abc", "a b", "x" * 40, "a,b"])
def test_bad_disk_ids(disk_id: str) -> None:
    with pytest.raises(ArgvError):
        DiskSpec(Path("/a"), disk_id)


def test_format_argv_round_trips_through_the_shell() -> None:
    argv = build_argv(cfg(append="console=ttyS0 x='y z'", kernel=Path("/k")))
    text = format_argv(argv)
    assert shlex.split(text.replace("\\\n", " ")) == argv


def _fake_image(tmp: Path) -> Path:
    (tmp / "vmlinuz").write_bytes(b"k")
    (tmp / "initramfs.cpio.gz").write_bytes(b"i")
    (tmp / "manifest.json").write_text(
        json.dumps(
            {
                "vmlinuz": {"path": "vmlinuz"},
                "initramfs": {"path": "initramfs.cpio.gz"},
                "cmdline": "console=ttyS0,115200 panic=0",
            }
        )
    )
    return tmp


def test_show_command_prints_argv_without_starting_qemu(tmp_path: Path) -> None:
    env = dict(os.environ, PROGDUMP_GUEST_LINUX_DIR=str(_fake_image(tmp_path)), PYTHONPATH=str(REPO))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "boot",
            "--guest",
            "linux",
            "--mem",
            "1024",
            "--accel",
            "tcg",
            "--knob",
            "panic_print=0x3",
            "--show-command",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout.replace("\\\n", " "))
    assert argv[0] == "qemu-system-x86_64"
    assert opts(argv, "-m") == ["1024M"]
    assert opts(argv, "-kernel") == [str(tmp_path / "vmlinuz")]
    assert opts(argv, "-append") == ["console=ttyS0,115200 panic=0 pd.panic_print=0x3"]
    assert any(o.startswith("memory-backend-file") for o in opts(argv, "-object"))


def test_show_command_without_image_says_what_to_do(tmp_path: Path) -> None:
    env = dict(os.environ, PROGDUMP_GUEST_LINUX_DIR=str(tmp_path / "none"), PYTHONPATH=str(REPO))
    r = subprocess.run(
        [sys.executable, "-m", "harness", "boot", "--show-command"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert r.returncode == 1
    assert "make guest-image" in r.stderr
    assert "Traceback" not in r.stderr
