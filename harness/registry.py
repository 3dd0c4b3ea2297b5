"""A registry of classes that live one per module in a package, loaded on the first lookup.

Why one class: guest profiles (``harness/guests``) and scenario setups
(``harness/setups``) both let a new file join by decorating its class,
without editing another file; both import the package's modules lazily and
report a module that failed to import by name when it is asked for.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

__all__ = ["PackageRegistry"]

C = TypeVar("C", bound=type)


class PackageRegistry(Generic[C]):
    """``what`` names the kind in messages; ``error`` is raised for unknown, broken or doubly registered names."""

    def __init__(
        self, package: str, path: Iterable[str], what: str, error: type[Exception], skip: tuple[str, ...] = ("base",)
    ) -> None:
        self.package, self.path, self.what, self.error, self.skip = package, list(path), what, error, skip
        self.classes: dict[str, C] = {}
        self.import_errors: dict[str, str] = {}
        self.loaded = False

    def register(self, name: str) -> Callable[[C], C]:
        """Class decorator: ``name`` selects ``cls`` (its ``name`` attribute is set to it)."""

        def deco(cls: C) -> C:
            old = self.classes.get(name)
            if old is not None and old is not cls:
                raise self.error(f"{self.what} {name!r} registered twice ({old.__module__}, {cls.__module__})")
            cls.name = name  # type: ignore[attr-defined]
            self.classes[name] = cls
            return cls

        return deco

    def load_all(self) -> None:
        if self.loaded:
            return
        self.loaded = True
        for m in pkgutil.iter_modules(self.path):
            if m.name in self.skip:
                continue
            try:
                importlib.import_module(f"{self.package}.{m.name}")
            except Exception as e:  # reported when that name is asked for
                self.import_errors[m.name] = f"{type(e).__name__}: {e}"

    def names(self) -> list[str]:
        self.load_all()
        return sorted(self.classes)

    def get(self, name: str) -> C:
        self.load_all()
        if name in self.classes:
            return self.classes[name]
        if name in self.import_errors:
            raise self.error(f"{self.what} {name!r} failed to load: {self.import_errors[name]}")
        raise self.error(f"unknown {self.what} {name!r} (known: {', '.join(sorted(self.classes)) or 'none'})")
