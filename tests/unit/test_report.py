"""Report: summary keys and figures, CSV round trip, table, curve, results layout."""

from __future__ import annotations

import json

from harness.report import (
    SUMMARY_KEYS,
    Row,
    format_table,
    new_results_dir,
    percentiles,
    plot_curve,
    read_csv,
    summarize,
    write_csv,
    write_report_md,
)

NAMES = ["panic", "tasks", "kernel", "cache", "all"]
PLANS = {"progressive": NAMES, "monolithic": ["all"]}


def _row(model="hdd", plan="progressive", source="replay", t=10.0, rec=2, fa=0, lost=0, agreement="", kind="random"):
    return Row(
        "s",
        "linux",
        model,
        plan,
        source,
        0,
        1,
        kind,
        7,
        t,
        5 if plan == "progressive" else 1,
        rec,
        "complete/complete/missing/missing/missing",
        rec,
        lost,
        fa,
        1000,
        "records",
        agreement,
        "/tmp/tr",
        "",
    )


def test_percentiles_nearest_rank():
    assert percentiles([]) == {"p50": None, "p95": None, "max": None, "n": 0}
    p = percentiles(range(1, 101))
    assert p["p50"] == 50 and p["p95"] == 95 and p["max"] == 100 and p["n"] == 100
    assert percentiles([3.0])["p95"] == 3.0


def test_summary_has_the_issue_keys_and_counts():
    rows = [
        _row(),
        _row(fa=1),
        _row(source="real", agreement="agree", kind="killed"),
        _row(model="nvme", source="real", agreement="disagree", lost=1, kind="killed"),
        _row(model="nvme", plan="monolithic", rec=0),
    ]
    dur = {
        "hdd": {"progressive": {"panic": [3.0, 5.0], "tasks": [40.0]}, "monolithic": {"all": [900.0]}},
        "nvme": {"progressive": {"panic": [1.0]}},
    }
    s = summarize(rows, scenario="s", guest="linux", plans=PLANS, durable_ms=dur)
    for k in SUMMARY_KEYS:
        assert k in s
    assert s["real_trials"] == 2 and s["replayed_states"] == 3
    assert s["false_accepts"] == 1 and s["committed_layers_lost"] == 1
    assert s["agreement"] == {"agree": 1, "disagree": 1}
    assert s["layer_durable_ms"]["panic"]["max"] == 5.0 and s["layer_durable_ms"]["panic"]["n"] == 3
    mono = s["plans"]["monolithic"]["layers"]
    assert mono == [
        {
            "index": 0,
            "name": "all",
            "durable_ms": {"p50": 900.0, "p95": 900.0, "max": 900.0, "n": 1},
            "durable_after_event_cli_ms": {"p50": None, "p95": None, "max": None, "n": 0},
        }
    ]
    assert s["plans"]["progressive"]["layers"][1]["name"] == "tasks"
    assert s["plans"]["progressive"]["layers"][1]["durable_ms"]["p50"] == 40.0
    # per plan counts: 4 progressive rows (2 replayed, 2 real), 1 monolithic replayed row
    assert s["plans"]["progressive"]["real_trials"] == 2 and s["plans"]["monolithic"]["replayed_states"] == 1
    assert s["per_model"]["nvme"]["real_trials"] == 1 and s["device_model"] == "hdd,nvme"
    json.dumps(s)  # serialisable
    t = format_table(s, PLANS)
    assert "hdd" in t and "nvme" in t and "panic 3.0/5.0" in t and "all 900.0/900.0" in t


def test_a_third_plan_gets_its_own_rows_layers_and_table_lines():
    plans = {"progressive": NAMES, "monolithic": ["all"], "two": ["panic", "rest"]}
    rows = [_row(), _row(plan="two", rec=1), _row(plan="two", source="real", kind="killed", agreement="agree")]
    for r in rows:
        if r.plan == "two":
            r.layers_total = 2
    dur = {"hdd": {"progressive": {"panic": [3.0]}, "two": {"panic": [7.0], "rest": [70.0]}}}
    s = summarize(rows, scenario="s", guest="linux", plans=plans, durable_ms=dur)
    two = s["plans"]["two"]
    assert [lay["name"] for lay in two["layers"]] == ["panic", "rest"]
    assert two["layers"][1]["durable_ms"]["p50"] == 70.0 and two["real_trials"] == 1
    # the third plan's times are not mixed into the headline plan's
    assert s["layer_durable_ms"]["panic"]["n"] == 1 and s["layer_durable_ms"]["panic"]["p50"] == 3.0
    table = format_table(s, plans).splitlines()
    assert any(line.split()[:2] == ["hdd", "two"] and "rest 70.0/70.0" in line for line in table)


