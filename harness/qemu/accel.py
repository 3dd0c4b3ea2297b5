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
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.guests.base import GuestProfile

__all__ = ["choose_accel", "probe_kvm", "PROBE_SECONDS"]

PROBE_SECONDS = 20.0
CACHE = Path(__file__).resolve().parent.parent.parent / ".cache" / "guest" / "accel-probe.json"


def _key(profile: "GuestProfile") -> str:
    try:
        qv = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True,
                            timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        qv = "?"
    man = getattr(profile, "manifest", {}) if hasattr(profile, "image_dir") else {}
    kern = (man.get("vmlinuz") or {}).get("sha256", "?") if isinstance(man, dict) else "?"
    raw = f"{qv}|{platform.release()}|{profile.name}|{kern}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def probe_kvm(profile: "GuestProfile", seconds: float = PROBE_SECONDS) -> tuple[bool, str]:
    """Boot ``profile`` under KVM once; (works, why)."""
    from harness.controller import GuestSession
    from harness.errors import HarnessError
    from harness.timeouts import timeouts_for

    t = timeouts_for("kvm")
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="progdump-kvm-probe-"))
    try:
        with GuestSession(profile=profile, accel="kvm", mem_mib=256, shared_ram=False,
                          workdir=work, timeouts=t) as s:
            s.boot(timeout=seconds)
        shutil.rmtree(work, ignore_errors=True)
        return True, f"probe boot reached ready in {time.monotonic() - t0:.1f} s"
    except HarnessError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return False, (f"probe boot under KVM failed after {time.monotonic() - t0:.1f} s: {first[:200]} "
                       f"(logs in {work})")


def choose_accel(request: str, profile: "GuestProfile") -> tuple[str, str]:
    """(accel, reason) for ``request`` in auto|tcg|kvm."""
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
    ok, why = probe_kvm(profile)
    try:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        CACHE.write_text(json.dumps({"key": key, "kvm": ok, "why": why,
                                     "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
    except OSError:
        pass
    return ("kvm" if ok else "tcg"), why
