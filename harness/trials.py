"""Real randomized hard-reset trials, trace replay and scoring: one scenario run.

Real trials use real parts only: a real guest (``GuestSession``) really
panics; its captured memory is written by the real ``progdump write`` CLI in
a separate process through the modelled device onto the VM's dump disk; at a
random delay drawn over the whole dump duration that process gets SIGKILL
(its volatile device cache dies with it) and the VM gets ``system_reset``;
the rebooted guest is shown to read the dump disk; ``progdump recover`` runs
on the disk and :mod:`harness.scoring` judges the result against the
snapshot and the planted markers. The same trace is then replayed at the same
moment (:mod:`harness.crashsim`) and the two outcomes compared (agreement).

Before the trials an older, complete dump of an earlier panic is written to
the dump disk, and the disk is restored to exactly that content before every
write, so stale data of a real older dump is under every new one. Per device
model one panic is first dumped completely with every plan (the reference
traces: durable times, the replay population, and the ``sample/``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from harness.crashsim.overlay import BaseImage, OverlaySource
from harness.crashsim.replay import ReplayContext, StateResult, evaluate, hole_excused, mark_layer
from harness.crashsim.states import committed_marks, crash_state, enumerate_states
from harness.crashsim.trace import Trace, read_trace
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
from harness.scoring import Score, expected_layers, score_recovery
from progdump.layers.plan import get_plan

__all__ = ["run_scenario", "RefRun", "durable_times", "agreement", "restore_image", "writer_argv", "recover_argv"]

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def log(msg: str) -> None:
    print(f"[{datetime.now(timezone.utc).strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- pure helpers (unit-tested) -------------------------------------------------


def durable_times(trace: Trace, layer_names: list[str], plan: str) -> dict[str, float]:
    """Seconds from device open to the flush that made each layer's commit durable."""
    out: dict[str, float] = {}
    for f in sorted(trace.flushes, key=lambda r: r.t_complete):
        for m in committed_marks(trace, f.t_complete):
            k = mark_layer(m.label)
            if k is None or k >= len(layer_names):
                continue
            key = "monolithic" if plan == "monolithic" else layer_names[k]
            out.setdefault(key, f.t_complete)
    return out


def failed_offsets(trace: Trace) -> set[int]:
    """Device offsets of the writes that failed on the medium (the trace's FAILED writes).

    A hole a recovery reports is believed only where the trace shows a failed
    write at that offset: the reader cannot excuse a partial layer by itself.
    """
    return {w.offset for w in trace.failed_writes}

def warm_file(path: str, chunk: int = 4 * MIB) -> None:
    """Read a just-written snapshot ELF once, so its pages (holes included) are in the page cache.

    Why: the first read of a sparse file's holes makes the kernel populate the page cache
    with zero pages (and reclaim for them); measured here at 1.5 s for a 512 MiB core
    whose first read-back took 1.54 s and later ones 0.3 s. Otherwise the first writer
    after every capture pays it inside its durable times, whichever plan it runs.
    """
    buf = bytearray(chunk)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def quiesce_host_io() -> None:
    """Write back the host's dirty pages (the snapshot ELF just written, the restored dump disk)
    before a timed writer starts: otherwise the kernel's writeback of them competes with the
    writer's O_DIRECT writes, and whichever plan runs first after a capture looks slower."""
    os.sync()


def restore_image(base: str, dump: str, chunk: int = 4 * MIB) -> int:
    """Make ``dump`` byte-equal to ``base`` writing only the chunks that differ; returns bytes written.

    Used while the VM is paused (QEMU holds the raw image; plain pwrite is safe then).
    """
    written = 0
    bfd = os.open(base, os.O_RDONLY)
    dfd = os.open(dump, os.O_RDWR)
    try:
        size = os.fstat(bfd).st_size
        off = 0
        while off < size:
            a = os.pread(bfd, chunk, off)
            b = os.pread(dfd, len(a), off)
            if a != b:
                os.pwrite(dfd, a, off)
                written += len(a)
            off += len(a)
        os.ftruncate(dfd, size)
    finally:
        os.close(bfd)
        os.close(dfd)
    return written


