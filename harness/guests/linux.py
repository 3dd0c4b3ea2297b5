"""The Linux stand-in guest (built by ``guest-images/linux``; see docs/GUESTS.md).

Panic triggers, all real kernel paths:

* ``sysrq``: ``echo c > /proc/sysrq-trigger`` (``panic("sysrq triggered crash")``);
* ``nmi``: QMP ``inject-nmi``; the guest set ``kernel.unknown_nmi_panic=1``;
* ``oops``: a NULL dereference in process context by the ``pdoops`` module
  (built against Debian's headers at image-build time) with
  ``panic_on_oops=1``: "BUG: kernel NULL pointer dereference", then
  ``panic("Fatal exception")``;
* ``hung-task``: a writer blocked in D state on a frozen ext2 (loop device,
  ``fsfreeze``) with ``hung_task_panic=1`` and a 2 s detector period;
* ``init-exit``: PID 1 exits (``Attempted to kill init!``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from harness.errors import ImageMissing, PanicError
from harness.guests import register_profile
from harness.guests.base import BootSpec, GuestProfile, SshCredentials
from harness.paths import repo_root
from harness.qemu.console import Pattern
from harness.qemu.machine import Machine

__all__ = ["LinuxGuest", "default_image_dir"]

KNOBS = ("panic_print", "hung_task_panic", "hung_task_timeout", "softlockup_panic", "panic_on_oops")

# Set up a frozen filesystem (run and checked before the trigger fires).
HUNG_TASK_SETUP = """\
set -e
dd if=/dev/zero of=/run/pdhung.img bs=1M count=8 2>/dev/null
dev=$(losetup -f)
losetup "$dev" /run/pdhung.img
mke2fs -q "$dev" >/dev/null 2>&1
mkdir -p /mnt/pdhung
mount -t ext2 "$dev" /mnt/pdhung
fsfreeze --freeze /mnt/pdhung
"""
# The writer blocks in D state (sb_start_write on the frozen fs); the detector
# (period 2 s) panics once it has been blocked for a full period.
HUNG_TASK_FIRE = """\
sysctl -qw kernel.hung_task_panic=1
sysctl -qw kernel.hung_task_timeout_secs=2
(echo blocked > /mnt/pdhung/writer) </dev/null >/dev/null 2>&1 &
"""


# Workloads give every dump layer content. $1 = amount (MiB, or entries for slab).
_CHUNK = """\
c=/run/pdfill.$1
[ -e $c ] || yes "PD-FILL-$1" | head -c 1048576 > $c
"""
WORKLOADS = {
    # page cache: a ramfs file (ramfs pages are page cache, never swapped), read back
    "pagecache": 'set -- cache "$1"\n'
    + _CHUNK
    + """\
mkdir -p /pdcache/fill; f=/pdcache/fill/pc.$$
i=0; while [ $i -lt $2 ]; do echo "pagecache chunk $i"; cat $c; i=$((i+1)); done > $f
cat $f > /dev/null
""",
    # anonymous memory: dd holds one block of $1 MiB in its heap, blocked on a pipe
    # nobody reads; the source file is gone once dd has read it
    "anon": 'set -- anon "$1"\n'
    + _CHUNK
    + """\
src=/run/pdanon.$$
i=0; while [ $i -lt $2 ]; do echo "anon chunk $i"; cat $c; i=$((i+1)); done > $src
cat $src | dd bs=$(( $2 * 1048576 + 65536 )) count=1 iflag=fullblock 2>/dev/null | sleep 2000000000 &
i=0; while [ $i -lt 100 ]; do
  rss=0; for p in $(pidof dd); do r=$(awk '/VmRSS/{print $2}' /proc/$p/status 2>/dev/null); [ "${r:-0}" -gt $rss ] && rss=$r; done
  [ $rss -ge $(( $2 * 1024 )) ] && break; sleep 0.1; i=$((i+1)); done
rm -f $src
[ $rss -ge $(( $2 * 1024 )) ] || { echo "anon workload: dd holds only $rss kB"; exit 1; }
""",
    # kernel slab: $1 files and $1/4 directories in tmpfs (dentries, inodes)
    "slab": """\
