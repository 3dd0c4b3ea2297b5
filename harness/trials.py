"""A scenario run: real randomized hard-reset trials, trace replay, the report.

Real trials use real parts only: a real guest (``GuestSession``) really
panics; its captured memory is written by the real ``progdump write`` CLI in
a separate process through the modelled device onto the VM's dump disk; at a
random delay drawn over the whole dump duration that process gets SIGKILL
and the VM gets ``system_reset`` (one trial: :mod:`harness.trial`).

Before the trials an older, complete dump of an earlier panic is written to
the dump disk, and the disk is restored to exactly that content before every
write, so stale data of a real older dump is under every new one. Per device
model one panic is first dumped completely with every plan (the reference
traces: durable times, the replay population, and the ``sample/``); then
``real`` killed trials per (model, plan). Every plan the scenario lists goes
through the same steps; results are keyed by (plan, layer index, layer name).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.crashsim.overlay import BaseImage, OverlaySource
from harness.crashsim.replay import ReplayContext, StateResult, evaluate, hole_excused
from harness.crashsim.states import enumerate_states
from harness.crashsim.trace import read_trace
from harness.errors import TrialError
from harness.paths import repo_root
from harness.pin import pin_info
from harness.report import (
    Progress,
    Row,
    format_table,
    new_results_dir,
    plot_curve,
    summarize,
    write_csv,
    write_report_md,
    write_summary,
)
from harness.scoring import expected_layers, score_recovery
from harness.setups import get_setup
from harness.trial import (
    WRITER_TIMEOUT_S,
    Captured,
    TrialContext,
    TrialOutcome,
    TrialSpec,
    child_env,
    drop_vmcore,
    failed_offsets,
    guest_sees_disk,
    layer_names,
    manifest_dump_id,
    quiesce_host_io,
    recover,
    restore_image,
    run_trial,
    score_real,
    warm_file,
    writer_argv,
)
from progdump.elfcore import load_elf_snapshot, save_elf_snapshot

__all__ = ["run_scenario", "RefRun", "RealPhase", "run_real_phase", "run_replay_phase"]

MIB = 1 << 20
#: durable times: ``Durable[model][plan][layer name]`` -> ms since the writer opened the device
Durable = dict[str, dict[str, dict[str, list[float]]]]


def log(msg: str) -> None:
    print(f"[{datetime.now(UTC).strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class RefRun:
    """A complete (not killed) dump of one panic: the replay population."""

    model: str
    plan: str
    trace: str
    snapshot_elf: str
    durable: dict[str, float]
    dump_id: str | None
    end_s: float


@dataclass
class RealPhase:
    rows: list[Row] = field(default_factory=list)
    refs: list[RefRun] = field(default_factory=list)
    durable_ms: Durable = field(default_factory=dict)
    #: the same, counted from the panic event (GUEST_PANICKED) instead of the device opening
    durable_after_event_ms: Durable = field(default_factory=dict)
    base_image: str = ""
    older_ids: set[str] = field(default_factory=set)
    sample_from: str | None = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, list[float]] = field(default_factory=dict)
    #: per reference run "model/plan": failed writes in its trace, holes its recovery reported per layer
    holes: dict[str, dict[str, object]] = field(default_factory=dict)
    #: event dumps (resident writer, harness.eventdump): ``[model][layer name]`` -> ms from GUEST_PANICKED
    event_ms: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    #: one dict per event dump: hand-over, delivery, go->layer 0, the layer-0-alone check
    events: list[dict[str, object]] = field(default_factory=list)

    def timed(self, what: str, t0: float) -> None:
        self.timings.setdefault(what, []).append(time.monotonic() - t0)

    def record(self, sc: Any, out: TrialOutcome) -> None:
        """Add a trial's row and durable times; keep the newest full recovery as the sample."""
        self.rows.append(out.row(sc.name, sc.guest, sc.seed))
        for name, v in out.durable.items():
            self.durable_ms.setdefault(out.spec.model, {}).setdefault(out.spec.plan, {}).setdefault(name, []).append(
                v * 1e3
            )
        for name, v in out.durable_after_event.items():
            (
                self.durable_after_event_ms.setdefault(out.spec.model, {})
                .setdefault(out.spec.plan, {})
                .setdefault(name, [])
                .append(v * 1e3)
            )
        full = out.complete and out.score.layers_recovered == len(out.names) and not out.score.false_accept
        if full:
            if self.sample_from and self.sample_from != out.outdir:
                drop_vmcore(self.sample_from)
            self.sample_from = out.outdir
        else:
            drop_vmcore(out.outdir)


