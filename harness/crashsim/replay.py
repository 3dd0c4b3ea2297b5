"""Replay crash states through the real reader and judge each outcome.

For each state the reader (``progdump.reader.scan``) reads an
:class:`~harness.crashsim.overlay.OverlaySource`: the base image (an older
dump) with the state's writes painted over it. The outcome is judged against
what the trace proves:

* **committed layers lost**: a layer whose commit was durable by ``t``
  (:func:`~harness.crashsim.states.committed_marks`) must come back complete;
* **false accept**: the reader returns a dump that is neither this one nor the
  older one, or claims a layer complete when bytes that layer wrote are not
  on the device as written (a *suspect*, confirmed or cleared by a full
  recovery scored against the snapshot when a verifier is given).

Every result carries ``(t, kind, seed)``, so ``python -m harness.crashsim
replay`` rebuilds the state exactly, and ``narrow`` shrinks a failing state to
the write that breaks it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from harness.crashsim.overlay import BaseImage, OverlaySource
from harness.crashsim.states import CrashState, committed_marks, crash_state
from harness.crashsim.trace import Rec, Trace

__all__ = [
    "Outcome",
    "read_outcome",
    "ReplayContext",
    "StateResult",
    "evaluate",
    "narrow",
    "mark_layer",
    "hole_excused",
]


@dataclass
class Outcome:
    """What the reader made of a device: the dump it picked and each layer's status."""

    found: bool
    dump_id: str | None
    statuses: dict[int, str]  # layer index -> complete | partial | missing
    error: str = ""
    #: layer index -> offsets of the failed writes the reader reports for it (its commit's hole report, R-WR-7)
    holes: dict[int, list[int]] = field(default_factory=dict)


def read_outcome(source: object) -> Outcome:
    """Run ``progdump.reader.scan`` on ``source`` (``.size``/``.pread``) and summarise.

    The reader must never raise on device content; if it does, that is
    recorded as the outcome's ``error`` (and counted as a failure upstream),
    not allowed to stop the replay.
    """
    from progdump import reader

    try:
        res = reader.scan(source)
    except Exception as e:  # a reader that raises on bad input is itself a finding
        return Outcome(False, None, {}, f"reader raised {type(e).__name__}: {e}")
    return _outcome_from_scan(res)


def _outcome_from_scan(res: object) -> Outcome:
    """Adapt the reader's scan result (see progdump.reader) to an Outcome."""
    if res is None:
        return Outcome(False, None, {})
    dump = getattr(res, "dump", res)
    if dump is None or getattr(res, "found", True) is False:
        return Outcome(False, None, {})
    dump_id = getattr(dump, "dump_id", None)
    if isinstance(dump_id, (bytes, bytearray)):
        dump_id = dump_id.hex()
    statuses: dict[int, str] = {}
    holes: dict[int, list[int]] = {}
    for lay in getattr(dump, "layers", []) or []:
        idx = getattr(lay, "index", None)
        st = getattr(lay, "status", None)
        hl = getattr(lay, "holes", None)
        if isinstance(lay, dict):
            idx, st, hl = lay.get("index"), lay.get("status"), lay.get("holes")
        st = getattr(st, "value", st)
        if isinstance(idx, int) and isinstance(st, str):
            statuses[idx] = st
            if hl:
                holes[idx] = [h["offset"] for h in hl if isinstance(h, dict) and isinstance(h.get("offset"), int)]
    return Outcome(True, None if dump_id is None else str(dump_id), statuses, holes=holes)


def hole_excused(k: int, status: str, failed: set[int], reported: dict[int, list[int]]) -> bool:
    """A committed layer read back partial is not lost only when recovery reports its hole (R-WR-7)
    and every failed write it reports is one the trace shows failing (``failed``: their offsets).
    A silent partial, or a hole the device never had, is a loss."""
    offs = reported.get(k) or []
    return status == "partial" and bool(offs) and all(o in failed for o in offs)


_LAYER_RE = re.compile(r"(?:layer|commit)[ :=_-]*(\d+)", re.I)