def writer_argv(snapshot_elf: str, device: str, plan: str, model: str, trace: str | None) -> list[str]:
    """The user's command, run as its own process so it can be SIGKILLed."""
    argv = [sys.executable, "-m", "progdump", "write", snapshot_elf, device, "--plan", plan, "--device-model", model]
    if trace:
        argv += ["--trace", trace]
    return argv


def recover_argv(device: str, outdir: str) -> list[str]:
    return [sys.executable, "-m", "progdump", "recover", device, outdir]


_CODE_ROOT: list[str] = [str(ROOT)]


def child_env() -> dict[str, str]:
    """Environment for the writer and recovery processes: the pinned progdump (see :func:`pin_code`)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = _CODE_ROOT[0] + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def pin_code(work: Path) -> dict[str, object]:
    """Freeze the progdump code for the whole run, in this process and in every child.

    The tree may change during a run (a shared working tree; a developer
    mid-edit). Ground truth computed by one version and a dump written by
    another differ for reasons that are not crashes, and a half-edited file
    breaks a trial (both happened). So the run uses one copy of ``progdump/``:
    by default the last commit (``git archive HEAD``), with ``PIN=tree`` the
    working tree as it is now (``PIN=none``: no pinning, for use inside a test
    session). Children get it on PYTHONPATH; this process
    drops the progdump modules it had imported and imports every module from
    the copy.
    """
    import importlib
    import io
    import pkgutil
    import tarfile

    mode = os.environ.get("PIN", "head")
    info: dict[str, object] = {"pin": mode}
    if mode == "none":  # tests inside a larger pytest session: leave sys.modules alone
        _CODE_ROOT[0] = str(ROOT)
        return info
    dst = work / "code"
    dst.mkdir(parents=True, exist_ok=True)
    done = False
    if mode == "head":
        p = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "HEAD", "progdump"], capture_output=True)
        if p.returncode == 0 and p.stdout:
            with tarfile.open(fileobj=io.BytesIO(p.stdout)) as tf:
                tf.extractall(dst, filter="data")
            done = True
        else:
            info["pin"] = "tree (no git HEAD: " + p.stderr.decode(errors="replace").strip()[:100] + ")"
    if not done:
        shutil.copytree(ROOT / "progdump", dst / "progdump", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in [n for n in sys.modules if n == "progdump" or n.startswith("progdump.")]:
        del sys.modules[name]
    sys.path.insert(0, str(dst))
    importlib.invalidate_caches()
    import progdump

    for m in pkgutil.walk_packages(progdump.__path__, "progdump."):
        if m.name.endswith("__main__"):
            continue  # importing it would run the CLI
        with contextlib.suppress(Exception):
            importlib.import_module(m.name)
    _CODE_ROOT[0] = str(dst)
    info["copy"] = str(dst / "progdump")
    with contextlib.suppress(Exception):
        info["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        info["tree_dirty"] = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "progdump"],
                                                 capture_output=True, text=True).stdout.strip())
    return info


def statuses_for(score: Score) -> list[str]:
    return score.statuses()


def agreement(real_statuses: list[str], trace: Trace, base: BaseImage, layer_names: list[str], dump_id: str | None,
              older_ids: set[str]) -> tuple[str, str]:
    """Does the replay of the cut trace at the kill predict the real outcome?

    The replayed state is the ``model`` state at the end of the cut trace:
    exactly the writes the modelled device had destaged when it was killed.
    A SIGKILL can land between a destage's pwrite and its trace record, so if
    the first comparison differs, the state with the next cached write also
    destaged is tried; agreement with it is reported as such.
    """
    ctx = ReplayContext(trace, base, layer_names, dump_id=dump_id, older_ids=set(older_ids))
    ctx.prepare()
    ctx.dump_id = dump_id or ctx.dump_id
    st = crash_state(trace, float("inf"), "model", 0)
    r = evaluate(ctx, st)
    norm = [s if s != "complete-unverified" else "complete" for s in real_statuses]
    if r.statuses == norm:
        return "agree", ""
    destaged = st.keep
    pending = [w.seq for w in trace.writes if w.seq not in destaged]
    if pending:
        st2 = type(st)(st.t, "model", 0, frozenset(destaged | {pending[0]}), None, st.flushed_seq)
        r2 = evaluate(ctx, st2)
        if r2.statuses == norm:
            return "agree", "agrees once the write being destaged at the kill is counted"
    return "disagree", f"real {'/'.join(norm)} vs replay {'/'.join(r.statuses)}"


# -- the guest side ---------------------------------------------------------------------


def _run_cmd(g: object, cmd: str, timeout: float | None = None) -> tuple[int, str]:
    """GuestSession.run, normalised to (status, output)."""
    res = g.run(cmd) if timeout is None else g.run(cmd, timeout=timeout)  # type: ignore[attr-defined]
    if isinstance(res, tuple):
        st, out = res[0], res[1]
    else:
        st = getattr(res, "status", getattr(res, "returncode", getattr(res, "rc", 0)))
        out = getattr(res, "output", getattr(res, "stdout", ""))
    if isinstance(out, bytes):
        out = out.decode("utf-8", "replace")
    return int(st or 0), str(out)


def guest_sees_disk(g: object, image: str) -> tuple[bool, str]:
    """The rebooted guest reads the dump disk: its first 64 KiB hash matches the host's."""
    size = os.path.getsize(image)
    st, out = _run_cmd(g, "for b in /sys/block/*; do [ -e $b/device ] && echo ${b##*/} $(cat $b/size); done")
    dev = None
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and int(parts[1]) * 512 == size:
            dev = parts[0]
    if dev is None:
        return False, f"no guest block device of {size} bytes (saw: {out.strip()[:200]})"
    st, out = _run_cmd(g, f"head -c 65536 /dev/{dev} | md5sum")
    with open(image, "rb") as f:
        want = hashlib.md5(f.read(65536)).hexdigest()
    got = out.split()[0] if out.split() else ""
    return got == want, f"/dev/{dev} md5 {got} (host {want})"


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
    durable_ms: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    base_image: str = ""
    older_ids: set[str] = field(default_factory=set)
    sample_from: str | None = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, list[float]] = field(default_factory=dict)
    #: per reference run "model/plan": failed writes in its trace, holes its recovery reported per layer
    holes: dict[str, dict[str, object]] = field(default_factory=dict)


