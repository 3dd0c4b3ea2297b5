"""Scenario files load and validate; env overrides; the regression comparison."""

from __future__ import annotations

import dataclasses

import pytest

from harness.scenario import ScenarioError, compare, list_scenarios, load_scenario, main


def test_every_shipped_scenario_loads_and_the_required_ones_exist():
    names = {s.name for s in list_scenarios()}
    assert {"sysrq-panic", "oops-under-load", "slow-dump-device", "dump-device-errors"} <= names
    for s in list_scenarios():
        assert s.device_models and s.plans and s.memory_mib >= 64 and s.workload
    assert any(s.ci for s in list_scenarios())


def test_env_overrides_counts():
    s = load_scenario("scenarios/sysrq-panic.toml")
    s2 = s.with_env({"TRIALS": "7", "STATES": "1000"})
    assert (s2.real, s2.states) == (7, 1000) and (s.real, s.states) != (7, 1000)
    with pytest.raises(ScenarioError, match="TRIALS"):
        s.with_env({"TRIALS": "-1"})


def test_bad_scenarios_are_clear_errors(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text('guest = "linux"\nmemory_mib = 512\ntrigger = "sysrq"\ndevice_models = ["floppy"]\n')
    with pytest.raises(ScenarioError, match="unknown device model 'floppy'"):
        load_scenario(p)
    p.write_text('guest = "linux"\nmemory_mib = "lots"\n')
    with pytest.raises(ScenarioError):
        load_scenario(p)
    p.write_text("gust = 1\n")
    with pytest.raises(ScenarioError, match="unknown keys gust"):
        load_scenario(p)
    p.write_text("[[[")
    with pytest.raises(ScenarioError, match="x.toml"):
        load_scenario(p)


def _summary(fa=0, lost=0, p95=10.0, model="hdd"):
    return {
        "false_accepts": fa,
        "committed_layers_lost": lost,
        "real_trials": 3,
        "replayed_states": 100,
        "agreement": {"agree": 3, "disagree": 0},
        "per_model": {model: {"layer_durable_ms": {"panic": {"p50": p95, "p95": p95, "max": p95}}}},
    }


def test_compare_passes_within_tolerance_and_fails_on_each_rule():
    base = _summary(p95=100.0)
    ok, lines = compare(_summary(p95=190.0), base)
    assert ok and any("tolerance" in ln for ln in lines)
    assert not compare(_summary(fa=1), base)[0]
    assert not compare(_summary(lost=2), base)[0]
    big = _summary(p95=1000.0)
    assert compare(_summary(p95=1900.0), big)[0] and not compare(_summary(p95=2100.0), big)[0]
    # the absolute margin: small times may jitter by hundreds of ms under CPU contention
    assert compare(_summary(p95=9.0 + 390.0), _summary(p95=9.0))[0]
    assert not compare(_summary(p95=9.0 + 420.0), _summary(p95=9.0))[0]


def test_list_command_prints_one_line_per_scenario(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == len(list_scenarios()) and out[0].split()[0]


def test_unknown_scenario_name(capsys):
    assert main(["run", "no-such-thing"]) == 1
    assert "no scenario 'no-such-thing'" in capsys.readouterr().err


def test_setup_names_a_registered_class_and_unknown_names_are_errors(tmp_path):
    from harness.scenario import resolve_setup
    from harness.setups import ScenarioSetup, register_setup

    assert resolve_setup(None) is None
    with pytest.raises(ScenarioError, match="unknown setup 'nope'"):
        resolve_setup("nope")

    @register_setup("unit-test-setup")
    class _Probe(ScenarioSetup):  # a test-only setup: registry plumbing, no host side
        pass

    assert resolve_setup("unit-test-setup") is _Probe
    p = tmp_path / "s.toml"
    p.write_text(
        'guest="linux"\nmemory_mib=256\ntrigger="sysrq"\ndevice_models=["hdd"]\nsetup="no-such-setup"\n[workload]\ncommands=["true"]\n'
    )
    with pytest.raises(ScenarioError, match="unknown setup 'no-such-setup'"):
        load_scenario(p)
    p.write_text(
        'guest="linux"\nmemory_mib=256\ntrigger="sysrq"\ndevice_models=["hdd"]\nsetup="unit-test-setup"\n'
        '[setup_params]\nluns=3\n[workload]\ncommands=["true"]\n'
    )
    sc = load_scenario(p)
    assert sc.setup == "unit-test-setup" and sc.setup_params == {"luns": 3}
    p.write_text(
        'guest="linux"\nmemory_mib=256\ntrigger="sysrq"\ndevice_models=["hdd"]\nsetup_params=3\n[workload]\ncommands=["true"]\n'
    )
    with pytest.raises(ScenarioError, match="setup_params"):
        load_scenario(p)


def test_regress_totals_add_up_scenarios_and_count_only_killed_trials():
    from harness.report import Row
    from harness.scenario import regress_totals

    def row(trial, agreement, source="real"):
        return Row(
            "a",
            "linux",
            "hdd",
            "progressive",
            source,
            trial,
            -1,
            "killed",
            1,
            5.0,
            5,
            1,
            "complete",
            1,
            0,
            0,
            0,
            "full",
            agreement,
            "/t",
            "",
        )

    summaries = {
        "a": {"replayed_states": 300, "real_trials": 3, "false_accepts": 0, "committed_layers_lost": 0},
        "b": {"replayed_states": 200, "real_trials": 2, "false_accepts": 0, "committed_layers_lost": 0},
    }
    rows = [row(-1, "n/a"), row(1, "agree"), row(2, "disagree"), row(-1, "", source="replay")]
    t = regress_totals(summaries, rows)
    assert t["scenarios"] == ["a", "b"] and t["replayed_states"] == 500 and t["real_trials"] == 5
    assert t["real_resets"] == 2 and t["agreement"] == {"agree": 1, "disagree": 1}
    assert len(t["disagreements"]) == 1


def test_event_dump_options_are_checked_and_overridable(tmp_path):
    from harness.trials import event_models

    p = tmp_path / "e.toml"
    head = 'guest = "linux"\nmemory_mib = 256\ntrigger = "sysrq"\ndevice_models = ["hdd", "nvme"]\n[trials]\n'
    p.write_text(head + 'event_dumps = 3\nevent_models = ["nvme"]\n')
    s = load_scenario(p)
    assert (s.event_dumps, s.event_plan, event_models(s)) == (3, "progressive-raw", ["nvme"])
    assert s.with_env({"EVENTS": "0"}).event_dumps == 0 and event_models(s.with_env({"EVENTS": "0"})) == []
    p.write_text(head + "event_dumps = 2\n")
    assert event_models(load_scenario(p)) == ["hdd", "nvme"]  # none listed: every model
    for bad, why in (
        ("event_dumps = -1\n", "event_dumps"),
        ("event_dumps = true\n", "event_dumps"),
        ('event_plan = "nope"\n', "event_plan"),
        ('event_models = ["sata-ssd"]\n', "event_models"),
    ):
        p.write_text(head + bad)
        with pytest.raises(ScenarioError, match=why):
            load_scenario(p)
    p.write_text(head.replace("[trials]\n", 'setup = "iscsi"\n[trials]\n') + "event_dumps = 1\n")
    with pytest.raises(ScenarioError, match="without a setup"):
        load_scenario(p)


def test_compare_fails_when_an_event_dumps_layer_0_alone_missed_the_console():
    from harness.scenario import compare

    def ev(ok, checked=10, full="complete/complete", rec=2):
        s = _summary()
        s["event_dumps"] = {
            "nvme": {"layer0_after_event_ms": {"p95": 12.0, "n": checked},
                     "layer0_alone": {"ok": ok, "checked": checked},
                     "full_check": {"statuses": full, "layers_recovered": rec, "false_accept": False}},
        }  # fmt: skip
        return s

    assert compare(ev(10), _summary())[0]
    ok, lines = compare(ev(9), _summary())
    assert not ok and any("layer 0 alone" in ln and "FAIL" in ln for ln in lines)
    assert not compare(ev(0, checked=0), _summary())[0]  # nothing checked proves nothing
    assert not compare(ev(10, full="complete/partial", rec=1), _summary())[0]


def test_every_shipped_scenarios_trigger_is_its_guests_or_its_setups(monkeypatch):
    """iscsi-hang's ``stall`` is performed by its setup, not the guest profile.

    The setups' own ``check()`` (root, tgtd, the guest image's pieces) is
    replaced by a no-op here: this test is about which triggers are accepted,
    and runs without the host tools; the VM tests exercise the real check.
    """
    from harness.guests import get_profile
    from harness.scenario import precheck_setup
    from harness.setups import get_setup

    for s in list_scenarios():
        if s.setup:
            monkeypatch.setattr(get_setup(s.setup), "check", lambda self: None)
        precheck_setup(s, get_profile(s.guest).triggers)  # raises on a refused trigger
    hang = load_scenario("scenarios/iscsi-hang.toml")
    assert hang.trigger == "stall" and "stall" not in get_profile("linux").triggers
    with pytest.raises(ScenarioError, match=r"trigger 'stall' is not one of guest linux's \("):
        precheck_setup(dataclasses.replace(load_scenario("scenarios/sysrq-panic.toml"), trigger="stall"), ("sysrq",))


def test_a_missing_setup_piece_stops_the_run_before_anything_is_made(tmp_path, monkeypatch, capsys):
    """A setup whose check() names a missing tool stops ``run`` in one line: no results dir,
    no work dir, the runner never called. The setup is a test-only class (registry plumbing)."""
    import harness.scenario as scenario_mod
    import harness.trials as trials_mod
    from harness.errors import MissingTool
    from harness.setups import ScenarioSetup, register_setup

    started = []

    @register_setup("unit-test-missing")
    class _Missing(ScenarioSetup):
        def check(self) -> None:
            raise MissingTool("tgtd not found (Debian package tgt)")

        def start(self):  # pragma: no cover - must never run
            started.append(1)
            raise AssertionError("start() after a failed check")

    (tmp_path / "scen").mkdir()
    (tmp_path / "scen" / "needs-tgt.toml").write_text(
        'guest="linux"\nmemory_mib=256\ntrigger="sysrq"\ndevice_models=["hdd"]\nsetup="unit-test-missing"\n'
        '[workload]\ncommands=["true"]\n'
    )
    monkeypatch.setattr(scenario_mod, "find_scenario", lambda name: load_scenario(tmp_path / "scen" / f"{name}.toml"))
    monkeypatch.setattr(trials_mod, "run_scenario", lambda *a, **k: started.append(2) or {})
    monkeypatch.setenv("RESULTS", str(tmp_path / "results"))
    rc = main(["run", "needs-tgt"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and not started
    assert len(err) == 1 and "tgtd not found (Debian package tgt)" in err[0], err
    assert not (tmp_path / "results").exists()


def test_sigterm_unwinds_the_run_like_ctrl_c(tmp_path):
    """A killed runner (kill, a CI timeout) still runs its cleanup: the handler turns SIGTERM into SystemExit."""
    import signal
    import subprocess
    import sys

    code = (
        "import contextlib, signal, sys, time\n"
        "from harness.scenario import unwind_on_sigterm\n"
        "signal.signal(signal.SIGTERM, unwind_on_sigterm)\n"
        "with contextlib.ExitStack() as st:\n"
        "    st.callback(lambda: print('cleaned up', flush=True))\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=30)
    assert out.strip() == "cleaned up" and p.returncode == 128 + signal.SIGTERM
