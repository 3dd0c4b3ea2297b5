"""Guest profiles (see :mod:`harness.guests.base`)."""

from __future__ import annotations

from harness.guests.base import GuestProfile

__all__ = ["get_profile", "GUESTS"]

GUESTS = ("linux",)


def get_profile(name: str) -> GuestProfile:
    if name == "linux":
        from harness.guests.linux import LinuxGuest

        return LinuxGuest()
    try:  # other profiles (omnios) register as harness.guests.<name>.Profile
        import importlib

        mod = importlib.import_module(f"harness.guests.{name}")
        return mod.Profile()  # type: ignore[no-any-return]
    except (ImportError, AttributeError):
        raise ValueError(f"unknown guest {name!r} (known: {', '.join(GUESTS)})") from None
