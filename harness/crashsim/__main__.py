"""``python -m harness.crashsim``: look at a trace, replay one crash state exactly, narrow a failure.

    python -m harness.crashsim info TRACE
    python -m harness.crashsim replay TRACE --base IMAGE --t SECONDS --kind KIND --seed SEED [--snapshot ELF --plan PLAN] [--out DIR]
    python -m harness.crashsim narrow TRACE --base IMAGE --t SECONDS --kind KIND --seed SEED [--plan PLAN]

A row of ``trials.csv`` gives TRACE (``trace``), SECONDS (``t_s``), KIND and
SEED; the base image is ``base_image`` in ``summary.json``. ``replay`` prints
the reader's verdict and the judgement; with ``--snapshot`` it also recovers
the state into ``--out`` and scores it against the snapshot. ``narrow``
prints the write that breaks a failing state.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from harness.crashsim.overlay import BaseImage
from harness.crashsim.replay import ReplayContext, evaluate, narrow
from harness.crashsim.states import KINDS, crash_state
from harness.crashsim.trace import TraceError, read_trace
from progdump.elfcore import load_elf_snapshot


def _ctx(a: argparse.Namespace) -> tuple[ReplayContext, object]:
    from progdump.layers.plan import get_plan

    tr = read_trace(a.trace)
    size = os.path.getsize(a.base) if a.base else tr.device_size
    bi = BaseImage(a.base, size)
    names = [s.name for s in get_plan(a.plan)]
    ctx = ReplayContext(tr, bi, names)
    ctx.prepare()
    st = crash_state(tr, a.t, a.kind, a.seed)
    return ctx, st


def add_state_args(p: argparse.ArgumentParser, replay: bool) -> None:
    p.add_argument("trace")
    p.add_argument("--base", help="the device image before the dump (an older dump); zeros if omitted")
    p.add_argument("--t", type=float, required=True, help="reset time, seconds since the device opened (t_s)")
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--plan", default="progressive")
    if replay:
        p.add_argument("--snapshot", help="ELF core of the dumped snapshot: recover and score fully")
        p.add_argument("--out", help="recovery output directory (with --snapshot)")


def run_info(a: argparse.Namespace) -> int:
    tr = read_trace(a.trace)
    print(
        json.dumps(
            {
                "model": tr.model_name,
                "device_size": tr.device_size,
                "sector_size": tr.sector_size,
                "writes": len(tr.writes),
                "failed_writes": len(tr.failed_writes),
                "flushes": len(tr.flushes),
                "bytes": sum(w.length for w in tr.writes),
                "destaged_writes": len(tr.destages),
                "marks": [(m.label, round(m.t_complete * 1e3, 3)) for m in tr.marks],
                "end_ms": round(tr.end_time * 1e3, 3),
                "closed": tr.closed,
                "truncated": tr.truncated,
            },
            indent=2,
        )
    )
    return 0


def run_replay(a: argparse.Namespace) -> int:
    ctx, st = _ctx(a)
    r = evaluate(ctx, st)
    print(st.describe())
    print(
        json.dumps(
            {
                "dump_id": r.outcome.dump_id,
                "statuses": r.statuses,
                "layers_recovered": r.layers_recovered,
                "committed": r.committed,
                "committed_lost": r.committed_lost,
                "false_accept": r.false_accept,
                "reasons": r.reasons,
            },
            indent=2,
        )
    )
    if a.snapshot:
        from harness.crashsim.overlay import OverlaySource
        from harness.scoring import expected_layers, score_recovery
        from progdump import reader
        from progdump.export import export

        out = a.out or "replay-recovered"
        export(reader.scan(OverlaySource(ctx.base, ctx.trace, st)), out)
        with load_elf_snapshot(a.snapshot) as snap:
            s = score_recovery(out, snap, expected_layers(snap, a.plan))
        print(
            json.dumps(
                {"recovered_to": out, "scored": s.statuses(), "false_accept": s.false_accept, "reasons": s.reasons},
                indent=2,
            )
        )
        if s.false_accept:
            return 1
    return 1 if (r.false_accept or r.committed_lost) else 0


def run_narrow(a: argparse.Namespace) -> int:
    ctx, st = _ctx(a)
    print(st.describe())
    print(json.dumps(narrow(ctx, st), indent=2, default=str))
    return 0


def guard_errors(fn):  # type: ignore[no-untyped-def]
    def run(a: argparse.Namespace) -> int:
        try:
            return fn(a)
        except (TraceError, ValueError, OSError) as e:
            print(f"crashsim: {e}", file=sys.stderr)
            return 1

    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.crashsim")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="summarise a trace").add_argument("trace")
    add_state_args(sub.add_parser("replay", help="replay one crash state exactly"), True)
    add_state_args(sub.add_parser("narrow", help="narrow a failing state to the write that breaks it"), False)
    a = ap.parse_args(argv)
    return guard_errors({"info": run_info, "replay": run_replay, "narrow": run_narrow}[a.cmd])(a)


if __name__ == "__main__":
    sys.exit(main())
