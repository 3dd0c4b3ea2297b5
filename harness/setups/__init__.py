"""Registry of scenario setups (see :mod:`harness.setups.base`).

A new setup is one new module in this package that decorates its class with
:func:`register_setup`; nothing else is edited. Modules are imported on the
first lookup, so a setup whose module fails to import is reported by name.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, TypeVar

from harness.errors import SetupError
from harness.setups.base import ScenarioSetup, SessionOverrides

__all__ = ["register_setup", "get_setup", "setup_names", "ScenarioSetup", "SessionOverrides"]

_REGISTRY: dict[str, type[ScenarioSetup]] = {}
_IMPORT_ERRORS: dict[str, str] = {}
_LOADED = [False]
S = TypeVar("S", bound=type[ScenarioSetup])


def register_setup(name: str) -> Callable[[S], S]:
    """Class decorator: make ``cls`` the setup a scenario names with ``setup = "name"``."""

    def deco(cls: S) -> S:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise SetupError(f"setup {name!r} registered twice ({_REGISTRY[name].__module__}, {cls.__module__})")
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
        except Exception as e:  # reported when the setup is asked for
            _IMPORT_ERRORS[m.name] = f"{type(e).__name__}: {e}"


def setup_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_setup(name: str) -> type[ScenarioSetup]:
    _load_all()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _IMPORT_ERRORS:
        raise SetupError(f"setup {name!r} failed to load: {_IMPORT_ERRORS[name]}")
    raise SetupError(f"unknown setup {name!r} (known: {', '.join(sorted(_REGISTRY)) or 'none'})")
