"""Does replay predict real resets? Figures from real killed trials, each compared with its own replay.

Every killed trial (:func:`harness.trial.run_trial`) already replays its own
cut trace at its own kill time and records ``agree`` or ``disagree`` with the
real outcome. This module turns those rows into the figures ``make fidelity``
and ``make regress`` print: counts, the agreement rate with a 95 % Wilson
score interval, per device model and per plan, and every disagreement with
the trace that replays it. Pure functions of result rows: unit-tested
without a VM.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from harness.report import Row

__all__ = ["wilson_interval", "killed_rows", "fidelity_summary"]


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """95 % Wilson score interval for ``k`` successes in ``n`` trials; None when ``n`` is 0.

    Why Wilson and not p +- z*sqrt(p(1-p)/n): with agreement near 100 % the
    normal approximation gives an interval of width zero (or above 1); the
    Wilson interval stays inside [0, 1] and is honest about small ``n``.
    """
    if n <= 0:
        return None
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def killed_rows(rows: Iterable[Row]) -> list[Row]:
    """Real trials from the killed-trial loop (each followed by a VM reset); reference runs excluded."""
    return [r for r in rows if r.source == "real" and r.trial >= 0]


def _block(rs: list[Row]) -> dict[str, object]:
    agree = sum(1 for r in rs if r.agreement == "agree")
    disagree = sum(1 for r in rs if r.agreement == "disagree")
    ci = wilson_interval(agree, agree + disagree)
    return {
        "real_resets": len(rs),
        "killed_before_end": sum(1 for r in rs if r.kind == "killed"),
        "agree": agree,
        "disagree": disagree,
        "agreement_rate": round(agree / (agree + disagree), 5) if agree + disagree else None,
        "agreement_95ci": [round(ci[0], 5), round(ci[1], 5)] if ci else None,
        "false_accepts": sum(r.false_accept for r in rs),
        "committed_layers_lost": sum(r.committed_lost for r in rs),
    }


def fidelity_summary(rows: Iterable[Row]) -> dict[str, object]:
    """Totals, per model and per plan, and the disagreements (each with its trace and reset time)."""
    ks = killed_rows(rows)
    out = _block(ks)
    out["per_model"] = {m: _block([r for r in ks if r.device_model == m]) for m in sorted({r.device_model for r in ks})}
    out["per_plan"] = {p: _block([r for r in ks if r.plan == p]) for p in sorted({r.plan for r in ks})}
    out["disagreements"] = [
        {
            "scenario": r.scenario,
            "device_model": r.device_model,
            "plan": r.plan,
            "trial": r.trial,
            "reset_ms": r.t_ms,
            "statuses": r.statuses,
            "trace": r.trace,
            "why": r.reasons,
        }
        for r in ks
        if r.agreement == "disagree"
    ]
    return out
