"""Where the checkout is: scenarios, baselines, results, caches and guest images live under it.

Why not ``Path(__file__)``: a scenario run re-executes itself on a pinned copy
of the code (:mod:`harness.pin`), whose files sit elsewhere; the copy must
still find the user's checkout. ``PROGDUMP_REPO`` carries it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["repo_root"]


def repo_root() -> Path:
    env = os.environ.get("PROGDUMP_REPO")
    return Path(env) if env else Path(__file__).resolve().parents[1]
