"""Fidelity figures from result rows: the Wilson interval by hand, counts, disagreements listed."""

from __future__ import annotations

import math

import pytest

from harness.fidelity import fidelity_summary, killed_rows, wilson_interval
from harness.report import Row


def _r(model="hdd", plan="progressive", trial=1, agreement="agree", kind="killed", fa=0, lost=0, source="real"):
    return Row(
        "s",
        "linux",
        model,
        plan,
        source,
        trial,
        -1,
        kind,
        1,
        12.5,
        5,
        2,
        "complete/complete/missing",
        2,
        lost,
        fa,
        0,
        "full",
        agreement,
        f"/t/{model}-{trial}.trace",
        "why" if agreement == "disagree" else "",
    )


def test_wilson_interval_matches_a_hand_computation():
    # k=9, n=10, z=1.96: centre = (0.9 + 1.9208/10) / (1 + 3.8416/10) = 1.09208 / 1.38416 = 0.788983
    # half = 1.96 * sqrt(0.009 + 3.8416/400) / 1.38416 = 1.96 * sqrt(0.018604) / 1.38416
    #      = 1.96 * 0.1363965 / 1.38416 = 0.193140
    # i.e. (0.5958, 0.9821), the interval tables give for 9 of 10
    lo, hi = wilson_interval(9, 10, z=1.96)
    assert lo == pytest.approx(0.788983 - 0.193140, abs=1e-5)
    assert hi == pytest.approx(0.788983 + 0.193140, abs=1e-5)
    # all successes: the upper bound is 1, the lower bound n/(n+z^2)
    lo, hi = wilson_interval(200, 200, z=1.96)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(200 / (200 + 1.96**2))
    assert wilson_interval(0, 0) is None
    assert not math.isnan(wilson_interval(0, 5)[0])


def test_only_killed_loop_trials_count_and_disagreements_are_listed():
    rows = [
        _r(trial=-1, kind="complete", agreement="n/a"),  # a reference run: not a reset
        _r(source="replay", trial=-1, agreement=""),  # a replayed state: not a reset
        _r(trial=1),
        _r(trial=2, kind="complete"),
        _r(model="nvme", trial=3, agreement="disagree"),
        _r(model="nvme", plan="monolithic", trial=4, fa=1, lost=1),
    ]
    assert [r.trial for r in killed_rows(rows)] == [1, 2, 3, 4]
    s = fidelity_summary(rows)
    assert (s["real_resets"], s["killed_before_end"], s["agree"], s["disagree"]) == (4, 3, 3, 1)
    assert s["false_accepts"] == 1 and s["committed_layers_lost"] == 1
    assert s["per_model"]["hdd"]["agree"] == 2 and s["per_model"]["nvme"]["disagree"] == 1
    assert s["per_plan"]["monolithic"]["real_resets"] == 1
    assert s["agreement_rate"] == 0.75
    assert [d["trace"] for d in s["disagreements"]] == ["/t/nvme-3.trace"]