def test_cli_durable_after_event_is_reported_beside_the_from_open_figure():
    rows = [_row(source="real", kind="complete", agreement="n/a")]
    dur = {"hdd": {"progressive": {"panic": [80.0]}}}
    after = {"hdd": {"progressive": {"panic": [1480.0]}}}
    s = summarize(rows, scenario="s", guest="linux", plans=PLANS, durable_ms=dur, durable_after_event_cli_ms=after)
    lay = s["per_model"]["hdd"]["plans"]["progressive"]["layers"][0]
    assert lay["durable_ms"]["p50"] == 80.0 and lay["durable_after_event_cli_ms"] == {
        "p50": 1480.0,
        "p95": 1480.0,
        "max": 1480.0,
        "n": 1,
    }
    # no event dumps: no from-event figure of a resident writer, no second table
    assert s["layer_durable_after_event_ms"] == {} and s["event_dumps"] is None
    t = format_table(s, PLANS)
    assert "panic 80.0/80.0 cli-ev 1480" in t and "from the panic event" not in t


def test_event_dumps_give_layer_durable_after_event_per_model_and_the_second_table():
    rows = [_row(source="real", kind="complete", agreement="n/a"), _row(model="nvme", source="real", kind="complete")]
    dur = {"hdd": {"progressive": {"panic": [80.0]}}, "nvme": {"progressive": {"panic": [60.0]}}}
    ev_names = ["panic", "tasks"]
    # 20 nvme event dumps: layer 0 at 10..29 ms (nearest rank: p50 = 19, p95 = 28); none on hdd
    ev = {"nvme": {"panic": [10.0 + i for i in range(20)], "tasks": [300.0] * 20}}
    events = [
        {"model": "nvme", "plan": "raw", "durable_after_event_ms": {"panic": 10.0 + i}, "handoff_ms": {"go_sent": 2.0},
         "go_read_after_event_ms": 4.0, "go_to_layer_ms": {"0": 6.0 + i}, "event_delivery_ms": 0.5,
         "layer0_alone": {"ok": i != 3, "problems": ["x"] if i == 3 else []}}
        for i in range(20)
    ]  # fmt: skip
    s = summarize(rows, scenario="s", guest="linux", plans=PLANS, durable_ms=dur, event_ms=ev,
                  event_plan=("raw", ev_names), events=events)  # fmt: skip
    assert s["per_model"]["nvme"]["layer_durable_after_event_ms"]["panic"] == {
        "p50": 19.0, "p95": 28.0, "max": 29.0, "n": 20,
    }  # fmt: skip
    assert s["per_model"]["hdd"]["layer_durable_after_event_ms"] == {}
    assert s["layer_durable_after_event_ms"]["tasks"]["n"] == 20 and s["layer_durable_after_event_plan"] == "raw"
    e = s["event_dumps"]["nvme"]
    assert e["n"] == 20 and e["layer0_alone"] == {"checked": 20, "ok": 19, "problems": ["x"]}
    assert e["go_to_layer0_ms"]["p50"] == 15.0 and e["handoff_go_sent_ms"]["p95"] == 2.0
    t = format_table(s, PLANS)
    line = next(ln for ln in t.splitlines() if ln.startswith("nvme") and "raw" in ln)
    assert "panic 19.0/28.0" in line and "tasks 300.0/300.0" in line and "19/20" in line


def test_csv_round_trip(tmp_path):
    rows = [_row(), _row(source="real", t=1.5, agreement="agree")]
    write_csv(rows, tmp_path / "t.csv")
    assert read_csv(tmp_path / "t.csv") == rows


def test_curve_and_report_files(tmp_path):
    rows = [_row(t=float(i), rec=min(5, i // 20)) for i in range(100)]
    rows += [_row(plan="monolithic", t=float(i), rec=int(i > 90)) for i in range(100)]
    rows += [_row(source="real", t=33.0, rec=1, agreement="agree", kind="killed"), _row(model="nvme", t=2.0)]
    dur = {"hdd": {"progressive": {"panic": [5.0], "tasks": [20.0], "kernel": [40.0]}, "monolithic": {"all": [91.0]}}}
    plot_curve(rows, dur, PLANS, tmp_path / "curve.png", "test")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = summarize(rows, scenario="s", guest="linux", plans=PLANS, durable_ms=dur)
    write_report_md(tmp_path / "report.md", s, rows, PLANS, "desc")
    md = (tmp_path / "report.md").read_text()
    assert "curve.png" in md and "| hdd | progressive | 33.0 |" in md


def test_results_dir_and_latest_symlink(tmp_path):
    d1 = new_results_dir(tmp_path, "x", "20260101T000000Z")
    d2 = new_results_dir(tmp_path, "x", "20260101T000001Z")
    assert d1.is_dir() and d2.is_dir()
    assert (tmp_path / "x" / "latest").resolve() == d2.resolve()


def test_curve_steps_sit_at_the_tables_p50() -> None:
    """Two runs at 100 and 200 ms: nearest-rank p50 is 100 ms (rank ceil(0.5*2) = 1), in the
    table and on the curve alike (the curve once took the upper middle, 200 ms)."""
    from harness.report import _staircase, percentiles

    durable = {"panic": [200.0, 100.0], "all": [300.0, 500.0]}
    assert percentiles(durable["panic"])["p50"] == 100.0
    xs, ys = _staircase(durable, ["panic", "all"])
    assert xs == [0.0, 0.1, 0.3]
    assert ys == [0.0, 0.5, 1.0]
