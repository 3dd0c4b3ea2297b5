"""Errors the harness raises. Each message names what failed and where to look.

One root, :class:`HarnessError`, so callers (the scenario runner, the CLI)
catch one type and print the message without a traceback. Below it, two
families the scenario runner tells apart:

- :class:`GuestFailure`: the guest or QEMU did not do what was asked (no
  boot, no panic, a timeout, QEMU died). A scenario may be *measuring* such
  things (a storage hang, a wedged guest), so the runner reports them as the
  guest's failure, not as a bug of ours.
- everything else (:class:`SetupError`, :class:`MissingTool`,
  :class:`ImageMissing`, :class:`TrialError`, :class:`QemuError`, and
  :class:`harness.scenario.ScenarioError`): the run could not be set up or a
  step of ours failed. Any other exception type escaping is a harness bug and
  keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "HarnessError",
    "GuestFailure",
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
    "TrialError",
]


class HarnessError(Exception):
    """Base class: something about QEMU, the guest or a run's setup went wrong."""


class GuestFailure(HarnessError):
    """The guest or QEMU failed at something asked of it (what a scenario may be measuring)."""


class ImageMissing(HarnessError):
    """The guest image (kernel, initramfs) is not built; run ``make guest-image``."""


class MissingTool(HarnessError):
    """A program or package a scenario needs is not installed; the message names it and the fix."""


class SetupError(HarnessError):
    """A scenario setup could not be built, started or found (its message names which)."""


class TrialError(HarnessError):
    """A step of a trial that is ours failed (the writer hung, the older dump could not be written)."""


class QemuError(HarnessError):
    """QEMU refused a command or could not be started."""


class QemuExited(QemuError, GuestFailure):
    """The QEMU process died; ``log_tail`` holds the end of its stderr."""

    def __init__(self, message: str, returncode: int | None = None, log_tail: str = "") -> None:
        super().__init__(message + (f"\n--- qemu log tail ---\n{log_tail}" if log_tail else ""))
        self.returncode = returncode
        self.log_tail = log_tail


class GuestTimeout(GuestFailure):
    """The guest did not reach a state in time; the message says which and for how long."""


class BootError(GuestFailure):
    """The guest failed to boot (a failure pattern matched on the console)."""


class PanicError(GuestFailure):
    """A panic trigger did not lead to a panic event."""


class CaptureError(HarnessError):
    """The frozen guest's state could not be captured."""


class CommandError(GuestFailure):
    """A command sent to the guest could not be run (not: it ran and failed)."""
