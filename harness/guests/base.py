"""Guest profiles: what differs between guest OSes, behind one interface.

Why: the controller is generic; a profile tells it how to boot the guest,
which console lines mean ready / booted-badly / panicked, how to trigger each
kind of panic and how to read the ground-truth markers. ``linux`` is built by
``guest-images/linux``; ``omnios`` (another issue) is a second profile.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import CommandError
from harness.qemu.cmdchan import CommandResult
from harness.qemu.console import Pattern
from harness.qemu.machine import Machine
from progdump.snapshot import Note

__all__ = ["BootSpec", "GuestProfile", "SshCredentials", "parse_marker_json", "MAX_MARKER_JSON"]

MAX_MARKER_JSON = 8192


@dataclass(frozen=True)
class BootSpec:
    """How QEMU boots this guest: a kernel + initrd, or a boot disk."""

    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    boot_disk: Path | None = None
    cmd_channel: bool = True  # guest serves the virtio-serial command port
    extra_args: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class SshCredentials:
    """How the controller logs into the guest: private key file, the guest's pinned host key line, user."""

    key_file: Path
    host_key: str  # "ssh-ed25519 BASE64"
    user: str = "root"


def parse_marker_json(text: str) -> dict[str, Any]:
    """Decode a marker report (bounded; must be a flat JSON object)."""
    if len(text) > MAX_MARKER_JSON:
        raise ValueError(f"marker report of {len(text)} bytes exceeds {MAX_MARKER_JSON}")
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError("marker report is not a JSON object")
    for k, v in doc.items():
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ValueError(f"marker {k!r} is not a string or number")
    return doc


class GuestProfile(ABC):
    """What differs between guests. Capabilities are declared here, not probed with ``getattr``."""

    name: str = "?"
    os: str = "unknown"
    triggers: tuple[str, ...] = ()
    #: how the controller learns of a panic: ``event`` (QMP GUEST_PANICKED, pvpanic) or
    #: ``console`` (the first panic pattern on the serial console; guests with no pvpanic driver)
    panic_detection: str = "event"
    #: multiplies every timeout (a guest that boots far slower than the Linux stand-in)
    timeout_scale: float = 1.0

    def image_identity(self) -> str:
        """A string that changes when the guest image changes (keys the KVM probe's cached verdict)."""
        return self.name

    def ssh_credentials(self) -> SshCredentials | None:
        """Key, pinned host key and user for SSH into the guest; None when the guest has no SSH."""
        return None

    @abstractmethod
    def check_image(self) -> None:
        """Raise :class:`harness.errors.ImageMissing` (with the fix) when not usable."""

    @abstractmethod
    def boot_spec(self, knobs: dict[str, str]) -> BootSpec:
        """Boot description; ``knobs`` are guest settings a scenario asks for."""

    @abstractmethod
    def ready_patterns(self) -> list[Pattern]:
        """Success pattern ``ready`` (group 1: boot id), failure patterns for bad boots."""

    @abstractmethod
    def marker_pattern(self) -> Pattern:
        """Console line carrying the markers report (group 1: JSON)."""

    @abstractmethod
    def panic_patterns(self) -> tuple[Pattern, Pattern]:
        """(first line of a panic, group 1 = panic string; last line of the panic report)."""

    async def prepare_trigger(self, name: str, machine: Machine) -> None:
        """Set up what trigger ``name`` needs (untimed; raise PanicError if it cannot).

        Optional: most triggers need nothing prepared, so the default does nothing.
        """
        return None

    @abstractmethod
    async def trigger(self, name: str, machine: Machine) -> None:
        """Make the guest panic by way ``name`` (one of :attr:`triggers`); returns once sent."""

    async def after_ready(self, machine: Machine) -> str | None:
        """Called once the ready pattern matched (every boot and reset); may return a better boot id."""
        return None

    async def run_command(self, machine: Machine, cmd: str, timeout: float) -> CommandResult:
        """Run ``cmd`` when the guest has no command channel (e.g. over SSH)."""
        raise CommandError(f"guest {self.name} has no command channel")

    def snapshot_notes(self) -> list[Note]:
        """ELF notes the capture adds to the snapshot (e.g. a symbol manifest gathered at boot)."""
        return []

    def workload_script(self, kind: str, amount: int) -> str:
        """Shell script that gives a dump layer content (pagecache, anon, slab)."""
        raise ValueError(f"guest {self.name} has no workload {kind!r}")
