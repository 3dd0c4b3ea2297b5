"""Shared pytest fixtures. Keep this small and generic."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # so tests can import qemu_core

from qemu_core import QemuCore, make_qemu_elf_core, qemu_unavailable_reason  # noqa: E402


@pytest.fixture(scope="session")
def qemu_elf_core() -> Iterator[QemuCore]:
    """A real QEMU ``dump-guest-memory`` ELF core (64 MiB q35, 2 vCPUs, paused at reset)
    with known bytes planted in RAM (``.plants``: GPA -> bytes). Built once per session
    (about a second); skips with the reason when QEMU is not available.

    It lives in its own temporary directory, not pytest's numbered basetemp, which a
    concurrent pytest run on the same machine may prune while QEMU is using it.
    """
    reason = qemu_unavailable_reason()
    if reason:
        pytest.skip(f"qemu_elf_core: {reason}")
    _remove_stale(tempfile.gettempdir(), "progdump-qemu-core-", max_age_s=3600)
    work = tempfile.mkdtemp(prefix="progdump-qemu-core-")
    try:
        yield make_qemu_elf_core(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _remove_stale(parent: str, prefix: str, max_age_s: float) -> None:
    """Remove ``prefix*`` directories left by killed runs (old enough not to be in use)."""
    now = time.time()
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        try:
            if name.startswith(prefix) and now - os.stat(path).st_mtime > max_age_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass
