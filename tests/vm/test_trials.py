"""A small real-trial set end to end: real guest, real panics, killed writer, resets, replay.

Boots the Linux stand-in under QEMU (TCG here), so it is slow (a few minutes);
it skips, saying why, when the guest image or QEMU is missing.
"""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest

from harness.scenario import find_scenario

pytestmark = pytest.mark.vm


def _skip_reason() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not installed"
    try:
        from harness.guests import get_profile

        get_profile("linux").check_image()
    except Exception as e:  # the profile says what is missing
        return f"linux guest image not usable ({e}); run make guest-image"
    try:
        import progdump.cli  # noqa: F401
        import progdump.reader  # noqa: F401
    except ImportError as e:
        return f"progdump writer/reader not importable: {e}"
    return None


def test_small_real_trial_set_end_to_end(tmp_path, monkeypatch):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from harness.trials import run_scenario

    monkeypatch.setenv("PIN", "none")  # do not swap progdump modules under the rest of the test session

    sc = find_scenario("sysrq-three-plans")  # any plan goes through the same trial: three here
    sc.memory_mib = 256
    sc.real = 1
    sc.states = 40
    sc.workload = sc.workload[:3]
    summary = run_scenario(sc, str(tmp_path))
    d = tmp_path / "sysrq-three-plans" / "latest"
    for f in ("trials.csv", "summary.json", "report.md", "curve.png"):
        assert (d / f).exists(), f
    s = json.loads((d / "summary.json").read_text())
    assert s == json.loads(json.dumps(summary))
    # 3 reference runs (one per plan) + 1 killed trial per plan
    assert s["real_trials"] == 6
    assert s["replayed_states"] > 0
    rows = list(csv.DictReader(open(d / "trials.csv")))
    for plan, names in (
        ("progressive", ["panic", "tasks", "kernel", "cache", "all"]),
        ("monolithic", ["all"]),
        ("triage", ["triage", "memory"]),
    ):
        mine = [r for r in rows if r["plan"] == plan]
        assert {r["source"] for r in mine} == {"real", "replay"}, plan
        assert {int(r["layers_total"]) for r in mine} == {len(names)}, plan
        layers = s["plans"][plan]["layers"]
        assert [lay["name"] for lay in layers] == names
        # the reference run made every layer durable, each at its own time
        assert all(lay["durable_ms"]["n"] >= 1 for lay in layers), layers
    table = (d / "report.md").read_text()
    assert any(line.split()[:2] == ["nvme", "triage"] for line in table.splitlines()), table
    assert s["false_accepts"] == 0, (d / "report.md").read_text()
    assert s["committed_layers_lost"] == 0, (d / "report.md").read_text()
    assert s["agreement"]["agree"] + s["agreement"]["disagree"] >= 1
    assert s["layer_durable_ms"]["panic"]["p50"] is not None
    # the sample is a full recovery: manifest and vmcore
    assert (d / "sample" / "manifest.json").exists() and (d / "sample" / "vmcore").exists()
    assert os.path.islink(tmp_path / "sysrq-three-plans" / "latest")