def mark_layer(label: str) -> int | None:
    """Layer index a MARK label names (``layer 0 panic``, ``commit:0`` ...), or None."""
    m = _LAYER_RE.search(label) or re.search(r"\b(\d+)\b", label)
    return int(m.group(1)) if m else None


@dataclass
class StateResult:
    state: CrashState
    outcome: Outcome
    statuses: list[str]  # per plan layer, from this dump's point of view
    layers_recovered: int
    committed: int
    committed_lost: int
    false_accept: bool
    suspect: bool
    verified: str  # full | records
    reasons: list[str] = field(default_factory=list)
    older_dump_returned: bool = False
    lost_layers: list[int] = field(default_factory=list)  # committed layers not read back complete


@dataclass
class ReplayContext:
    """Everything needed to judge states of one trace (one dump of one plan)."""

    trace: Trace
    base: BaseImage
    layer_names: list[str]
    dump_id: str | None = None  # this dump's id (from the full state); filled by prepare()
    older_ids: set[str] = field(default_factory=set)
    #: optional full check: (overlay source) -> (false_accept, reasons); recovery scored against the snapshot
    verify: Callable[[OverlaySource], tuple[bool, list[str]]] | None = None
    layer_writes: dict[int, list[Rec]] = field(default_factory=dict)
    #: also fully verify the first state of every distinct outcome (catches wrong content in partial layers)
    verify_each_outcome: bool = True
    _verified_outcomes: set = field(default_factory=set)
    #: the reader under test; progdump's by default (unit tests pass a toy one and say so)
    reader: Callable[[object], Outcome] = read_outcome
    _full: OverlaySource | None = None

    def prepare(self) -> None:
        """Find this dump's id and the older dump's, and which writes belong to which layer."""
        full = crash_state(self.trace, float("inf"), "prefix", 0)
        full = CrashState(full.t, "full", 0, frozenset(w.seq for w in self.trace.writes), None, full.flushed_seq)
        self._full = OverlaySource(self.base, self.trace, full)
        base_o = self.reader(self.base)
        if base_o.found and base_o.dump_id:
            self.older_ids.add(base_o.dump_id)
        if self.dump_id is None:
            o = self.reader(self._full)
            if o.found and o.dump_id not in self.older_ids:
                self.dump_id = o.dump_id
        self.older_ids.discard(self.dump_id)  # type: ignore[arg-type]
        prev = -1
        for m in self.trace.marks:
            k = mark_layer(m.label)
            if k is None:
                continue
            self.layer_writes[k] = [w for w in self.trace.writes if prev < w.seq < m.seq]
            prev = m.seq


def _layer_bytes_intact(ctx: ReplayContext, ov: OverlaySource, state: CrashState, layer: int) -> bool:
    """True when every byte layer ``layer`` wrote reads back as the complete dump has it."""
    assert ctx._full is not None
    for w in ctx.layer_writes.get(layer, []):
        if w.seq in state.keep:
            continue
        if ov.pread(w.offset, w.length) != ctx._full.pread(w.offset, w.length):
            return False
    return True


