"""QEMU command lines as a pure function of a :class:`MachineConfig`.

Why pure: the command line decides what the guest is (machine, RAM backend,
devices, sockets); keeping it free of side effects lets unit tests check it
and ``--show-command`` print exactly what would run.

Choices, each for the dump path:

* ``-S``: QEMU waits for ``cont`` so the console and command sockets are
  connected before the guest prints its first byte (a chardev socket drops
  output while no client is connected).
* q35 with ``memory-backend-file,share=on`` on a file we choose: the host
  maps guest RAM with no copy.
* ``-action panic=none``: with ``pause`` QEMU stops the guest inside the
  panic notifier, before the console is flushed; the controller sends
  ``stop`` itself once the panic's last line is out.
* ``pvpanic-pci`` (``GUEST_PANICKED``), ``vmcoreinfo`` (VMCOREINFO in dumps).
* a ``virtio-scsi-pci`` controller and ``pcie-root-port``s at boot, because
  q35's root bus does not take hot-plugged devices.
* ``-sandbox on`` (seccomp: no fork/exec, setuid, obsolete or scheduler calls)
  and ``restrict=on`` user networking: QEMU runs as root here and the guest
  needs no network beyond the host's SSH forward.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DiskSpec", "MachineConfig", "build_argv", "format_argv", "ArgvError"]

_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")


class ArgvError(ValueError):
    """The configuration cannot be turned into a QEMU command line."""


def _check_id(what: str, value: str) -> str:
    if not _ID_RE.match(value):
        raise ArgvError(f"{what} {value!r} is not a valid QEMU id (letter, then [A-Za-z0-9_-], <= 32)")
    return value


def _opt(value: str | Path) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax (commas double)."""
    s = str(value)
    if "\n" in s or "\0" in s:
        raise ArgvError(f"option value {s!r} contains a newline or NUL")
    return s.replace(",", ",,")


@dataclass(frozen=True)
class DiskSpec:
    """A disk image given to the guest.

    ``bus``: ``virtio`` (virtio-blk-pci) or ``scsi`` (scsi-hd on the
    virtio-scsi controller). ``serial`` shows up in the guest as
    ``/sys/block/*/serial`` (virtio) or the SCSI serial, so the guest can find
    its dump disk by name.
    """

    path: Path
    id: str
    fmt: str = "raw"
    bus: str = "virtio"
    serial: str | None = None
    readonly: bool = False

    def __post_init__(self) -> None:
        _check_id("disk id", self.id)
        if self.fmt not in ("raw", "qcow2"):
            raise ArgvError(f"disk {self.id}: format {self.fmt!r} is not raw or qcow2")
        if self.bus not in ("virtio", "scsi"):
            raise ArgvError(f"disk {self.id}: bus {self.bus!r} is not virtio or scsi")
        if self.serial is not None and not re.match(r"^[A-Za-z0-9_-]{1,20}$", self.serial):
            raise ArgvError(f"disk {self.id}: serial {self.serial!r} must be 1-20 of [A-Za-z0-9_-]")


@dataclass(frozen=True)
class MachineConfig:
    """Everything that decides a QEMU command line. Paths are used as given."""

    qmp_socket: Path
    console_socket: Path
    mem_mib: int = 512
    smp: int = 1
    accel: str = "tcg"
    cpu: str | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    cmd_socket: Path | None = None  # virtio-serial command channel
    cmd_port_name: str = "org.progdump.cmd"
    ram_file: Path | None = None  # shared memory backend; None: anonymous RAM
    dump_disk: DiskSpec | None = None
    disks: tuple[DiskSpec, ...] = ()
    root_ports: int = 2  # hot-plug slots for virtio-blk/-net devices
    scsi_controller: bool = True
    ssh_port: int | None = None  # host 127.0.0.1:port -> guest :22
    panic_action: str = "none"
    vmcoreinfo: bool = True
    pvpanic: bool = True
    rng: bool = True
    qemu_binary: str = "qemu-system-x86_64"
    #: seccomp sandbox: QEMU runs as root here, and TCG parses everything the guest does. Denies
    #: obsolete syscalls, setuid, fork/exec and scheduler/resource calls (QEMU 7.2 supports all).
    sandbox: bool = True
    #: user networking isolated from the host and the outside (``restrict=on``): the guest needs
    #: no network, only the host-to-guest SSH forward, which restrict keeps working
    net_restrict: bool = True
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not 64 <= self.mem_mib <= 1 << 20:
            raise ArgvError(f"mem_mib {self.mem_mib} outside 64 MiB .. 1 TiB")
        if not 1 <= self.smp <= 64:
            raise ArgvError(f"smp {self.smp} outside 1..64")
        if self.accel not in ("tcg", "kvm"):
            raise ArgvError(f"accel {self.accel!r} is not tcg or kvm")
        if self.panic_action not in ("none", "pause", "shutdown", "exit-failure"):
            raise ArgvError(f"panic action {self.panic_action!r} unknown")
        if self.ssh_port is not None and not 1 <= self.ssh_port <= 65535:
            raise ArgvError(f"ssh_port {self.ssh_port} outside 1..65535")
        if not 0 <= self.root_ports <= 16:
            raise ArgvError(f"root_ports {self.root_ports} outside 0..16")
        if self.initrd is not None and self.kernel is None:
            raise ArgvError("an initrd needs a kernel")
        ids = [d.id for d in self.all_disks]
        if len(set(ids)) != len(ids):
            raise ArgvError(f"duplicate disk ids: {ids}")
        if any(d.bus == "scsi" for d in self.all_disks) and not self.scsi_controller:
            raise ArgvError("a scsi disk needs scsi_controller=True")

    @property
    def all_disks(self) -> tuple[DiskSpec, ...]:
        return ((self.dump_disk,) if self.dump_disk else ()) + tuple(self.disks)


