"""Shared fixtures for VM tests: real QEMU, real guests, skips that say why.

Every VM test boots the Linux stand-in built by ``make guest-image``. The
accelerator is ``auto`` (KVM only after a probe boot proves it; TCG here),
or ``PROGDUMP_ACCEL``. Timeouts scale with ``PROGDUMP_TIMEOUT_SCALE``.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def linux_guest_skip_reason() -> str | None:
    """Why VM tests of the Linux guest cannot run here, or None."""
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not installed (make setup installs qemu-system-x86)"
    try:
        from harness.guests import get_profile

        get_profile("linux").check_image()
    except Exception as e:  # the profile's message says what to do
        return f"linux guest image not usable: {e}"
    return None


@pytest.fixture(scope="session")
def linux_guest() -> None:
    """Skip (printing why) unless QEMU and the Linux guest image are present."""
    reason = linux_guest_skip_reason()
    if reason:
        print(f"\nSKIP: {reason}", file=sys.stderr)
        pytest.skip(reason)


@pytest.fixture
def guest_session(linux_guest: None, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Factory for GuestSessions that are all closed (QEMU gone) after the test."""
    from harness.controller import GuestSession

    made: list[GuestSession] = []

    def make(**kw: Any) -> GuestSession:
        kw.setdefault("workdir", tmp_path / f"guest{len(made)}")
        s = GuestSession(**kw)
        made.append(s)
        s.start()
        return s

    yield make
    for s in made:
        s.close()
