"""Every module's ``__all__`` names things the module really defines (a stale name breaks ``import *``
and lies to readers), and no module of the two packages fails to import."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import harness
import progdump

SKIP = {"progdump.__main__", "harness.__main__", "harness.crashsim.__main__"}  # importing them runs a CLI


def _modules() -> list[str]:
    out = []
    for pkg in (progdump, harness):
        out.append(pkg.__name__)
        out += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".") if m.name not in SKIP]
    return sorted(out)


@pytest.mark.parametrize("name", _modules())
def test_all_names_exist(name: str) -> None:
    mod = importlib.import_module(name)
    names = getattr(mod, "__all__", None)
    if names is None:
        return  # a package __init__ or script without an export list: nothing promised
    assert len(set(names)) == len(names), f"{name}.__all__ repeats a name"
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{name}.__all__ names {missing}, which the module does not define"
