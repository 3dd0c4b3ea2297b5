"""Shared pytest fixtures. Keep this small and generic."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Iterator

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
    work = tempfile.mkdtemp(prefix="progdump-qemu-core-")
    try:
        yield make_qemu_elf_core(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
