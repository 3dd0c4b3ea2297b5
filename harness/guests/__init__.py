"""Registry of guest profiles (see :mod:`harness.guests.base`).

A new guest is one new module in this package whose profile class is
decorated with :func:`register_profile`; nothing else is edited. Modules are
imported on first lookup; one that fails to import is reported by name when
its guest is asked for.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, TypeVar

from harness.errors import HarnessError
from harness.guests.base import GuestProfile

__all__ = ["get_profile", "register_profile", "guest_names", "UnknownGuest"]

_REGISTRY: dict[str, type[GuestProfile]] = {}
_IMPORT_ERRORS: dict[str, str] = {}
_LOADED = [False]
G = TypeVar("G", bound=type[GuestProfile])


class UnknownGuest(HarnessError, ValueError):
    """No profile of that name (ValueError too: it is a bad argument)."""


def register_profile(name: str) -> Callable[[G], G]:
    """Class decorator: ``GUEST=name`` selects ``cls``."""

    def deco(cls: G) -> G:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise HarnessError(f"guest {name!r} registered twice ({_REGISTRY[name].__module__}, {cls.__module__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_all() -> None:
    if _LOADED[0]:
        return
    _LOADED[0] = True
    for m in pkgutil.iter_modules(__path__):
        if m.name == "base":
            continue
        try:
            importlib.import_module(f"{__name__}.{m.name}")
        except Exception as e:  # reported when that guest is asked for
            _IMPORT_ERRORS[m.name] = f"{type(e).__name__}: {e}"


def guest_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_profile(name: str) -> GuestProfile:
    _load_all()
    if name in _REGISTRY:
        return _REGISTRY[name]()
    if name in _IMPORT_ERRORS:
        raise UnknownGuest(f"guest {name!r} failed to load: {_IMPORT_ERRORS[name]}")
    raise UnknownGuest(f"unknown guest {name!r} (known: {', '.join(guest_names())})")