def _disk_args(d: DiskSpec) -> list[str]:
    node = f"{d.id}-fmt"
    args = [
        "-blockdev",
        f"driver=file,node-name={d.id}-file,filename={_opt(d.path)},read-only={'on' if d.readonly else 'off'}",
        "-blockdev",
        f"driver={d.fmt},node-name={node},file={d.id}-file,read-only={'on' if d.readonly else 'off'}",
    ]
    serial = f",serial={d.serial}" if d.serial else ""
    if d.bus == "virtio":
        args += ["-device", f"virtio-blk-pci,drive={node},id={d.id}{serial}"]
    else:
        args += ["-device", f"scsi-hd,bus=scsi0.0,drive={node},id={d.id}{serial}"]
    return args


def build_argv(cfg: MachineConfig) -> list[str]:
    """The full argv (binary first) for ``cfg``. Pure: no files are touched."""
    machine = f"q35,accel={cfg.accel}"
    argv = [cfg.qemu_binary, "-nodefaults", "-no-user-config", "-display", "none", "-S"]
    if cfg.sandbox:
        argv += ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    if cfg.ram_file is not None:
        machine += ",memory-backend=pdram"
        argv += [
            "-object",
            f"memory-backend-file,id=pdram,size={cfg.mem_mib}M,mem-path={_opt(cfg.ram_file)},share=on",
        ]
    argv += ["-machine", machine, "-m", f"{cfg.mem_mib}M", "-smp", str(cfg.smp)]
    if cfg.cpu:
        argv += ["-cpu", cfg.cpu]
    if cfg.kernel is not None:
        argv += ["-kernel", str(cfg.kernel)]
        if cfg.initrd is not None:
            argv += ["-initrd", str(cfg.initrd)]
        if cfg.append:
            argv += ["-append", cfg.append]
    argv += [
        "-chardev",
        f"socket,id=pdqmp,path={_opt(cfg.qmp_socket)},server=on,wait=off",
        "-mon",
        "chardev=pdqmp,mode=control",
        "-chardev",
        f"socket,id=pdcon,path={_opt(cfg.console_socket)},server=on,wait=off",
        "-serial",
        "chardev:pdcon",
        "-action",
        f"panic={cfg.panic_action}",
    ]
    if cfg.pvpanic:
        argv += ["-device", "pvpanic-pci"]
    if cfg.vmcoreinfo:
        argv += ["-device", "vmcoreinfo"]
    if cfg.rng:
        argv += ["-object", "rng-random,id=pdrng,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=pdrng"]
    if cfg.cmd_socket is not None:
        argv += [
            "-chardev",
            f"socket,id=pdcmd,path={_opt(cfg.cmd_socket)},server=on,wait=off",
            "-device",
            "virtio-serial-pci,id=pdvser",
            "-device",
            f"virtserialport,bus=pdvser.0,chardev=pdcmd,name={_opt(cfg.cmd_port_name)}",
        ]
    if cfg.ssh_port is not None:
        argv += [
            "-netdev",
            f"user,id=pdnet,{'restrict=on,' if cfg.net_restrict else ''}hostfwd=tcp:127.0.0.1:{cfg.ssh_port}-:22",
            "-device",
            "virtio-net-pci,netdev=pdnet",
        ]
    if cfg.scsi_controller:
        argv += ["-device", "virtio-scsi-pci,id=scsi0"]
    for i in range(cfg.root_ports):
        argv += ["-device", f"pcie-root-port,id=rp{i},chassis={i + 1},slot={i + 1}"]
    for d in cfg.all_disks:
        argv += _disk_args(d)
    argv += list(cfg.extra_args)
    return argv


def format_argv(argv: list[str]) -> str:
    """A shell-pasteable rendering, one option per line."""
    out = [shlex.quote(argv[0])]
    i = 1
    while i < len(argv):
        if argv[i].startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            out.append(f"{shlex.quote(argv[i])} {shlex.quote(argv[i + 1])}")
            i += 2
        else:
            out.append(shlex.quote(argv[i]))
            i += 1
    return " \\\n    ".join(out)