class RealRun:
    """One booted guest driven through the older dump, the reference runs and the killed trials."""

    def __init__(self, sc: Any, work: Path, ph: RealPhase, progress: Progress) -> None:
        self.sc = sc
        self.work = work
        self.ph = ph
        self.progress = progress
        self.rng = random.Random(sc.seed)
        self.image = str(work / "dump.img")
        self.base = str(work / "base.img")
        self.setup: Any = None
        self.g: Any = None

    # -- guest steps ------------------------------------------------------------------------
    def workload(self) -> None:
        """The setup's guest side (after every boot and reset), then the scenario's commands."""
        if self.setup is not None:
            t = time.monotonic()
            self.setup.after_boot(self.g)
            self.ph.timed("setup_after_boot_s", t)
        t = time.monotonic()
        for cmd in self.sc.workload:
            res = self.g.run(cmd, timeout=600.0)
            if res.status != 0:
                self.ph.notes.append(f"workload command exited {res.status}: {cmd[:60]} ({res.text.strip()[-120:]})")
        self.ph.timed("workload_s", t)

    def panic_capture(self, elf: str) -> Captured:
        """Panic, capture, save the ELF core the writer gets; the snapshot is the one *loaded from it*.

        Ground truth is what the writer was given: the producer's output for
        the ELF-loaded snapshot (byte-identical memory; metadata key order
        may differ from the live capture, which changes JSON artifact bytes).
        """
        t = time.monotonic()
        if self.setup is None or self.setup.panic(self.g, self.sc.trigger, self.rng) is None:
            self.g.panic(self.sc.trigger)
        if self.setup is not None:
            self.ph.notes += self.setup.notes()
        live = self.g.capture()
        self.ph.timed("panic_capture_s", t)
        t = time.monotonic()
        save_elf_snapshot(live, elf)
        live.close()
        warm_file(elf)
        self.ph.timed("save_elf_s", t)
        return Captured(elf, load_elf_snapshot(elf), dict(self.g.markers or {}))

    def reset(self) -> None:
        t = time.monotonic()
        self.g.reset()
        self.ph.timed("reset_to_ready_s", t)

    def ctx(self) -> TrialContext:
        return TrialContext(self.sc, self.g, self.work, self.image, self.base, self.ph.older_ids)

    # -- phases -------------------------------------------------------------------------------
    def older_dump(self) -> None:
        """A complete dump of an earlier panic, under every later one (restored before each write)."""
        self.workload()
        elf = str(self.work / "older.elf")
        cap = self.panic_capture(elf)
        cap.snapshot.close()
        p = subprocess.run(
            writer_argv(elf, self.image, "progressive", "none", None), capture_output=True, text=True, env=child_env()
        )
        if p.returncode != 0:
            raise TrialError(f"writing the older dump failed ({p.returncode}): {p.stderr.strip()[-500:]}")
        shutil.copyfile(self.image, self.base)
        rc, _ = recover(self.base, str(self.work / "older-recovered"))
        oid = manifest_dump_id(str(self.work / "older-recovered")) if rc == 0 else None
        if oid:
            self.ph.older_ids.add(oid)
        os.unlink(elf)
        self.reset()
        self.progress.step(1, "older dump written")

    def references(self, model: str) -> None:
        """One panic, dumped completely with every plan: durable times and the replay population."""
        self.workload()
        cap = self.panic_capture(str(self.work / f"ref-{model}.elf"))
        for i, plan in enumerate(self.sc.plans):
            t = time.monotonic()
            out = run_trial(self.ctx(), cap, TrialSpec(model, plan, f"ref-{model}-{plan}"))
            self.ph.timed(f"write_{model}_{plan}_s", t)
            if i:  # this panic's later plans waited for the earlier plans' dumps: not a time from the event
                out.durable_after_event = {}
            if out.writer_rc not in (0, None):
                self.ph.notes.append(f"reference writer {model}/{plan} exited {out.writer_rc}: {out.writer_err}")
            self.ph.holes[f"{model}/{plan}"] = {
                "failed_writes": out.failed_writes,
                "reported": {str(k): len(v) for k, v in sorted(out.reported_holes.items())},
            }
            self.ph.record(self.sc, out)
            self.ph.refs.append(RefRun(model, plan, out.trace_path, cap.elf, out.durable, out.score.dump_id, out.t_s))
            self.progress.step(1, f"{model} {plan} reference: {out.score.layers_recovered}/{len(out.names)} layers")
        cap.snapshot.close()
        self.reset()
        ok, how = guest_sees_disk(self.g, self.image)
        if not ok:
            self.ph.notes.append(f"after reset the guest did not see the dump disk: {how}")

    def killed(self, model: str, trial_no: int) -> int:
        """``real`` killed trials per plan: a fresh panic each, the writer killed at a random delay."""
        for _ in range(self.sc.real):
            for plan in self.sc.plans:
                trial_no += 1
                ref = next(r for r in self.ph.refs if r.model == model and r.plan == plan)
                delay = self.rng.uniform(0.0, ref.end_s * 1.15)
                self.workload()
                cap = self.panic_capture(str(self.work / "trial.elf"))
                t = time.monotonic()
                try:
                    out = run_trial(
                        self.ctx(), cap, TrialSpec(model, plan, f"trial{trial_no:03d}-{model}-{plan}", trial_no, delay)
                    )
                finally:
                    cap.snapshot.close()
                self.ph.timed("killed_trial_s", t)
                self.ph.record(self.sc, out)
                self.progress.step(
                    1, f"{model} {plan} reset at {out.t_s * 1e3:.0f} ms: {out.score.layers_recovered}/{len(out.names)}"
                )
        return trial_no

    def event_dumps(self, model: str) -> None:
        """``event_dumps`` panics dumped by a writer armed before each (harness.eventdump), timed from the event.

        Each: workload, disk back to the older dump, ``progdump.resident``
        armed on it (the model's trace), the per-boot hand-over prepared,
        panic with the go line sent at GUEST_PANICKED, the dump written to
        its end. Then, the guest still stopped as at the event: the first
        dump of each model is recovered whole and scored against a capture;
        the guest prints the rest of its panic (``finish_console``); layer 0
        is recovered alone (the trace replayed at its commit) and checked
        against the console; reset.
        """
        from harness.eventdump import (  # noqa: PLC0415
            ResidentWriter,
            after_event_ms,
            check_layer0,
            console_expectations,
            recover_layer0_alone,
            resident_argv,
        )

        plan = self.sc.event_plan
        names = layer_names(plan)
        for i in range(self.sc.event_dumps):
            name = f"event-{model}-{i:03d}"
            self.workload()
            t = time.monotonic()
            restore_image(self.base, self.image)
            quiesce_host_io()
            hand = self.g.prepare_handoff()
            trace = str(self.work / "traces" / f"{name}.trace")
            os.makedirs(os.path.dirname(trace), exist_ok=True)
            w = ResidentWriter(
                resident_argv(self.image, plan, model, trace),
                child_env(),
                pass_fds=(hand.ram_fd,),
                stderr_path=str(self.work / f"{name}.err"),
            )
            try:
                pr = self.g.panic(self.sc.trigger, at_event=w.go, handoff=hand)
                fin = w.wait(WRITER_TIMEOUT_S)
            finally:
                w.close()
            self.ph.timed("event_dump_s", t)
            rec: dict[str, object] = {
                "model": model, "plan": plan, "dump": i, "trace": trace, "arm_s": w.armed.get("arm_s"),
                "handoff_ms": pr.handoff_ms, "event_delivery_ms": round((pr.event_rx_ns - pr.event_ns) / 1e6, 3),
                "go_read_after_event_ms": round((int(fin["go_monotonic_ns"]) - pr.event_rx_monotonic_ns) / 1e6, 3),
                "go_to_layer_ms": {k: round(float(v) * 1e3, 3) for k, v in fin.get("go_to_layer_s", {}).items()},
                "go_to_writer_start_ms": round(float(fin.get("go_to_start_s") or 0.0) * 1e3, 3),
                "stopped": fin.get("stopped"),
                "loadavg_1m": round(os.getloadavg()[0], 2),  # the host is shared: context for the figure
            }  # fmt: skip
            tr = read_trace(trace)
            try:
                ev = after_event_ms(tr, names, pr.event_rx_monotonic_ns)
            finally:
                tr.close()
            rec["durable_after_event_ms"] = ev
            for lname, ms in ev.items():
                self.ph.event_ms.setdefault(model, {}).setdefault(lname, []).append(ms)
            if i == 0 and w.sent is not None:  # the whole dump, once per model: scored against what it was given
                rec["full_check"] = self._score_event_dump(name, plan, w.sent)
            rec["console_complete"] = self.g.finish_console()
            problems: list[str] = []
            try:
                expect = console_expectations(self.g.console_since_panic())
            except ValueError as e:
                expect, problems = None, [f"console: {e}"]
            out = str(self.work / "recovered" / f"{name}-layer0")
            t0, statuses = recover_layer0_alone(trace, self.base, names, out)
            if expect is not None:
                problems = check_layer0(out, statuses, expect, str((self.g.markers or {}).get("kmsg", "")))
            rec["layer0_alone"] = {
                "t_ms": round(t0 * 1e3, 3), "statuses": "/".join(statuses), "ok": not problems, "problems": problems,
                "frames": len(expect.frames) if expect else 0, "log_lines": len(expect.log_lines) if expect else 0,
            }  # fmt: skip
            self.ph.events.append(rec)
            self.reset()
            l0 = ev.get(names[0])
            self.progress.step(
                1,
                f"{model} event dump {i + 1}: layer 0 {'-' if l0 is None else f'{l0:.1f}'} ms after the event, "
                f"layer 0 alone {'ok' if not problems else 'FAILED'}",
            )

    def _score_event_dump(self, name: str, plan: str, go: dict[str, Any]) -> dict[str, object]:
        """Recover the whole event dump and score it against the snapshot its go line names.

        Ground truth is what the writer was given, as in every trial: the
        snapshot built from the same go message in this process (its
        ``/proc/self/fd/N`` is this process's descriptor of the same RAM
        file), while the guest is still stopped as it was at the event.
        """
        from progdump.resident import snapshot_from_go  # noqa: PLC0415

        live = snapshot_from_go(go)
        try:
            cap = Captured("", live, dict(self.g.markers or {}))
            outdir = str(self.work / "recovered" / name)
            rrc, _ = recover(self.image, outdir)
            score, _ = score_real(outdir, rrc, cap, plan, self.ph.older_ids)
        finally:
            live.close()
        drop_vmcore(outdir)
        return {
            "statuses": "/".join(score.statuses()),
            "layers_recovered": score.layers_recovered,
            "false_accept": score.false_accept,
            "reasons": list(score.reasons)[:10],
        }


