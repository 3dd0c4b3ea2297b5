"""Results of a scenario: rows, summary, the survivable-layers curve, the table.

Everything here is a pure function of result rows (plus the durable times the
traces gave), so it is unit-tested without a VM. The output layout::

    results/<scenario>/<UTC timestamp>/
        trials.csv     one row per real trial or replayed crash state
        summary.json   the figures (keys listed in SUMMARY_KEYS)
        report.md      the table, the curve, disagreements and failures
        curve.png      layers recovered vs reset time, one panel per device model
        sample/        recovery output of the last real trial with every layer complete
    results/<scenario>/latest -> <UTC timestamp>
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

__all__ = [
    "Row",
    "summarize",
    "percentiles",
    "write_csv",
    "read_csv",
    "write_summary",
    "plot_curve",
    "format_table",
    "format_event_table",
    "event_summary",
    "write_report_md",
    "new_results_dir",
    "SUMMARY_KEYS",
]

#: resets earlier than this are drawn here (seconds; the axis is linear from 0)
XMIN_S = 0.0

SUMMARY_KEYS = (
    "scenario",
    "guest",
    "device_model",
    "real_trials",
    "replayed_states",
    "false_accepts",
    "committed_layers_lost",
    "layer_durable_ms",
    "layer_durable_after_event_ms",
    "layer_durable_after_event_plan",
    "event_dumps",
    "plans",
    "agreement",
)


@dataclass
class Row:
    """One real trial or one replayed crash state (a line of trials.csv).

    ``t_ms`` is the reset time in milliseconds since the writer opened the
    device (the trace's time 0). ``statuses`` is the reader's per-layer claim
    joined by ``/`` (``complete-unverified`` when scoring disagreed).
    ``kind``, ``seed`` and ``trace`` are what replays the row exactly:
    ``python -m harness.crashsim replay TRACE --base BASE --t T_S --kind K --seed S``.
    """

    scenario: str
    guest: str
    device_model: str
    plan: str
    source: str  # real | replay
    trial: int  # real trial number (replays: the trial whose trace they replay, -1 for references)
    index: int  # state index in the enumeration (-1 for real trials)
    kind: str  # real: killed | complete ; replay: prefix | random | torn | model
    seed: int
    t_ms: float
    layers_total: int
    layers_recovered: int
    statuses: str
    committed: int  # layers whose commit was durable by t (per the trace)
    committed_lost: int
    false_accept: int
    bytes_recovered: int
    verified: str  # full | records | none : how deep content was checked
    agreement: str = ""  # real trials: agree | disagree | n/a
    trace: str = ""
    reasons: str = ""
    #: the state's exact time in seconds (t_ms is for people; replay from this)
    t_s: float = 0.0


def percentiles(values: Iterable[float]) -> dict[str, float | None]:
    """p50, p95 and max by nearest rank (no interpolation: every figure is a measured one)."""
    v = sorted(x for x in values if x is not None and not math.isnan(x))
    if not v:
        return {"p50": None, "p95": None, "max": None, "n": 0}

    def rank(p: float) -> float:
        return v[max(0, math.ceil(p * len(v)) - 1)]

    return {"p50": round(rank(0.50), 3), "p95": round(rank(0.95), 3), "max": round(v[-1], 3), "n": len(v)}


def _counts(rs: list[Row]) -> dict[str, object]:
    """Trial counts, false accepts, committed layers lost and agreement over ``rs``."""
    real = [r for r in rs if r.source == "real"]
    return {
        "real_trials": len(real),
        "replayed_states": sum(1 for r in rs if r.source == "replay"),
        "false_accepts": sum(r.false_accept for r in rs),
        "committed_layers_lost": sum(r.committed_lost for r in rs),
        "agreement": {
            "agree": sum(1 for r in real if r.agreement == "agree"),
            "disagree": sum(1 for r in real if r.agreement == "disagree"),
        },
    }


def _merge_models(
    src: dict[str, dict[str, dict[str, list[float]]]], models: list[str]
) -> dict[str, dict[str, list[float]]]:
    """``src[model][plan][layer]`` times pooled over ``models``: ``[plan][layer]``."""
    merged: dict[str, dict[str, list[float]]] = {}
    for m in models:
        for plan, d in src.get(m, {}).items():
            for k, v in d.items():
                merged.setdefault(plan, {}).setdefault(k, []).extend(v)
    return merged


def summarize(
    rows: list[Row],
    *,
    scenario: str,
    guest: str,
    plans: dict[str, list[str]],
    durable_ms: dict[str, dict[str, dict[str, list[float]]]],
    durable_after_event_cli_ms: dict[str, dict[str, dict[str, list[float]]]] | None = None,
    event_ms: dict[str, dict[str, list[float]]] | None = None,
    event_plan: tuple[str, list[str]] | None = None,
    events: list[dict[str, object]] | None = None,
    extra: dict[str, object] | None = None,
) -> dict[str, object]:
    """summary.json: totals over all device models, plus ``per_model`` and ``plans`` breakdowns.

    ``plans`` maps each plan the scenario ran to its layer names, in order;
    ``durable_ms[model][plan][layer name]`` lists the times (ms since the
    writer opened the device) at which that layer became durable, one per
    trace that got that far. Every figure is keyed by (plan, layer index,
    layer name): ``plans[plan]["layers"]`` is a list of ``{"index", "name",
    "durable_ms", "durable_after_event_cli_ms"}``; the latter counts the same
    trial dumps from the panic event (QEMU's GUEST_PANICKED timestamp), so it
    includes the ELF save and the ``progdump write`` process start.
    ``layer_durable_ms`` repeats the first plan's layers by name (the
    scenario's headline plan; baselines compare it).

    ``layer_durable_after_event_ms`` is the event dumps' figure (a writer
    armed before the panic, :mod:`harness.eventdump`): ``event_ms[model][layer
    name]`` ms from the controller's reception of GUEST_PANICKED to the
    layer's commit being durable, for the plan ``event_plan = (name, layer
    names)``; ``{}`` when the scenario made no event dumps. ``events`` (one
    dict per event dump) adds ``event_dumps`` with the hand-over figures and
    the layer-0-alone checks.
    """
    cli = durable_after_event_cli_ms or {}
    evm = event_ms or {}
    ev_names = event_plan[1] if event_plan else []
    models = sorted({r.device_model for r in rows} | set(durable_ms))
    first = next(iter(plans), None)

    def block(
        rs: list[Row],
        dur: dict[str, dict[str, list[float]]],
        aft: dict[str, dict[str, list[float]]],
        ev: dict[str, list[float]],
    ) -> dict[str, object]:
        out = _counts(rs)
        by_plan: dict[str, object] = {}
        for plan, names in plans.items():
            d, a = dur.get(plan, {}), aft.get(plan, {})
            pb = _counts([r for r in rs if r.plan == plan])
            pb["layers"] = [
                {
                    "index": i,
                    "name": n,
                    "durable_ms": percentiles(d.get(n, [])),
                    "durable_after_event_cli_ms": percentiles(a.get(n, [])),
                }
                for i, n in enumerate(names)
            ]
            by_plan[plan] = pb
        out["plans"] = by_plan
        head = plans.get(first, []) if first else []
        out["layer_durable_ms"] = {n: percentiles(dur.get(first, {}).get(n, [])) for n in head}
        out["layer_durable_after_event_ms"] = {n: percentiles(ev.get(n, [])) for n in ev_names if ev}
        return out

    ev_all: dict[str, list[float]] = {}
    for m in sorted(evm):
        for k, v in evm[m].items():
            ev_all.setdefault(k, []).extend(v)
    per_model = {
        m: block([r for r in rows if r.device_model == m], durable_ms.get(m, {}), cli.get(m, {}), evm.get(m, {}))
        for m in models
    }
    top: dict[str, object] = {"scenario": scenario, "guest": guest, "device_model": ",".join(models)}
    top.update(block(rows, _merge_models(durable_ms, models), _merge_models(cli, models), ev_all))
    top["layer_durable_after_event_plan"] = event_plan[0] if event_plan and evm else None
    top["plan_names"] = list(plans)
    top["device_models"] = models
    top["per_model"] = per_model
    top["event_dumps"] = event_summary(events or [], ev_names) if events else None
    if extra:
        top.update(extra)
    return top


def event_summary(events: list[dict[str, object]], names: list[str]) -> dict[str, object]:
    """The ``event_dumps`` block: per device model, how the time from the event to layer 0 splits, and the checks.

    ``handoff_go_sent_ms``: event received -> go line written (stop, registers);
    ``go_read_after_event_ms``: event received -> the writer read the go line;
    ``go_to_layer0_ms``: go read -> layer 0 durable (the writer);
    ``event_delivery_ms``: QEMU's event timestamp -> its reception (CLOCK_REALTIME both).
    """
    out: dict[str, object] = {}
    for m in sorted({str(e["model"]) for e in events}):
        es = [e for e in events if e["model"] == m]
        l0 = [e.get("layer0_alone") or {} for e in es]
        out[m] = {
            "n": len(es),
            "plan": es[0].get("plan"),
            "layer0_after_event_ms": percentiles(
                float(e["durable_after_event_ms"][names[0]])  # type: ignore[index]
                for e in es
                if names and names[0] in (e.get("durable_after_event_ms") or {})  # type: ignore[operator]
            ),
            "handoff_go_sent_ms": percentiles(float(e["handoff_ms"]["go_sent"]) for e in es if e.get("handoff_ms")),  # type: ignore[index]
            "go_read_after_event_ms": percentiles(float(e["go_read_after_event_ms"]) for e in es),  # type: ignore[arg-type]
            "go_to_layer0_ms": percentiles(
                float(e["go_to_layer_ms"]["0"])  # type: ignore[index]
                for e in es
                if "0" in (e.get("go_to_layer_ms") or {})  # type: ignore[operator]
            ),
            "event_delivery_ms": percentiles(float(e["event_delivery_ms"]) for e in es),  # type: ignore[arg-type]
            "layer0_alone": {
                "checked": len(l0),
                "ok": sum(1 for c in l0 if c.get("ok")),
                "problems": [p for c in l0 for p in (c.get("problems") or [])][:20],  # type: ignore[union-attr]
            },
            "full_check": next((e["full_check"] for e in es if "full_check" in e), None),
        }
    return out


def write_csv(rows: list[Row], path: str | os.PathLike[str]) -> None:
    names = [f.name for f in fields(Row)]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))


def read_csv(path: str | os.PathLike[str]) -> list[Row]:
    types = {f.name: f.type for f in fields(Row)}
    out = []
    with open(path, newline="") as f:
        for d in csv.DictReader(f):
            kw = {}
            for k, v in d.items():
                t = types.get(k)
                kw[k] = int(v) if t in (int, "int") else float(v) if t in (float, "float") else v
            out.append(Row(**kw))
    return out


def write_summary(summary: dict[str, object], path: str | os.PathLike[str]) -> None:
    Path(path).write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")


def _staircase(durable: dict[str, list[float]], names: list[str]) -> tuple[list[float], list[float]]:
    """Median durable time per layer as a step function: x in seconds, y the share of the plan's layers.

    The median is the table's p50 (:func:`percentiles`, nearest rank), so the curve's steps and
    the table's figures are the same measured values.
    """
    xs, ys = [0.0], [0.0]
    for i, name in enumerate(names):
        p50 = percentiles(durable.get(name, []))["p50"]
        if p50 is None:
            break
        xs.append(p50 / 1e3)
        ys.append((i + 1) / len(names))
    return xs, ys


#: line colours and real-trial markers, given to plans in the order the scenario lists them
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
_MARKERS = ("o", "X", "s", "D", "^", "v")


def plot_curve(
    rows: list[Row],
    durable_ms: dict[str, dict[str, dict[str, list[float]]]],
    plans: dict[str, list[str]],
    path: str | os.PathLike[str],
    title: str,
) -> None:
    """curve.png: share of each plan's layers recovered vs reset time, a line per plan, a panel per model.

    Plans have different numbers of layers, so the y axis is the share of a
    plan's own layers recovered and verified (a one-layer plan jumps from
    nothing to everything); each step is labelled with the layer that
    became durable there. Replayed crash states are small dots, real trials
    large markers; the step lines are the median durable time of each layer.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r.device_model for r in rows} | set(durable_ms))
    n = max(1, len(models))
    fig, axes = plt.subplots(1, n, figsize=(max(10.0, 6.2 * n + 0.8), 5.4), squeeze=False, sharey=True)
    k = len(plans)
    for ax, model in zip(axes[0], models):
        rs = [r for r in rows if r.device_model == model]
        xmax = max([r.t_ms / 1e3 for r in rs if r.kind != "complete"] + [0.001])
        for j, (plan, names) in enumerate(plans.items()):
            color, marker = _COLORS[j % len(_COLORS)], _MARKERS[j % len(_MARKERS)]
            off = 0.012 * (j - (k - 1) / 2)  # plans side by side, not on top of each other
            pr = [r for r in rs if r.plan == plan]
            rep = [r for r in pr if r.source == "replay"]
            if rep:
                ax.scatter(
                    [max(XMIN_S, r.t_ms / 1e3) for r in rep],
                    [r.layers_recovered / max(1, r.layers_total) + off for r in rep],
                    s=6,
                    alpha=0.25,
                    color=color,
                    linewidths=0,
                    label=f"{plan}: replayed crash states",
                )
            real = [r for r in pr if r.source == "real" and r.kind != "complete"]
            if real:
                ax.scatter(
                    [max(XMIN_S, r.t_ms / 1e3) for r in real],
                    [r.layers_recovered / max(1, r.layers_total) + off for r in real],
                    s=60,
                    marker=marker,
                    facecolors=color,
                    edgecolors="black",
                    linewidths=0.8,
                    zorder=5,
                    label=f"{plan}: real resets (SIGKILL + system_reset)",
                )
            xs, ys = _staircase(durable_ms.get(model, {}).get(plan, {}), names)
            xs = [max(XMIN_S, x) for x in xs]
            if len(xs) > 1:
                xs2 = xs + [max(xmax, xs[-1]) * 1.05]
                ys2 = ys + [ys[-1]]
                what = "median durable time of each layer" if len(names) > 1 else "one layer, durable at the end"
                ax.step(xs2, ys2, where="post", color=color, linewidth=2, label=f"{plan}: {what}")
                for x, y, nm in zip(xs[1:], ys[1:], names):
                    ax.annotate(nm, (x, y), textcoords="offset points", xytext=(3, 3 - 11 * j), fontsize=7, color=color)
            xmax = max(xmax, xs[-1] * 1.05)
        ax.set_xlim(0, xmax * 1.04)
        n_real = sum(1 for r in rs if r.source == "real" and r.kind != "complete")
        n_rep = sum(1 for r in rs if r.source == "replay")
        ax.set_title(f"{model}: {n_real} real resets, {n_rep} replayed states", fontsize=10)
        ax.set_xlabel("reset time after the writer opened the dump device (s)")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(-0.05, 1.1)
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.set_yticklabels(["nothing", "25 %", "50 %", "75 %", "all layers"])
    axes[0][0].set_ylabel("share of the plan's layers recovered and verified")
    for ax in axes[0]:
        ax.axhline(0, color="grey", linewidth=0.5)
    handles, labels = axes[0][0].get_legend_handles_labels()
    seen = set(labels)
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in seen:
                seen.add(lab)
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, framealpha=0.9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}" if v < 1000 else f"{v:.0f}"
    return str(v)