def evaluate(ctx: ReplayContext, state: CrashState) -> StateResult:
    """Judge one crash state (see the module docstring)."""
    ov = OverlaySource(ctx.base, ctx.trace, state)
    out = ctx.reader(ov)
    n = len(ctx.layer_names)
    reasons: list[str] = []
    fa = False
    older = False
    committed = sorted({k for m in committed_marks(ctx.trace, state.t) if (k := mark_layer(m.label)) is not None})
    if out.error:
        reasons.append(out.error)
        fa = True  # a reader crash on device content fails the run as loudly as a false accept
    ours = out.found and out.dump_id == ctx.dump_id
    if out.found and not ours:
        if out.dump_id in ctx.older_ids:
            older = True
        else:
            fa = True
            reasons.append(f"reader returned dump {out.dump_id}, neither this dump ({ctx.dump_id}) nor the older one")
    statuses = [out.statuses.get(i, "missing") if ours else "missing" for i in range(n)]
    extra = sorted(i for i, st in out.statuses.items() if i >= n and st != "missing") if ours else []
    if extra:
        fa = True
        reasons.append(f"reader returned layers {extra} that this dump's plan ({n} layers) does not have")
    lost = [k for k in committed if k < n and statuses[k] != "complete"]
    if lost:
        reasons.append(f"committed layers lost: {lost} (durable by t={state.t * 1e3:.3f} ms)")
    suspect = False
    for i, st in enumerate(statuses):
        if st == "complete" and not _layer_bytes_intact(ctx, ov, state, i):
            suspect = True
            reasons.append(f"layer {i} claimed complete but some of its bytes are not as written")
    verified = "records"
    sig = (tuple(statuses), tuple(sorted(out.statuses.items())) if ours else (), out.dump_id if not ours else "")
    # (only this dump's outcomes: an older dump returned is checked by its id, its content is not this snapshot's)
    first_of_kind = ours and ctx.verify is not None and ctx.verify_each_outcome and sig not in ctx._verified_outcomes
    if first_of_kind:
        ctx._verified_outcomes.add(sig)
    if (suspect or first_of_kind) and ctx.verify is not None:
        vfa, vreasons = ctx.verify(ov)
        verified = "full"
        if vfa:
            fa = True
            reasons += vreasons
        elif suspect:
            reasons.append("full recovery scored against the snapshot: content verified (suspect cleared)")
    elif suspect:
        fa = True  # without a verifier a suspect cannot be cleared: count it
    rec = 0
    for st in statuses:
        if st != "complete":
            break
        rec += 1
    return StateResult(
        state, out, statuses, rec, len(committed), len(lost), fa, suspect, verified, reasons, older, lost
    )


def failing(r: StateResult) -> bool:
    return r.false_accept or r.committed_lost > 0


def narrow(ctx: ReplayContext, state: CrashState) -> dict[str, object]:
    """Shrink a failing state to the write that breaks it.

    The flushed prefix at the state's ``t`` is the floor (the model says it is
    on the device whatever happens). The extra writes (unflushed kept + the
    torn one) are added in seq order; bisection finds the first prefix of
    them that fails, and the last write of that prefix is the culprit. Its
    neighbourhood is confirmed by evaluating with and without it.
    """
    base_keep = {w.seq for w in ctx.trace.writes if w.seq < state.flushed_seq}
    floor = CrashState(state.t, "narrow", state.seed, frozenset(base_keep), None, state.flushed_seq)
    extra = sorted((state.keep - base_keep) | ({state.torn[0]} if state.torn else set()))

    def with_first(k: int) -> CrashState:
        chosen = extra[:k]
        torn = state.torn if state.torn and state.torn[0] in chosen else None
        keep = base_keep | {s for s in chosen if not torn or s != torn[0]}
        return CrashState(state.t, "narrow", state.seed, frozenset(keep), torn, state.flushed_seq)

    if failing(evaluate(ctx, floor)):
        return {
            "culprit": None,
            "note": "the flushed prefix alone fails: the fault is in durable data or the reader",
            "floor": floor.describe(),
            "result": evaluate(ctx, floor).reasons,
        }
    if not failing(evaluate(ctx, with_first(len(extra)))):
        return {"culprit": None, "note": "the state does not fail"}
    lo, hi = 0, len(extra)  # with_first(lo) passes, with_first(hi) fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if failing(evaluate(ctx, with_first(mid))):
            hi = mid
        else:
            lo = mid
    seq = extra[hi - 1]
    w = ctx.trace.by_seq[seq]
    layer = next((k for k, ws in ctx.layer_writes.items() if any(x.seq == seq for x in ws)), None)
    res = evaluate(ctx, with_first(hi))
    return {
        "culprit": seq,
        "offset": w.offset,
        "length": w.length,
        "layer": layer,
        "torn": bool(state.torn and state.torn[0] == seq),
        "t_submit_ms": round(w.t_submit * 1e3, 3),
        "writes_before_it_kept": hi - 1,
        "failure": res.reasons,
    }
