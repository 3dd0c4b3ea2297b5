"""Registry of guest profiles (see :mod:`harness.guests.base`).

A new guest is one new module in this package whose profile class is
decorated with :func:`register_profile`; nothing else is edited. Modules are
imported on first lookup; one that fails to import is reported by name when
its guest is asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from harness.errors import HarnessError
from harness.guests.base import GuestProfile
from harness.registry import PackageRegistry

__all__ = ["get_profile", "register_profile", "guest_names", "UnknownGuest"]


class UnknownGuest(HarnessError, ValueError):
    """No profile of that name (ValueError too: it is a bad argument)."""


_PROFILES: PackageRegistry[type[GuestProfile]] = PackageRegistry(__name__, __path__, "guest", UnknownGuest)
G = TypeVar("G", bound=type[GuestProfile])


def register_profile(name: str) -> Callable[[G], G]:
    """Class decorator: ``GUEST=name`` selects ``cls``."""
    return _PROFILES.register(name)  # type: ignore[return-value]


def guest_names() -> list[str]:
    return _PROFILES.names()


def get_profile(name: str) -> GuestProfile:
    return _PROFILES.get(name)()
