"""Run a scenario on one frozen copy of the code.

Why: the tree may change during a run (a shared working tree; a developer
mid-edit). Ground truth computed by one version and a dump written by another
differ for reasons that are not crashes, and a half-edited file breaks a
trial (both happened). So ``make scenario`` and ``make regress`` copy
``progdump/`` and ``harness/`` once (by default the last commit, ``git
archive HEAD``; ``PIN=tree`` the working tree as it is; ``PIN=none`` no copy)
and re-execute the command on that copy, with ``PYTHONPATH`` pointing at it
and ``PROGDUMP_REPO`` at the checkout. Every child (writer, recovery)
inherits the same ``PYTHONPATH``; nothing swaps modules inside a process.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from harness.paths import repo_root

__all__ = ["PINNED_ENV", "pin_info", "make_copy", "reexec_pinned"]

#: set in the re-executed process: JSON describing the copy it runs on
PINNED_ENV = "PROGDUMP_PINNED"
PACKAGES = ("progdump", "harness")


def pin_info() -> dict[str, object]:
    """What code this process runs (for summary.json): the copy, the commit, whether the tree was dirty."""
    raw = os.environ.get(PINNED_ENV)
    if not raw:
        return {"pin": os.environ.get("PIN", "none") or "none"}
    try:
        d = json.loads(raw)
        return d if isinstance(d, dict) else {"pin": "unknown"}
    except ValueError:
        return {"pin": "unknown"}


def make_copy(mode: str, dst: Path, root: Path | None = None) -> dict[str, object]:
    """Copy the packages into ``dst`` (``head``: from git HEAD; ``tree``: the working tree)."""
    root = root or repo_root()
    info: dict[str, object] = {"pin": mode, "copy": str(dst)}
    dst.mkdir(parents=True, exist_ok=True)
    done = False
    if mode == "head":
        p = subprocess.run(["git", "-C", str(root), "archive", "--format=tar", "HEAD", *PACKAGES], capture_output=True)
        if p.returncode == 0 and p.stdout:
            with tarfile.open(fileobj=io.BytesIO(p.stdout)) as tf:
                tf.extractall(dst, filter="data")
            done = True
        else:
            info["pin"] = "tree (no git HEAD: " + p.stderr.decode(errors="replace").strip()[:100] + ")"
    if not done:
        for pkg in PACKAGES:
            shutil.copytree(
                root / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True
            )
    r = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if r.returncode == 0:
        info["commit"] = r.stdout.strip()
        st = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", *PACKAGES], capture_output=True, text=True
        )
        info["tree_dirty"] = bool(st.stdout.strip())
    return info


def reexec_pinned(module: str, argv: list[str], work: Path) -> None:
    """Re-execute ``python -m module argv`` on a pinned copy, unless already pinned or ``PIN=none``.

    Returns only when no re-execution is needed; otherwise the process image is replaced.
    """
    mode = os.environ.get("PIN", "head") or "head"
    if os.environ.get(PINNED_ENV) or mode == "none":
        return
    if mode not in ("head", "tree"):
        raise SystemExit(f"PIN={mode!r}: want head, tree or none")
    root = repo_root()
    dst = work / f"code-{os.getpid()}"
    if dst.exists():
        shutil.rmtree(dst)
    info = make_copy(mode, dst, root)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(dst) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PROGDUMP_REPO"] = str(root)
    env[PINNED_ENV] = json.dumps(info)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)