def format_table(summary: dict[str, object], plans: dict[str, list[str]]) -> str:
    """The short table printed at the end of a run: one line per (device model, plan).

    Layer cells are ``name p50/max`` in ms since the writer opened the
    device, then ``cli-ev p50``: the same dumps counted from the panic event
    (they include the ELF save and the writer's process start). When the
    scenario made event dumps, a second table follows (:func:`format_event_table`).
    """
    per = summary.get("per_model", {})
    width = max((len(v) for v in plans.values()), default=0)
    head = ["model", "plan", "real", "replayed", "false acc", "lost", "agree"] + [
        f"L{i} p50/max ms" for i in range(width)
    ]
    lines = [head]
    for m, b in per.items():  # type: ignore[union-attr]
        for plan in plans:
            pb = b.get("plans", {}).get(plan)
            if pb is None:
                continue
            ag = pb["agreement"]
            cells = [
                m,
                plan,
                str(pb["real_trials"]),
                str(pb["replayed_states"]),
                str(pb["false_accepts"]),
                str(pb["committed_layers_lost"]),
                f"{ag['agree']}/{ag['agree'] + ag['disagree']}",
            ]
            for lay in pb["layers"]:
                d = lay["durable_ms"]
                ev = (lay.get("durable_after_event_cli_ms") or {}).get("p50")
                cells.append(
                    f"{lay['name']} {_fmt(d.get('p50'))}/{_fmt(d.get('max'))}"
                    + (f" cli-ev {_fmt(ev)}" if ev is not None else "")
                )
            cells += [""] * (len(head) - len(cells))
            lines.append(cells)
    out = _columns(lines)
    ev_table = format_event_table(summary)
    return out + ("\n\n" + ev_table if ev_table else "")


