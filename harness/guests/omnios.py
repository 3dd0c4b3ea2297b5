"""The OmniOS (illumos) guest: an official cloud image the user supplies.

Nothing in this profile has run against a real image on the machines it was
written on (none can be downloaded there); docs/OMNIOS.md lists what is
verified and what is not. Facts it relies on, with sources, are in that page.

* **Image**: ``OMNIOS_IMAGE=/path/omnios-rNNNNNN.cloud.qcow2`` (or raw), else
  the one ``make guest-image GUEST=omnios`` fetched (guest-images/omnios).
  Always booted through a qcow2 overlay in the profile's run directory: the
  image itself is never written. Without an image, :meth:`check_image` raises
  :class:`~harness.errors.ImageMissing` with one line naming ``OMNIOS_IMAGE``.
* **QEMU**: SeaBIOS (QEMU's default), q35, the overlay as a virtio-blk disk
  with ``bootindex=0``, the serial console (the cloud image sets
  ``console=ttya``), the dump disk as a second virtio-blk disk (the
  controller's), a NoCloud seed (FAT12 ``CIDATA``, read-only virtio-blk) that
  installs the controller's SSH key for root, and user networking with
  ``restrict=on`` (no route to the host or beyond) and one forward,
  127.0.0.1:PORT -> guest :22.
* **Ready**: the console shows ``HOST console login:`` *and* an SSH session
  works with a pinned host key: trust on first use, but only after three
  connections in a row present the same key (cloud-init replaces host keys
  on first boot), then pinned in the run directory for the session's life.
* **Each boot** (over SSH): the symbol and offset manifest is read again
  (``/dev/ksyms`` + ``mdb -k``; see progdump/layers/illumos/manifest.py) and
  travels with every snapshot as an ELF note.
* **Before a panic**: ``dumpadm -d none``, so the guest's own dumpsys never
  competes with the host's writer.
* **Panic detection** from the console (illumos has no pvpanic driver): the
  controller stops the VM the moment ``panic[cpuN]/thread=`` appears.
* **Triggers**: ``uadmin`` (``uadmin 5 1``: A_DUMP/AD_BOOT, "forced crash dump
  initiated at user request"), ``dtrace`` (a destructive ``panic()`` action),
  ``nmi`` (QMP ``inject-nmi``; the seed writes ``nmi=panic`` to
  ``/boot/conf.d/nmi``, which takes effect from the second boot).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.errors import BootError, CommandError, ImageMissing, PanicError
from harness.guests import register_profile
from harness.guests.base import BootSpec, GuestProfile
from harness.guests.nocloud import write_seed
from harness.paths import repo_root
from harness.qemu.cmdchan import CommandResult
from harness.qemu.console import Pattern
from harness.qemu.machine import Machine
from progdump.layers.illumos.manifest import (
    Manifest,
    ManifestError,
    ksyms_symbols,
    manifest_note,
    mdb_script,
    parse_mdb_output,
)
from progdump.snapshot import Note

__all__ = ["OmniosGuest", "image_path", "qemu_extra_args", "make_overlay", "FETCHED_MANIFEST", "SshPin"]

REPO = repo_root()
FETCHED_MANIFEST = REPO / ".cache" / "guest" / "omnios" / "manifest.json"
MAX_OUTPUT = 1 << 20  # bytes kept of one SSH command's output
MAX_KSYMS = 64 << 20
SSH_STABLE = 3  # connections in a row that must show the same host key before it is pinned
QCOW2_MAGIC = b"QFI\xfb"


def image_path(env: dict[str, str] | None = None) -> Path:
    """The image to boot: ``OMNIOS_IMAGE``, else the fetched one; ImageMissing (one line) otherwise."""
    env = dict(os.environ if env is None else env)
    if env.get("OMNIOS_IMAGE"):
        p = Path(env["OMNIOS_IMAGE"]).expanduser()
        if not p.is_file() or not os.access(p, os.R_OK):
            raise ImageMissing(f"OMNIOS_IMAGE={p}: not a readable file")
        return p.resolve()
    try:
        doc = json.loads(FETCHED_MANIFEST.read_text())
        p = (FETCHED_MANIFEST.parent / doc["path"]).resolve()
        if p.is_file():
            return p
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise ImageMissing(
        "no OmniOS image: set OMNIOS_IMAGE=/path/to/omnios-rNNNNNN.cloud.qcow2 "
        "(or run `make guest-image GUEST=omnios` where downloads.omnios.org is reachable)"
    )


def image_format(path: Path) -> str:
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"


def make_overlay(base: Path, overlay: Path) -> Path:
    """``qemu-img create`` a qcow2 overlay whose backing file is ``base`` (never written)."""
    fmt = image_format(base)
    r = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(base.resolve()), str(overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode != 0:
        raise ImageMissing(f"qemu-img could not create an overlay on {base}: {r.stderr.strip()[:300]}")
    return overlay


def qemu_extra_args(overlay: Path, seed: Path, ssh_port: int) -> list[str]:
    """The profile's devices (pure): root overlay first in the boot order, seed, restricted network."""
    for p in (overlay, seed):
        if "," in str(p) or "\n" in str(p):
            raise ValueError(f"path {p} contains a comma or newline")
    if not 1 <= ssh_port <= 65535:
        raise ValueError(f"ssh port {ssh_port}")
    return [
        "-blockdev",
        f"driver=file,node-name=omroot-file,filename={overlay}",
        "-blockdev",
        "driver=qcow2,node-name=omroot,file=omroot-file",
        "-device",
        "virtio-blk-pci,drive=omroot,id=omroot,bootindex=0",
        "-blockdev",
        f"driver=file,node-name=omseed-file,filename={seed},read-only=on",
        "-blockdev",
        "driver=raw,node-name=omseed,file=omseed-file,read-only=on",
        "-device",
        "virtio-blk-pci,drive=omseed,id=omseed",
        "-netdev",
        f"user,id=omnet,restrict=on,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
        "-device",
        "virtio-net-pci,netdev=omnet",
    ]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _new_key(path: Path) -> str:
    """An ed25519 client key in OpenSSH format (cryptography, a paramiko dependency); returns the public line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    k = Ed25519PrivateKey.generate()
    path.write_bytes(
        k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    path.chmod(0o600)
    pub = k.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    (path.parent / (path.name + ".pub")).write_text(pub + " progdump-controller\n")
    return pub + " progdump-controller"


class SshPin:
    """Trust on first use, made safe against key rotation: pin once SSH_STABLE connections agree."""

    def __init__(self, pin_file: Path) -> None:
        self.pin_file = pin_file
        self.pinned: tuple[str, str] | None = None
        self.candidate: tuple[str, str] | None = None
        self.streak = 0
        if pin_file.exists():
            kt, kb = pin_file.read_text().split()[:2]
            self.pinned = (kt, kb)

    def observe(self, key_type: str, key_b64: str) -> bool:
        """Record the key one connection showed; True once pinned. A pinned key that changes raises BootError."""
        seen = (key_type, key_b64)
        if self.pinned is not None:
            if seen != self.pinned:
                raise BootError(
                    f"guest SSH host key changed: pinned {self.pinned[0]} {self.pinned[1][:24]}..., "
                    f"now {key_type} {key_b64[:24]}... ({self.pin_file})"
                )
            return True
        self.streak = self.streak + 1 if seen == self.candidate else 1
        self.candidate = seen
        if self.streak >= SSH_STABLE:
            self.pinned = seen
            self.pin_file.write_text(f"{key_type} {key_b64}\n")
            return True
        return False


def nmi_action_from_mdb(text: str) -> str | None:
    """The enum name ``mdb -k`` prints for ``nmi_action::print`` (``NMI_ACTION_PANIC``), or None.

    Untrusted console text: only a bounded ``NMI_ACTION_[A-Z]+`` token is taken.
    """
    m = re.search(r"\b(NMI_ACTION_[A-Z]{1,16})\b", text[:4096])
    return m.group(1) if m else None


@register_profile("omnios")
class OmniosGuest(GuestProfile):
    name = "omnios"
    os = "illumos"
    triggers = ("uadmin", "dtrace", "nmi")
    panic_detection = "console"
    timeout_scale = 20.0  # illumos under TCG: the tools that boot it allow 15-30 min (docs/OMNIOS.md)

    def __init__(self, run_dir: Path | None = None) -> None:
        self._run_dir = run_dir
        self.ssh_port: int | None = None
        self.pin: SshPin | None = None
        self.manifest: Manifest | None = None
        self.manifest_error: str | None = None
        self.boot_count = 0
        self._image: Path | None = None

    # -- image and command line ---------------------------------------------------------
    def check_image(self) -> None:
        self._image = image_path()

    @property
    def run_dir(self) -> Path:
        if self._run_dir is None:
            env = os.environ.get("OMNIOS_RUN_DIR")
            self._run_dir = Path(env) if env else Path(tempfile.mkdtemp(prefix="progdump-omnios-"))
        self._run_dir.mkdir(parents=True, exist_ok=True)
        return self._run_dir

    def _prepare(self) -> tuple[Path, Path]:
        """Overlay, client key and seed in the run directory (made once per profile instance)."""
        if self._image is None:
            self.check_image()
        assert self._image is not None
        rd = self.run_dir
        overlay, seed, key = rd / "overlay.qcow2", rd / "seed.img", rd / "id_ed25519"
        if not overlay.exists():
            make_overlay(self._image, overlay)
        if not key.exists():
            pub = _new_key(key)
        else:
            pub = (rd / "id_ed25519.pub").read_text().strip()
        if not seed.exists():
            write_seed(seed, pub, instance_id=f"progdump-{rd.name}")
        if self.pin is None:
            self.pin = SshPin(rd / "ssh_host_key.pin")
        return overlay, seed

    def boot_spec(self, knobs: dict[str, str]) -> BootSpec:
        if knobs:
            raise ValueError(f"omnios takes no guest knobs (got {', '.join(sorted(knobs))})")
        overlay, seed = self._prepare()
        if self.ssh_port is None:
            self.ssh_port = _free_port()
        return BootSpec(cmd_channel=False, extra_args=tuple(qemu_extra_args(overlay, seed, self.ssh_port)))

    # -- console ------------------------------------------------------------------------
    def ready_patterns(self) -> list[Pattern]:
        return [
            Pattern.of("ready", rb"(\S+) console login:"),
            Pattern.of("boot-panic", rb"panic\[cpu\d+\]/thread=[0-9a-fA-F]+: ?(.*)", failure=True),
            Pattern.of("no-boot-disk", rb"(No bootable device|Boot failed: not a bootable disk.*omroot)", failure=True),
        ]

    def marker_pattern(self) -> Pattern:
        return Pattern.of("markers", rb"^PROGDUMP-MARKERS (\{.*\})")  # not printed by this guest: no markers

    def panic_patterns(self) -> tuple[Pattern, Pattern]:
        return (
            Pattern.of("panic", rb"panic\[cpu\d+\]/thread=[0-9a-fA-F]+: ?(.*?)\s*$"),
            Pattern.of("panic-end", rb"(skipping system dump|dump succeeded|dump failed|rebooting\.\.\.)"),
        )

    # -- SSH ----------------------------------------------------------------------------
    def _connect(self, timeout: float = 30.0) -> Any:
        import paramiko

        assert self.pin is not None and self.ssh_port is not None
        pin = self.pin
        client = paramiko.SSHClient()
        if pin.pinned is not None:
            kt, kb = pin.pinned
            client.get_host_keys().add(
                f"[127.0.0.1]:{self.ssh_port}",
                kt,
                paramiko.PKey.from_type_string(kt, __import__("base64").b64decode(kb)),
            )
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        else:
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # recorded below, pinned after SSH_STABLE
        client.connect(
            "127.0.0.1",
            port=self.ssh_port,
            username="root",
            key_filename=str(self.run_dir / "id_ed25519"),
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            allow_agent=False,
            look_for_keys=False,
        )
        key = client.get_transport().get_remote_server_key()
        pin.observe(key.get_name(), key.get_base64())
        return client

    def _exec(self, cmd: str, timeout: float) -> CommandResult:
        t0 = time.monotonic()
        client = self._connect(min(timeout, 60.0))
        try:
            _, out, _ = client.exec_command(cmd, timeout=timeout, get_pty=False)
            ch = out.channel
            ch.set_combine_stderr(True)
            buf = bytearray()
            while True:
                chunk = ch.recv(65536)
                if not chunk:
                    break
                if len(buf) < MAX_OUTPUT:
                    buf += chunk[: MAX_OUTPUT - len(buf)]
            status = ch.recv_exit_status()
        finally:
            client.close()
        return CommandResult(status, bytes(buf), time.monotonic() - t0)

    def _fire(self, cmd: str) -> None:
        """Start ``cmd`` detached and return at once (the session dies with the panic)."""
        client = self._connect()
        try:
            client.exec_command(f"nohup sh -c {shlex.quote('sleep 1; ' + cmd)} >/dev/null 2>&1 &", timeout=30)
            time.sleep(0.2)
        finally:
            client.close()

    async def after_ready(self, machine: Machine) -> str | None:
        """SSH up with a pinned host key, then the manifest (again: every boot); returns the boot id."""
        deadline = time.monotonic() + machine.t.boot
        last = "no attempt"
        while True:
            try:
                await asyncio.to_thread(self._ssh_probe)
                assert self.pin is not None
                if self.pin.pinned is not None:
                    break
            except BootError:
                raise
            except Exception as e:  # noqa: BLE001 - sshd not up yet, key not stable yet
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                raise BootError(
                    f"omnios: login prompt seen but no stable SSH session within {machine.t.boot:.0f} s (last: {last})"
                )
            await asyncio.sleep(5.0)
        self.boot_count += 1
        await asyncio.to_thread(self._read_manifest, machine.t.command)
        res = await asyncio.to_thread(self._exec, "kstat -p unix:0:system_misc:boot_time", machine.t.command)
        bt = res.text.split()[-1] if res.status == 0 and res.text.split() else str(self.boot_count)
        return f"omnios-boot-{bt}"

    def _ssh_probe(self) -> None:
        c = self._connect()
        c.close()

    def _read_manifest(self, timeout: float) -> None:
        """``/dev/ksyms`` and ``mdb -k`` over SSH -> :attr:`manifest` (kept None, with the reason, on failure)."""
        self.manifest, self.manifest_error = None, None
        try:
            res = self._exec(mdb_script(), timeout)
            (self.run_dir / f"manifest-mdb.{self.boot_count}.txt").write_bytes(res.output)
            m = parse_mdb_output(res.text)
            client = self._connect()
            try:
                _, out, _ = client.exec_command("cat /dev/ksyms", timeout=timeout)
                elf = out.read(MAX_KSYMS + 1)
            finally:
                client.close()
            (self.run_dir / "ksyms.elf").write_bytes(elf)
            m.symbols = ksyms_symbols(elf)
            self.manifest = m
        except (ManifestError, CommandError, OSError, Exception) as e:  # noqa: BLE001 - the dump degrades to generic
            self.manifest_error = f"{type(e).__name__}: {e}"

    async def run_command(self, machine: Machine, cmd: str, timeout: float) -> CommandResult:
        if self.ssh_port is None:
            raise CommandError("omnios: not booted (no SSH port)")
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._exec, cmd, timeout), timeout + 30)
        except BootError:
            raise
        except TimeoutError:
            raise
        except Exception as e:  # noqa: BLE001 - paramiko and socket errors
            raise CommandError(f"omnios: SSH command failed: {type(e).__name__}: {e}") from None

    def snapshot_notes(self) -> list[Note]:
        return [manifest_note(self.manifest)] if self.manifest is not None else []

    # -- panics -------------------------------------------------------------------------
    async def prepare_trigger(self, name: str, machine: Machine) -> None:
        res = await self.run_command(machine, "dumpadm -d none", machine.t.command)
        if res.status != 0:
            raise PanicError(f"dumpadm -d none failed (status {res.status}): {res.text[-300:]}")
        if name == "nmi":
            # The running kernel's setting, not the loader file: the seed writes
            # /boot/conf.d/nmi on the first boot and the loader reads it on the next.
            # mlsetup() sets nmi_action from the ``nmi`` boot property; an unset or
            # kmdb action panics only when no debugger is loaded (apic NMI handler).
            res = await self.run_command(machine, "echo 'nmi_action::print' | mdb -k", machine.t.command)
            action = nmi_action_from_mdb(res.text) if res.status == 0 else None
            if action != "NMI_ACTION_PANIC":
                raise PanicError(
                    f"nmi trigger: the running kernel's nmi_action is {action or 'unreadable'} "
                    f"(mdb -k status {res.status}), not NMI_ACTION_PANIC: the seed's /boot/conf.d/nmi "
                    "(nmi=panic) takes effect after a reboot"
                )

    async def trigger(self, name: str, machine: Machine) -> None:
        if name == "nmi":
            await machine.inject_nmi()
            return
        cmds = {"uadmin": "uadmin 5 1", "dtrace": "dtrace -w -n 'BEGIN{panic();}'"}
        if name not in cmds:
            raise ValueError(f"unknown trigger {name!r} for omnios (known: {', '.join(self.triggers)})")
        try:
            await asyncio.to_thread(self._fire, cmds[name])
        except Exception as e:  # noqa: BLE001
            raise PanicError(f"omnios: could not start {cmds[name]!r} over SSH: {type(e).__name__}: {e}") from None