def _timed(ph: RealPhase, what: str, t0: float) -> None:
    ph.timings.setdefault(what, []).append(time.monotonic() - t0)


def _wait_trace_open(path: str, proc: subprocess.Popen, timeout: float) -> int | None:
    """Wait until the writer's modelled device has opened its trace; return its CLOCK_MONOTONIC ns."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None and not os.path.exists(path):
            return None
        try:
            if os.path.getsize(path) >= 4096:
                with open(path, "rb") as f:
                    head = f.read(4096)
                n = int.from_bytes(head[12:16], "little")
                hdr = json.loads(head[16 : 16 + n])
                return int(hdr["open_monotonic_ns"])
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.002)
    return None


def _recover(image: str, outdir: str) -> tuple[int, str]:
    if os.path.exists(outdir):
        shutil.rmtree(outdir)
    p = subprocess.run(recover_argv(image, outdir), capture_output=True, text=True, timeout=600, env=child_env())
    return p.returncode, (p.stdout + p.stderr).strip()


def manifest_holes(outdir: str) -> dict[int, list[int]]:
    """Layer index -> offsets of the failed writes the recovery manifest reports for it (R-WR-7)."""
    try:
        layers = json.loads(Path(outdir, "manifest.json").read_text()).get("layers", [])
        return {int(lay["index"]): [int(h["offset"]) for h in lay["holes"]] for lay in layers if lay.get("holes")}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _manifest_id(outdir: str) -> str | None:
    try:
        return str(json.loads(Path(outdir, "manifest.json").read_text()).get("dump_id"))
    except (OSError, ValueError):
        return None


def _score_real(outdir: str, rc: int, snap, expected, markers, older_ids: set[str]) -> tuple[Score, bool]:
    """Score a real recovery; an older dump returned counts as nothing recovered of this one."""
    if rc != 0 or not os.path.exists(os.path.join(outdir, "manifest.json")):
        return score_recovery(None, snap, expected, markers), False
    did = _manifest_id(outdir)
    if did in older_ids:
        s = score_recovery(None, snap, expected, markers)
        s.found = True
        s.dump_id = did
        return s, True
    return score_recovery(outdir, snap, expected, markers), False


def _drop_vmcore(outdir: str) -> None:
    """Scored recoveries keep their manifest and artifacts; the vmcore (~RAM size) goes (disk space)."""
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(outdir, "vmcore"))


def _set_sample(ph: "RealPhase", outdir: str) -> None:
    """The newest recovery with every layer complete becomes the sample; the previous one sheds its vmcore."""
    if ph.sample_from and ph.sample_from != outdir:
        _drop_vmcore(ph.sample_from)
    ph.sample_from = outdir


def _row(sc, model: str, plan: str, source: str, trial: int, index: int, kind: str, seed: int, t_ms: float,
         names: list[str], statuses: list[str], recovered: int, committed: int, lost: int, fa: bool, nbytes: int,
         verified: str, agreement_: str, trace: str, reasons: list[str], t_s: float | None = None) -> Row:
    return Row(sc.name, sc.guest, model, plan, source, trial, index, kind, seed, round(t_ms, 3), len(names),
               recovered, "/".join(statuses), committed, lost, int(fa), nbytes, verified, agreement_, trace,
               " | ".join(reasons)[:2000], t_ms / 1e3 if t_s is None else t_s)


def run_real_phase(sc, run_dir: Path, work: Path, progress: Progress) -> RealPhase:
    """Boot the guest once, then panic / dump / kill / reset / recover / score, trial after trial."""
    from harness.controller import GuestSession  # needs the guest (issue 3); import here so replay tools need no QEMU

    ph = RealPhase()
    rng = random.Random(sc.seed)
    image = str(work / "dump.img")
    base = str(work / "base.img")
    size = (sc.memory_mib * MIB * 5 // 4 + 64 * MIB) // MIB * MIB
    with open(image, "wb") as f:
        f.truncate(size)
    ph.base_image = base
    from harness.scenario import resolve_setup

    setup_cls = resolve_setup(sc.setup)
    with contextlib.ExitStack() as stack:
        setup = None
        ov = None
        if setup_cls is not None:
            setup = setup_cls(sc, work / "setup", sc.setup_params, log)
            stack.callback(setup.close)  # every exit path, Ctrl-C included
            setup.check()
            ov = setup.start()
            ph.notes += ov.notes
        knobs = dict(sc.knobs)
        if ov is not None:
            knobs.update(ov.knobs)
        g = stack.enter_context(GuestSession(
            guest=sc.guest, mem_mib=sc.memory_mib,
            dump_disk=Path(ov.dump_disk) if ov is not None and ov.dump_disk else Path(image),
            workdir=work / "guest", knobs=knobs, log=lambda s: None,
            extra_args=tuple(ov.extra_args) if ov is not None else ()))
        t0 = time.monotonic()
        g.boot()
        _timed(ph, "boot_s", t0)

        def after_boot() -> None:
            if setup is not None:
                t = time.monotonic()
                setup.after_boot(g)
                _timed(ph, "setup_after_boot_s", t)

        def workload() -> None:
            after_boot()
            t = time.monotonic()
            for cmd in sc.workload:
                st, out = _run_cmd(g, cmd, timeout=600.0)
                if st != 0:
                    ph.notes.append(f"workload command exited {st}: {cmd[:60]} ({out.strip()[-120:]})")
            _timed(ph, "workload_s", t)

        def panic_capture(elf: str):
            """Panic, capture, save the ELF core the writer gets; return the snapshot *as loaded from it*.

            Ground truth is what the writer was given: the producer's output for
            the ELF-loaded snapshot (byte-identical memory; metadata key order
            may differ from the live capture, which changes JSON artifact bytes).
            """
            from progdump.snapshot import Snapshot

            t = time.monotonic()
            if setup is None or setup.panic(g, sc.trigger, rng) is None:
                g.panic(sc.trigger)
            if setup is not None:
                ph.notes += setup.notes()
            live = g.capture()
            _timed(ph, "panic_capture_s", t)
            t = time.monotonic()
            live.to_elf(elf)
            live.close()
            warm_file(elf)
            _timed(ph, "save_elf_s", t)
            return Snapshot.from_elf(elf), dict(getattr(g, "markers", {}) or {})

        # 1. the older dump: a complete dump of an earlier panic, under every later one
        workload()
        old_elf = str(work / "older.elf")
        snap, _ = panic_capture(old_elf)
        snap.close()
        p = subprocess.run(writer_argv(old_elf, image, "progressive", "none", None), capture_output=True, text=True,
                           env=child_env())
        if p.returncode != 0:
            raise RuntimeError(f"writing the older dump failed ({p.returncode}): {p.stderr.strip()[-500:]}")
        shutil.copyfile(image, base)
        rc, _ = _recover(base, str(work / "older-recovered"))
        oid = _manifest_id(str(work / "older-recovered")) if rc == 0 else None
        if oid:
            ph.older_ids.add(oid)
        os.unlink(old_elf)
        t = time.monotonic()
        g.reset()
        _timed(ph, "reset_to_ready_s", t)
        progress.step(1, "older dump written")

        trial_no = 0
        for model in sc.device_models:
            # 2. reference runs: one panic, dumped completely with every plan
            workload()
            ref_elf = str(work / f"ref-{model}.elf")
            snap, markers = panic_capture(ref_elf)
            for plan in sc.plans:
                names = [s.name for s in get_plan(plan)]
                expected = expected_layers(snap, plan)
                restore_image(base, image)
                quiesce_host_io()
                trace = str(work / "traces" / f"ref-{model}-{plan}.trace")
                os.makedirs(os.path.dirname(trace), exist_ok=True)
                t = time.monotonic()
                p = subprocess.run(writer_argv(ref_elf, image, plan, model, trace), capture_output=True, text=True,
                                   env=child_env())
                _timed(ph, f"write_{model}_{plan}_s", t)
                if p.returncode != 0:
                    ph.notes.append(f"reference writer {model}/{plan} exited {p.returncode}: {p.stderr.strip()[-300:]}")
                outdir = str(work / "recovered" / f"ref-{model}-{plan}")
                rc, msg = _recover(image, outdir)
                score, older = _score_real(outdir, rc, snap, expected, markers, ph.older_ids)
                tr = read_trace(trace)
                dur = durable_times(tr, names, plan)
                for k, v in dur.items():
                    ph.durable_ms.setdefault(model, {}).setdefault(k, []).append(v * 1e3)
                done = sorted({k for m in committed_marks(tr, float("inf")) if (k := mark_layer(m.label)) is not None})
                committed = len(done)
                holes = failed_offsets(tr)
                reported = manifest_holes(outdir)
                ph.holes[f"{model}/{plan}"] = {"failed_writes": len(tr.failed_writes),
                                               "reported": {str(k): len(v) for k, v in sorted(reported.items())}}
                lost = sum(1 for i in done if i < len(names) and score.layers[i].status != "complete"
                           and not hole_excused(i, score.layers[i].status, holes, reported))
                reasons = score.reasons + ([f"recover exit {rc}: {msg[-200:]}"] if rc not in (0,) else [])
                if score.markers:
                    reasons.append("markers: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in score.markers.items()))
                ph.rows.append(_row(sc, model, plan, "real", -1, -1, "complete", sc.seed, tr.end_time * 1e3, names,
                                    score.statuses(), score.layers_recovered, committed, lost, score.false_accept,
                                    score.bytes_recovered, "full", "n/a", trace, reasons))
                ph.refs.append(RefRun(model, plan, trace, ref_elf, dur, score.dump_id, tr.end_time))
                if score.layers_recovered == len(names) and not score.false_accept:
                    _set_sample(ph, outdir)
                else:
                    _drop_vmcore(outdir)
                tr.close()
                progress.step(1, f"{model} {plan} reference: {score.layers_recovered}/{len(names)} layers")
            snap.close()
            t = time.monotonic()
            g.reset()
            _timed(ph, "reset_to_ready_s", t)
            ok, how = guest_sees_disk(g, image)
            if not ok:
                ph.notes.append(f"after reset the guest did not see the dump disk: {how}")

            # 3. killed trials: fresh panic, writer killed at a random delay, VM reset
            for i in range(sc.real):
                for plan in sc.plans:
                    trial_no += 1
                    names = [s.name for s in get_plan(plan)]
                    ref = next(r for r in ph.refs if r.model == model and r.plan == plan)
                    delay = rng.uniform(0.0, ref.end_s * 1.15)
                    workload()
                    elf = str(work / "trial.elf")
                    snap, markers = panic_capture(elf)
                    expected = expected_layers(snap, plan)
                    restore_image(base, image)
                    quiesce_host_io()
                    trace = str(work / "traces" / f"trial{trial_no:03d}-{model}-{plan}.trace")
                    proc = subprocess.Popen(writer_argv(elf, image, plan, model, trace), stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, start_new_session=True, env=child_env())
                    open_ns = _wait_trace_open(trace, proc, 120.0)
                    kill_ns = None
                    if open_ns is not None:
                        target = open_ns + int(delay * 1e9)
                        while proc.poll() is None:
                            now = time.monotonic_ns()
                            if now >= target:
                                os.kill(proc.pid, signal.SIGKILL)
                                kill_ns = time.monotonic_ns()
                                break
                            time.sleep(min(0.001, (target - now) / 1e9))
                    else:
                        proc.kill()
                    proc.wait()
                    t = time.monotonic()
                    g.reset()
                    _timed(ph, "reset_to_ready_s", t)
                    seen, how = guest_sees_disk(g, image)
                    outdir = str(work / "recovered" / f"trial{trial_no:03d}")
                    rc, msg = _recover(image, outdir)
                    score, older = _score_real(outdir, rc, snap, expected, markers, ph.older_ids)
                    snap.close()
                    tr = read_trace(trace)
                    t_kill = (kill_ns - open_ns) / 1e9 if (kill_ns and open_ns) else tr.end_time
                    committed = sorted({k for m in committed_marks(tr, t_kill) if (k := mark_layer(m.label)) is not None})
                    holes = failed_offsets(tr)
                    reported = manifest_holes(outdir)
                    lost = sum(1 for k in committed if k < len(names) and score.layers[k].status != "complete"
                               and not hole_excused(k, score.layers[k].status, holes, reported))
                    with BaseImage(base, os.path.getsize(base)) as bi:
                        ag, why = agreement(score.statuses(), tr, bi, names, None if older else score.dump_id, ph.older_ids)
                    reasons = list(score.reasons)
                    if why:
                        reasons.append(why)
                    if not seen:
                        reasons.append(f"guest did not see the dump disk after reset: {how}")
                    if older:
                        reasons.append("the older dump was returned: nothing of this dump was durable")
                    if rc not in (0, 2):
                        reasons.append(f"recover exit {rc}: {msg[-200:]}")
                    kind = "killed" if kill_ns else "complete"
                    if kind == "complete":
                        for k, v in durable_times(tr, names, plan).items():
                            ph.durable_ms.setdefault(model, {}).setdefault(k, []).append(v * 1e3)
                    ph.rows.append(_row(sc, model, plan, "real", trial_no, -1, kind, sc.seed, t_kill * 1e3, names,
                                        score.statuses(), score.layers_recovered, len(committed), lost,
                                        score.false_accept, score.bytes_recovered, "full", ag, trace, reasons))
                    if kind == "complete" and score.layers_recovered == len(names) and not score.false_accept:
                        _set_sample(ph, outdir)
                    else:
                        _drop_vmcore(outdir)
                    tr.close()
                    progress.step(1, f"{model} {plan} reset at {t_kill * 1e3:.0f} ms: {score.layers_recovered}/{len(names)}")
    return ph


# -- replay phase ---------------------------------------------------------------------


def _verifier(ref: RefRun, plan: str):
    """Full check of a replayed state: recover it, score against the reference snapshot."""
    from progdump import reader
    from progdump.export import export
    from progdump.snapshot import Snapshot

    cache: dict[str, object] = {}

    def verify(ov: OverlaySource) -> tuple[bool, list[str]]:
        if "snap" not in cache:
            cache["snap"] = Snapshot.from_elf(ref.snapshot_elf)
            cache["exp"] = expected_layers(cache["snap"], plan)  # type: ignore[arg-type]
        d = tempfile_dir()
        try:
            try:
                export(reader.scan(ov), d)
            except Exception as e:
                return True, [f"recover raised {type(e).__name__}: {e}"]
            s = score_recovery(d if os.path.exists(os.path.join(d, "manifest.json")) else None,
                               cache["snap"], cache["exp"])  # type: ignore[arg-type]
            return s.false_accept, s.reasons
        finally:
            shutil.rmtree(d, ignore_errors=True)

    return verify


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="pd-verify-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)


def run_replay_phase(sc, ph: RealPhase, progress: Progress) -> tuple[list[Row], dict[str, float]]:
    rows: list[Row] = []
    rate: dict[str, float] = {}
    base_size = os.path.getsize(ph.base_image)
    with BaseImage(ph.base_image, base_size) as bi:
        for ref in ph.refs:
            names = [s.name for s in get_plan(ref.plan)]
            tr = read_trace(ref.trace)
            ctx = ReplayContext(tr, bi, names, dump_id=ref.dump_id, older_ids=set(ph.older_ids), verify=_verifier(ref, ref.plan))
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
                rows.append(_row(sc, ref.model, ref.plan, "replay", -1, idx, st.kind, st.seed, st.t * 1e3, names,
                                 r.statuses, r.layers_recovered, r.committed, lost, r.false_accept, 0, r.verified,
                                 "", ref.trace, reasons, t_s=st.t))
                progress.step(1, f"{ref.model} {ref.plan}")
            dt = time.monotonic() - t0
            rate[f"{ref.model}/{ref.plan}"] = round(len(states) / dt * 60.0, 1) if dt > 0 else 0.0
            tr.close()
    return rows, rate


# -- the whole run ---------------------------------------------------------------------------


def run_scenario(sc, results_root: str) -> dict:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = new_results_dir(results_root, sc.name, stamp)
    work = ROOT / ".cache" / "scenarios" / sc.name / stamp
    work.mkdir(parents=True, exist_ok=True)
    for old in sorted((work.parent).iterdir())[:-2]:  # keep the two newest work dirs (traces for replaying rows)
        shutil.rmtree(old, ignore_errors=True)
    log(f"scenario {sc.name}: {sc.description}")
    log(f"models {', '.join(sc.device_models)}; plans {', '.join(sc.plans)}; {sc.real} killed trials and "
        f"{sc.states} replayed states per (model, plan); results {run_dir}")
    code = pin_code(work)
    n_real = 1 + len(sc.device_models) * len(sc.plans) * (1 + sc.real)
    t0 = time.monotonic()
    ph = run_real_phase(sc, run_dir, work, Progress("real trials", n_real))
    real_s = time.monotonic() - t0
    t1 = time.monotonic()
    n_states = len(ph.refs) * sc.states
    rrows, rate = run_replay_phase(sc, ph, Progress("replayed crash states", n_states))
    replay_s = time.monotonic() - t1
    rows = ph.rows + rrows
    layer_names = [s.name for s in get_plan("progressive")]
    summary = summarize(rows, scenario=sc.name, guest=sc.guest, durable_ms=ph.durable_ms, extra={
        "memory_mib": sc.memory_mib,
        "trigger": sc.trigger,
        "plans": sc.plans,
        "seed": sc.seed,
        "replay_states_per_minute": rate,
        "real_phase_s": round(real_s, 1),
        "replay_phase_s": round(replay_s, 1),
        "timings_s": {k: [round(x, 3) for x in v] for k, v in ph.timings.items()},
        "base_image": ph.base_image,
        "code": code,
        "notes": ph.notes,
        "holes": ph.holes,
        "results_dir": str(run_dir),
    })
    write_csv(rows, run_dir / "trials.csv")
    write_summary(summary, run_dir / "summary.json")
    plot_curve(rows, ph.durable_ms, layer_names, run_dir / "curve.png",
               f"{sc.name}: layers recovered vs reset time ({sc.guest}, {sc.memory_mib} MiB)")
    if ph.sample_from and os.path.isdir(ph.sample_from):
        shutil.copytree(ph.sample_from, run_dir / "sample")
    extra = [f"- replay rate (states/minute): {rate}", f"- real phase {real_s:.0f} s, replay phase {replay_s:.0f} s", ""]
    if ph.notes:
        extra += ["## Notes", ""] + [f"- {n}" for n in ph.notes] + [""]
    write_report_md(run_dir / "report.md", summary, rows, layer_names, sc.description, extra)
    print()
    print(format_table(summary, layer_names))
    print(f"real trials {summary['real_trials']}, replayed states {summary['replayed_states']}, "
          f"false accepts {summary['false_accepts']}, committed layers lost {summary['committed_layers_lost']}, "
          f"agreement {summary['agreement']['agree']} agree / {summary['agreement']['disagree']} disagree")
    print(f"curve: {run_dir / 'curve.png'}")
    print(f"report: {run_dir / 'report.md'}")
    return summary
