"""Accelerator choice: overrides and the cached probe verdict (no QEMU is run:
``probe_kvm`` is replaced by a stand-in that records calls, and says so)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import harness.qemu.accel as accel


class FakeProfile:
    name = "fake"

    def image_identity(self) -> str:
        return "fake-image"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    p = tmp_path / "accel-probe.json"
    monkeypatch.setattr(accel, "CACHE", p)
    monkeypatch.delenv("PROGDUMP_ACCEL", raising=False)
    return p


def test_explicit_request_wins(cache: Path) -> None:
    assert accel.choose_accel("tcg", FakeProfile()) == ("tcg", "requested")  # type: ignore[arg-type]
    assert accel.choose_accel("kvm", FakeProfile()) == ("kvm", "requested")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        accel.choose_accel("hvf", FakeProfile())  # type: ignore[arg-type]


def test_env_override(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROGDUMP_ACCEL", "tcg")
    assert accel.choose_accel("auto", FakeProfile()) == ("tcg", "PROGDUMP_ACCEL=tcg")  # type: ignore[arg-type]


def test_no_kvm_device(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel.os, "access", lambda p, m: False)
    assert accel.choose_accel("auto", FakeProfile()) == ("tcg", "no usable /dev/kvm")  # type: ignore[arg-type]


def test_probe_runs_once_then_cached(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(accel.os, "access", lambda p, m: True)
    probe = lambda prof: calls.append(prof) or (False, "stand-in: failed")  # noqa: E731
    a, why = accel.choose_accel("auto", FakeProfile(), probe)  # type: ignore[arg-type]
    assert (a, why) == ("tcg", "stand-in: failed")
    a, why = accel.choose_accel("auto", FakeProfile(), probe)  # type: ignore[arg-type]
    assert a == "tcg" and why.startswith("cached probe") and len(calls) == 1
    # a different key (other QEMU / kernel) probes again
    doc = json.loads(cache.read_text())
    doc["key"] = "other"
    cache.write_text(json.dumps(doc))
    probe = lambda prof: calls.append(prof) or (True, "stand-in: ok")  # noqa: E731
    assert accel.choose_accel("auto", FakeProfile(), probe) == ("kvm", "stand-in: ok")  # type: ignore[arg-type]
    assert len(calls) == 2


def test_corrupt_cache_is_ignored(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache.write_text("{not json")
    monkeypatch.setattr(accel.os, "access", lambda p, m: True)
    assert accel.choose_accel("auto", FakeProfile(), lambda prof: (False, "stand-in"))[0] == "tcg"  # type: ignore[arg-type]