def run_real_phase(sc: Any, work: Path, progress: Progress) -> RealPhase:
    """Boot the guest once, then panic / dump / kill / reset / recover / score, trial after trial."""
    from harness.controller import GuestSession  # QEMU only here: replay tools need none

    ph = RealPhase()
    run = RealRun(sc, work, ph, progress)
    size = (sc.memory_mib * MIB * 5 // 4 + 64 * MIB) // MIB * MIB
    with open(run.image, "wb") as f:
        f.truncate(size)
    ph.base_image = run.base
    setup_cls = get_setup(sc.setup) if sc.setup else None
    with contextlib.ExitStack() as stack:
        ov = None
        if setup_cls is not None:
            run.setup = setup_cls(sc, work / "setup", sc.setup_params, log)
            stack.callback(run.setup.close)  # every exit path, Ctrl-C included
            run.setup.check()
            ov = run.setup.start()
            ph.notes += ov.notes
        knobs = dict(sc.knobs) | (ov.knobs if ov is not None else {})
        run.g = stack.enter_context(
            GuestSession(
                guest=sc.guest,
                mem_mib=sc.memory_mib,
                dump_disk=Path(ov.dump_disk) if ov is not None and ov.dump_disk else Path(run.image),
                workdir=work / "guest",
                knobs=knobs,
                log=lambda s: None,
                extra_args=tuple(ov.extra_args) if ov is not None else (),
            )
        )
        t0 = time.monotonic()
        run.g.boot()
        ph.timed("boot_s", t0)
        run.older_dump()
        trial_no = 0
        for model in sc.device_models:
            run.references(model)
            trial_no = run.killed(model, trial_no)
            if model in event_models(sc):
                run.event_dumps(model)
    return ph


def event_models(sc: Any) -> list[str]:
    """The device models that get event dumps (none when ``event_dumps`` is 0)."""
    if not getattr(sc, "event_dumps", 0):
        return []
    return [m for m in sc.device_models if not sc.event_models or m in sc.event_models]


# -- replay phase ---------------------------------------------------------------------


def _verifier(ref: RefRun, plan: str) -> Callable[[OverlaySource], tuple[bool, list[str]]]:
    """Full check of a replayed state: recover it, score against the reference snapshot."""
    from progdump import reader
    from progdump.export import export

    cache: dict[str, Any] = {}

    def verify(ov: OverlaySource) -> tuple[bool, list[str]]:
        if "snap" not in cache:
            cache["snap"] = load_elf_snapshot(ref.snapshot_elf)
            cache["exp"] = expected_layers(cache["snap"], plan)
        d = tempfile.mkdtemp(prefix="pd-verify-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        try:
            try:
                export(reader.scan(ov), d)
            except Exception as e:  # the reader must not raise on device content: a finding, reported
                return True, [f"recover raised {type(e).__name__}: {e}"]
            s = score_recovery(
                d if os.path.exists(os.path.join(d, "manifest.json")) else None, cache["snap"], cache["exp"]
            )
            return s.false_accept, s.reasons
        finally:
            shutil.rmtree(d, ignore_errors=True)

    return verify


def _replay_ref(sc: Any, ref: RefRun, base_image: str, older_ids: set[str]) -> tuple[list[Row], float]:
    """Replay ``sc.states`` crash states of one reference trace; (rows, states per minute)."""
    rows: list[Row] = []
    names = layer_names(ref.plan)
    with BaseImage(base_image, os.path.getsize(base_image)) as bi:
        tr = read_trace(ref.trace)
        try:
            ctx = ReplayContext(
                tr, bi, names, dump_id=ref.dump_id, older_ids=set(older_ids), verify=_verifier(ref, ref.plan)
            )
            ctx.prepare()
            holes = failed_offsets(tr)
            t0 = time.monotonic()
            states = enumerate_states(tr, sc.states, seed=sc.seed)
            for idx, st in states:
                r: StateResult = evaluate(ctx, st)
                reasons = list(r.reasons)
                # a committed layer with a failed write is expected partial, with its hole reported
                lost = sum(1 for k in r.lost_layers if not hole_excused(k, r.statuses[k], holes, r.outcome.holes))
                if r.older_dump_returned:
                    reasons.append("older dump returned")
                rows.append(
                    Row(
                        scenario=sc.name,
                        guest=sc.guest,
                        device_model=ref.model,
                        plan=ref.plan,
                        source="replay",
                        trial=-1,
                        index=idx,
                        kind=st.kind,
                        seed=st.seed,
                        t_ms=round(st.t * 1e3, 3),
                        layers_total=len(names),
                        layers_recovered=r.layers_recovered,
                        statuses="/".join(r.statuses),
                        committed=r.committed,
                        committed_lost=lost,
                        false_accept=int(r.false_accept),
                        bytes_recovered=0,
                        verified=r.verified,
                        agreement="",
                        trace=ref.trace,
                        reasons=" | ".join(reasons)[:2000],
                        t_s=st.t,
                    )
                )
            dt = time.monotonic() - t0
        finally:
            tr.close()
    return rows, (round(len(states) / dt * 60.0, 1) if dt > 0 else 0.0)


def replay_workers(n_refs: int) -> int:
    """Processes for the replay phase: one per core (``REPLAY_JOBS=`` overrides), at most one per trace."""
    env = os.environ.get("REPLAY_JOBS", "")
    want = int(env) if env.isdigit() and int(env) > 0 else (os.cpu_count() or 1)
    return max(1, min(want, n_refs))


def run_replay_phase(sc: Any, ph: RealPhase, progress: Progress) -> tuple[list[Row], dict[str, float]]:
    """``states`` crash states per reference trace, each recovered and scored, on every core.

    Each reference trace is replayed whole by one worker process (the traces
    are independent; a process per core because the reader is CPU-bound
    Python). Rows come back in reference order, so the results do not depend
    on the number of workers.
    """
    import concurrent.futures as cf
    import multiprocessing

    rows: list[Row] = []
    rate: dict[str, float] = {}
    jobs = replay_workers(len(ph.refs))
    results: dict[int, tuple[list[Row], float]] = {}
    if jobs == 1:
        for i, ref in enumerate(ph.refs):
            results[i] = _replay_ref(sc, ref, ph.base_image, ph.older_ids)
            progress.step(len(results[i][0]), f"{ref.model} {ref.plan}")
    else:
        with cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as ex:
            futs = {ex.submit(_replay_ref, sc, ref, ph.base_image, ph.older_ids): i for i, ref in enumerate(ph.refs)}
            for f in cf.as_completed(futs):
                i = futs[f]
                results[i] = f.result()
                progress.step(len(results[i][0]), f"{ph.refs[i].model} {ph.refs[i].plan}")
    for i, ref in enumerate(ph.refs):
        rows += results[i][0]
        rate[f"{ref.model}/{ref.plan}"] = results[i][1]
    return rows, rate


# -- the whole run ---------------------------------------------------------------------------


def run_scenario(sc: Any, results_root: str) -> dict:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = new_results_dir(results_root, sc.name, stamp)
    work = repo_root() / ".cache" / "scenarios" / sc.name / stamp
    work.mkdir(parents=True, exist_ok=True)
    for old in sorted((work.parent).iterdir())[:-2]:  # keep the two newest work dirs (traces for replaying rows)
        shutil.rmtree(old, ignore_errors=True)
    log(f"scenario {sc.name}: {sc.description}")
    log(
        f"models {', '.join(sc.device_models)}; plans {', '.join(sc.plans)}; {sc.real} killed trials and "
        f"{sc.states} replayed states per (model, plan); results {run_dir}"
    )
    n_real = 1 + len(sc.device_models) * len(sc.plans) * (1 + sc.real) + len(event_models(sc)) * sc.event_dumps
    t0 = time.monotonic()
    ph = run_real_phase(sc, work, Progress("real trials", n_real))
    real_s = time.monotonic() - t0
    t1 = time.monotonic()
    rrows, rate = run_replay_phase(sc, ph, Progress("replayed crash states", len(ph.refs) * sc.states))
    replay_s = time.monotonic() - t1
    rows = ph.rows + rrows
    plans = {p: layer_names(p) for p in sc.plans}
    summary = summarize(
        rows,
        scenario=sc.name,
        guest=sc.guest,
        plans=plans,
        durable_ms=ph.durable_ms,
        durable_after_event_cli_ms=ph.durable_after_event_ms,
        event_ms=ph.event_ms,
        event_plan=(sc.event_plan, layer_names(sc.event_plan)) if ph.events else None,
        events=ph.events,
        extra={
            "memory_mib": sc.memory_mib,
            "trigger": sc.trigger,
            "seed": sc.seed,
            "replay_states_per_minute": rate,
            "real_phase_s": round(real_s, 1),
            "replay_phase_s": round(replay_s, 1),
            "timings_s": {k: [round(x, 3) for x in v] for k, v in ph.timings.items()},
            "base_image": ph.base_image,
            "code": pin_info(),
            "notes": ph.notes,
            "holes": ph.holes,
            "results_dir": str(run_dir),
        },
    )
    write_csv(rows, run_dir / "trials.csv")
    write_summary(summary, run_dir / "summary.json")
    if ph.events:  # one record per event dump: every figure the summary's percentiles come from
        write_summary({"event_dumps": ph.events}, run_dir / "events.json")
    plot_curve(
        rows,
        ph.durable_ms,
        plans,
        run_dir / "curve.png",
        f"{sc.name}: layers recovered vs reset time ({sc.guest}, {sc.memory_mib} MiB)",
    )
    if ph.sample_from and os.path.isdir(ph.sample_from):
        shutil.copytree(ph.sample_from, run_dir / "sample")
    extra = [
        f"- replay rate (states/minute): {rate}",
        f"- real phase {real_s:.0f} s, replay phase {replay_s:.0f} s",
        "",
    ]
    if ph.notes:
        extra += ["## Notes", ""] + [f"- {n}" for n in ph.notes] + [""]
    write_report_md(run_dir / "report.md", summary, rows, plans, sc.description, extra)
    print()
    print(format_table(summary, plans))
    print(
        f"real trials {summary['real_trials']}, replayed states {summary['replayed_states']}, "
        f"false accepts {summary['false_accepts']}, committed layers lost {summary['committed_layers_lost']}, "
        f"agreement {summary['agreement']['agree']} agree / {summary['agreement']['disagree']} disagree"
    )
    print(f"curve: {run_dir / 'curve.png'}")
    print(f"report: {run_dir / 'report.md'}")
    return summary
