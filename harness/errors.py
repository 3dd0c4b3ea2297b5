"""Errors the harness raises. Each message names what failed and where to look.

They all derive from :class:`HarnessError` so callers (the scenario runner,
the CLI) can catch one type and print the message without a traceback.
"""

from __future__ import annotations

__all__ = [
    "HarnessError",
    "QemuError",
    "QemuExited",
    "GuestTimeout",
    "BootError",
    "PanicError",
    "CaptureError",
    "CommandError",
    "ImageMissing",
    "MissingTool",
    "SetupError",
]


class HarnessError(Exception):
    """Base class: something about QEMU or the guest went wrong."""


class ImageMissing(HarnessError):
    """The guest image (kernel, initramfs) is not built; run ``make guest-image``."""


class QemuError(HarnessError):
    """QEMU refused a command or could not be started."""


class QemuExited(QemuError):
    """The QEMU process died; ``log_tail`` holds the end of its stderr."""

    def __init__(self, message: str, returncode: int | None = None, log_tail: str = "") -> None:
        super().__init__(message + (f"\n--- qemu log tail ---\n{log_tail}" if log_tail else ""))
        self.returncode = returncode
        self.log_tail = log_tail


class GuestTimeout(HarnessError):
    """The guest did not reach a state in time; the message says which and for how long."""


class BootError(HarnessError):
    """The guest failed to boot (a failure pattern matched on the console)."""


class PanicError(HarnessError):
    """A panic trigger did not lead to a panic event."""


class CaptureError(HarnessError):
    """The frozen guest's state could not be captured."""


class CommandError(HarnessError):
    """A command sent to the guest could not be run (not: it ran and failed)."""


class MissingTool(HarnessError):
    """A program or package a scenario needs is not installed; the message names it and the fix."""


class SetupError(HarnessError):
    """A scenario setup could not be built, started or found (its message names which)."""
