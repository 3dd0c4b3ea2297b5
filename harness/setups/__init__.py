"""Registry of scenario setups (see :mod:`harness.setups.base`).

A new setup is one new module in this package that decorates its class with
:func:`register_setup`; nothing else is edited. Modules are imported on the
first lookup, so a setup whose module fails to import is reported by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from harness.errors import SetupError
from harness.registry import PackageRegistry
from harness.setups.base import ScenarioSetup, SessionOverrides

__all__ = ["register_setup", "get_setup", "setup_names", "ScenarioSetup", "SessionOverrides"]

_SETUPS: PackageRegistry[type[ScenarioSetup]] = PackageRegistry(__name__, __path__, "setup", SetupError)
S = TypeVar("S", bound=type[ScenarioSetup])


def register_setup(name: str) -> Callable[[S], S]:
    """Class decorator: make ``cls`` the setup a scenario names with ``setup = "name"``."""
    return _SETUPS.register(name)  # type: ignore[return-value]


def setup_names() -> list[str]:
    return _SETUPS.names()


def get_setup(name: str) -> type[ScenarioSetup]:
    return _SETUPS.get(name)
