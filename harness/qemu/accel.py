"""Choose KVM or TCG: KVM only after a short probe boot proves it works.

Why a probe: on our CI machines ``/dev/kvm`` exists but is a nested
paravirtual KVM on which Debian kernels crawl and then stop with "KVM
internal error" (see docs/GUESTS.md). The presence of the device proves
nothing, so ``auto`` boots the real guest under KVM once, with a short
deadline, and falls back to TCG. The verdict is cached in
``.cache/guest/accel-probe.json`` keyed by QEMU version, host kernel and
guest kernel, so the probe costs its ~20 s once per machine.
``PROGDUMP_ACCEL=tcg|kvm`` skips the probe.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from harness.paths import repo_root

if TYPE_CHECKING:
    from harness.guests.base import GuestProfile

__all__ = ["choose_accel", "PROBE_SECONDS"]

PROBE_SECONDS = 20.0
CACHE = repo_root() / ".cache" / "guest" / "accel-probe.json"


def _key(profile: GuestProfile) -> str:
    try:
        qv = subprocess.run(
            ["qemu-system-x86_64", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        qv = "?"
    raw = f"{qv}|{platform.release()}|{profile.name}|{profile.image_identity()}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def choose_accel(
    request: str, profile: GuestProfile, probe: Callable[[GuestProfile], tuple[bool, str]] | None = None
) -> tuple[str, str]:
    """(accel, reason) for ``request`` in auto|tcg|kvm.

    ``probe(profile)`` boots the guest once under KVM and says whether that
    worked (the controller passes :func:`harness.controller.probe_kvm`; this
    module starts nothing itself). Without a probe, ``auto`` means TCG unless a
    cached verdict says otherwise.
    """
    env = os.environ.get("PROGDUMP_ACCEL", "").strip()
    if request == "auto" and env in ("tcg", "kvm"):
        return env, f"PROGDUMP_ACCEL={env}"
    if request in ("tcg", "kvm"):
        return request, "requested"
    if request != "auto":
        raise ValueError(f"accel {request!r} is not auto, tcg or kvm")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "no usable /dev/kvm"
    key = _key(profile)
    try:
        cached = json.loads(CACHE.read_text())
        if cached.get("key") == key:
            return ("kvm" if cached["kvm"] else "tcg"), f"cached probe ({cached['at']}): {cached['why']}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    if probe is None:
        return "tcg", "no KVM probe available"
    ok, why = probe(profile)
    try:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        CACHE.write_text(
            json.dumps({"key": key, "kvm": ok, "why": why, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            + "\n"
        )
    except OSError:
        pass
    return ("kvm" if ok else "tcg"), why
