"""Timeouts for guest operations, scaled for the accelerator in use.

Why: TCG is 5-20x slower than KVM and shared CI machines are slower still.
Base values are for TCG on a loaded 2-core machine (boot to ready takes
~2.5 s there); under KVM (only used after a probe boot proved it) they
are halved. ``PROGDUMP_TIMEOUT_SCALE`` multiplies every value for slower
hosts. Tests never assert timings; these only bound waits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

__all__ = ["Timeouts", "timeouts_for"]


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait for each step before giving up."""

    qmp_connect: float = 10.0  # QEMU start to QMP greeting
    qmp_command: float = 30.0  # any single QMP command
    boot: float = 90.0  # cont to the guest's ready line (4 GiB guests boot slower)
    command: float = 60.0  # one command run in the guest
    panic_event: float = 30.0  # trigger to GUEST_PANICKED (hung-task panics need their detector period)
    panic_console: float = 5.0  # GUEST_PANICKED to the panic's last console line
    device_deleted: float = 20.0  # device_del to DEVICE_DELETED
    quit: float = 10.0  # quit to process exit
    dump: float = 600.0  # a full dump-guest-memory or pmemsave of a big guest

    def scaled(self, factor: float) -> Timeouts:
        return replace(self, **{f.name: getattr(self, f.name) * factor for f in fields(self)})


def timeouts_for(accel: str) -> Timeouts:
    """Timeouts for ``accel`` ("tcg" or "kvm"), times ``PROGDUMP_TIMEOUT_SCALE``."""
    try:
        scale = float(os.environ.get("PROGDUMP_TIMEOUT_SCALE", "1") or 1)
    except ValueError:
        scale = 1.0
    scale = min(max(scale, 0.1), 100.0)
    base = Timeouts()
    if accel == "kvm":
        base = base.scaled(0.5)
    return base.scaled(scale)
