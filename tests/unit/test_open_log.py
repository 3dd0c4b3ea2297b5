"""Logs in a work directory are never written through a planted symbolic link (issue 10, part 4)."""

from __future__ import annotations

import os
import stat

import pytest

from harness.qemu.machine import open_log


def test_open_log_appends_privately(tmp_path):
    p = tmp_path / "console.log"
    with open_log(p) as f:
        f.write(b"one\n")
    with open_log(p) as f:
        f.write(b"two\n")
    assert p.read_bytes() == b"one\ntwo\n"
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600


def test_open_log_refuses_a_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    link = tmp_path / "tgtd.log"
    link.symlink_to(victim)
    with pytest.raises(OSError):
        open_log(link)
    assert victim.read_bytes() == b"keep"