def _columns(lines: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    out = []
    for j, r in enumerate(lines):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_event_table(summary: dict[str, object]) -> str:
    """From the panic event: one line per device model of the event dumps ('' when there were none).

    Layer cells ``name p50/p95`` in ms from the controller's reception of
    GUEST_PANICKED to the layer's commit being durable; then where layer 0's
    time went (p50: go line written, go line read by the writer, writer's
    go to layer 0) and the layer-0-alone checks passed.
    """
    plan = summary.get("layer_durable_after_event_plan")
    per = summary.get("per_model", {})
    evs = summary.get("event_dumps") or {}
    if not plan or not evs:
        return ""
    names: list[str] = []
    for b in per.values():  # type: ignore[union-attr]
        names = names or list((b.get("layer_durable_after_event_ms") or {}).keys())
    head = ["model", "plan", "n"] + [f"L{i} p50/p95 ms from event" for i in range(len(names))]
    head += ["go sent", "go read", "go->L0", "L0 alone ok"]
    lines = [head]
    for m, b in per.items():  # type: ignore[union-attr]
        led = b.get("layer_durable_after_event_ms") or {}
        e = evs.get(m)  # type: ignore[union-attr]
        if not led or e is None:
            continue
        cells = [m, str(plan), str(e["n"])]
        for n in names:
            p = led.get(n) or {}
            cells.append(f"{n} {_fmt(p.get('p50'))}/{_fmt(p.get('p95'))}")
        cells += [
            _fmt(e["handoff_go_sent_ms"]["p50"]),
            _fmt(e["go_read_after_event_ms"]["p50"]),
            _fmt(e["go_to_layer0_ms"]["p50"]),
            f"{e['layer0_alone']['ok']}/{e['layer0_alone']['checked']}",
        ]
        lines.append(cells)
    if len(lines) == 1:
        return ""
    return "from the panic event (writer armed before the panic; ms from GUEST_PANICKED received):\n" + _columns(lines)


def write_report_md(
    path: str | os.PathLike[str],
    summary: dict[str, object],
    rows: list[Row],
    plans: dict[str, list[str]],
    description: str,
    extra_lines: list[str] = (),  # type: ignore[assignment]
) -> None:
    real = [r for r in rows if r.source == "real"]
    bad = [r for r in rows if r.false_accept or r.committed_lost]
    dis = [r for r in real if r.agreement == "disagree"]
    md = [f"# Scenario `{summary['scenario']}`", "", description.strip(), ""]
    md += ["## Summary", "", "```", format_table(summary, plans), "```", ""]
    md += [
        f"- real trials: {summary['real_trials']}, replayed crash states: {summary['replayed_states']}",
        f"- false accepts: {summary['false_accepts']}, committed layers lost: {summary['committed_layers_lost']}",
        f"- agreement (real outcome = replay of its trace at its reset time): "
        f"{summary['agreement']['agree']} agree, {summary['agreement']['disagree']} disagree",  # type: ignore[index]
        "- durable times are ms from the writer opening the device to the flush that made the layer's commit durable;"
        " `cli-ev` is the same moment counted from the panic event (QEMU's GUEST_PANICKED timestamp): it includes"
        " the snapshot's ELF save and the `progdump write` process start (first plan only: the scenario's other"
        " plans dump the same panic after it)",
        "- from the panic event: dumps by a writer armed before the panic (`progdump.resident`), handed the guest's"
        " shared RAM and registers when the controller received GUEST_PANICKED; ms from that reception"
        " (host CLOCK_MONOTONIC) to the completion of the flush that made the layer's commit durable",
        "",
        "![layers recovered vs reset time](curve.png)",
        "",
    ]
    md += list(extra_lines)
    md += [
        "## Real trials",
        "",
        "| model | plan | reset at ms | layers | statuses | committed | lost | false accept | agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in real:
        md.append(
            f"| {r.device_model} | {r.plan} | {'end' if r.kind == 'complete' else f'{r.t_ms:.1f}'} "
            f"| {r.layers_recovered}/{r.layers_total} "
            f"| {r.statuses} | {r.committed} | {r.committed_lost} | {r.false_accept} | {r.agreement} |"
        )
    md.append("")
    if dis:
        md += ["## Disagreements (real vs replay)", ""]
        md += [f"- {r.device_model} {r.plan} trial {r.trial} at {r.t_ms:.1f} ms: {r.reasons}" for r in dis]
        md.append("")
    if bad:
        md += [
            "## Failures (false accepts, committed layers lost)",
            "",
            "Replay one exactly with the command in the row; narrow it with `python -m harness.crashsim narrow ...`.",
            "",
        ]
        for r in bad[:50]:
            md.append(
                f"- {r.source} {r.device_model} {r.plan} kind={r.kind} t={r.t_ms:.3f} ms seed={r.seed} "
                f"trace={r.trace}: {r.reasons}"
            )
        md.append("")
    Path(path).write_text("\n".join(md) + "\n")


def new_results_dir(root: str | os.PathLike[str], scenario: str, stamp: str) -> Path:
    """Create ``root/scenario/stamp`` and point ``root/scenario/latest`` at it."""
    base = Path(root) / scenario
    d = base / stamp
    d.mkdir(parents=True, exist_ok=False)
    latest = base / "latest"
    tmp = base / f".latest.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(stamp)
    os.replace(tmp, latest)
    return d


@dataclass
class Progress:
    """A one-line progress bar on a terminal; plain lines every 10 % elsewhere."""

    label: str
    total: int
    done: int = 0
    _last_pct: int = field(default=-1, repr=False)

    def step(self, n: int = 1, note: str = "") -> None:
        import sys

        self.done += n
        pct = int(100 * self.done / max(1, self.total))
        if sys.stderr.isatty():
            width = 30
            fill = int(width * self.done / max(1, self.total))
            sys.stderr.write(
                f"\r{self.label:<28} [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {note[:40]:<40}"
            )
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif pct // 10 != self._last_pct // 10 or self.done >= self.total:
            sys.stderr.write(f"{self.label}: {self.done}/{self.total} {note}\n")
            sys.stderr.flush()
        self._last_pct = pct