d=/tmp/pdslab.$$; mkdir -p $d; cd $d
seq 1 "$1" | sed s/^/f/ | xargs touch
seq 1 $(( $1 / 4 + 1 )) | sed s/^/d/ | xargs mkdir
""",
}


def workload_script(kind: str, amount: int) -> str:
    """Shell script for workload ``kind`` (pagecache|anon MiB, slab entries)."""
    if kind not in WORKLOADS:
        raise ValueError(f"unknown workload {kind!r} (known: {', '.join(WORKLOADS)})")
    if not isinstance(amount, int) or not 0 < amount <= 1 << 20:
        raise ValueError(f"workload amount {amount!r} must be a positive integer")
    return f"set -- {amount}\n" + WORKLOADS[kind]


# Load the oops module only when asked: an unsigned out-of-tree module taints the kernel.
OOPS_SETUP = "[ -e /proc/pdoops ] || insmod /lib/modules/extra/pdoops.ko\n"


def default_image_dir() -> Path:
    env = os.environ.get("PROGDUMP_GUEST_LINUX_DIR")
    return Path(env) if env else repo_root() / ".cache" / "guest" / "linux"


@register_profile("linux")
class LinuxGuest(GuestProfile):
    name = "linux"
    os = "linux"
    ALL_TRIGGERS = ("sysrq", "nmi", "oops", "hung-task", "init-exit")

    @property
    def triggers(self) -> tuple[str, ...]:  # type: ignore[override]
        """``oops`` only when the image carries the pdoops module (built with the kernel headers)."""
        try:
            has_oops = bool((self.manifest.get("oops_module") or {}).get("path"))
        except ImageMissing:
            has_oops = False
        return tuple(t for t in self.ALL_TRIGGERS if t != "oops" or has_oops)

    def __init__(self, image_dir: Path | None = None) -> None:
        self.image_dir = image_dir or default_image_dir()
        self._manifest: dict[str, Any] | None = None

    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            self.check_image()
        assert self._manifest is not None
        return self._manifest

    def image_identity(self) -> str:
        try:
            return str((self.manifest.get("vmlinuz") or {}).get("sha256", "?"))
        except ImageMissing:
            return "?"

    def ssh_credentials(self) -> SshCredentials | None:
        ssh = self.manifest.get("ssh")
        if not isinstance(ssh, dict) or "key" not in ssh or "host_key" not in ssh:
            return None
        return SshCredentials(self.image_dir / str(ssh["key"]), str(ssh["host_key"]), str(ssh.get("user", "root")))

    def check_image(self) -> None:
        man = self.image_dir / "manifest.json"
        try:
            doc = json.loads(man.read_text())
            for key in ("vmlinuz", "initramfs"):
                if not (self.image_dir / doc[key]["path"]).is_file():
                    raise ImageMissing(f"{self.image_dir / doc[key]['path']} missing; run `make guest-image`")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ImageMissing(
                f"no usable Linux guest image in {self.image_dir} ({e}); run `make guest-image`"
            ) from None
        self._manifest = doc

    def boot_spec(self, knobs: dict[str, str]) -> BootSpec:
        man = self.manifest
        extra = []
        for k, v in sorted(knobs.items()):
            if k not in KNOBS:
                raise ValueError(f"unknown linux guest knob {k!r} (known: {', '.join(KNOBS)})")
            if not str(v).isdigit() and not str(v).lower().startswith("0x"):
                raise ValueError(f"knob {k}={v!r} is not a number")
            extra.append(f"pd.{k}={v}")
        return BootSpec(
            kernel=self.image_dir / man["vmlinuz"]["path"],
            initrd=self.image_dir / man["initramfs"]["path"],
            append=" ".join([man.get("cmdline", "console=ttyS0")] + extra),
        )

    def ready_patterns(self) -> list[Pattern]:
        return [
            # no end anchor: a kernel message can land on the same console line before
            # the newline (seen in CI: "PROGDUMP-READY <nonce>[    4.92] IPv6: ...")
            Pattern.of("ready", rb"^PROGDUMP-READY ([0-9a-f]{16})"),
            Pattern.of("boot-panic", rb"Kernel panic - not syncing: (.*)", failure=True),
            Pattern.of("no-init", rb"(No working init found|Run /init as init process.*failed)", failure=True),
        ]

    def marker_pattern(self) -> Pattern:
        return Pattern.of("markers", rb"^PROGDUMP-MARKERS (\{.*\})")  # tolerate a kernel message appended

    def panic_patterns(self) -> tuple[Pattern, Pattern]:
        return (
            Pattern.of("panic", rb"Kernel panic - not syncing: (.*?)\s*$"),
            Pattern.of("panic-end", rb"---\[ end Kernel panic - not syncing: (.*?) \]---"),
        )

    def workload_script(self, kind: str, amount: int) -> str:
        return workload_script(kind, amount)

    async def prepare_trigger(self, name: str, machine: Machine) -> None:
        setup = {"hung-task": HUNG_TASK_SETUP, "oops": OOPS_SETUP}.get(name)
        if setup is None:
            return
        if machine.cmd is None:
            raise PanicError("the command channel is not connected")
        res = await machine.cmd.run(setup, machine.t.command)
        if res.status != 0:
            raise PanicError(f"{name} setup failed (status {res.status}): {res.text[-500:]}")

    async def trigger(self, name: str, machine: Machine) -> None:
        if name == "nmi":
            await machine.inject_nmi()
            return
        scripts = {
            "sysrq": "echo c > /proc/sysrq-trigger",
            "oops": "echo oops > /proc/pdoops",
            "init-exit": "echo exit > /run/initctl",
            "hung-task": HUNG_TASK_FIRE,
        }
        if name not in scripts:
            raise ValueError(f"unknown trigger {name!r} for linux (known: {', '.join(self.triggers)})")
        if machine.cmd is None:
            raise PanicError("the command channel is not connected")
        await machine.cmd.fire(scripts[name])
