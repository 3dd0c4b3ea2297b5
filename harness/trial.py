"""One trial: one dump of one plan onto one device model, optionally killed, recovered and scored.

Why one function: reference runs (the dump runs to its end) and killed trials
(SIGKILL at a random delay, then ``system_reset``) are the same steps with two
switches, and every plan, whatever its layers, goes through them the same
way. :func:`run_trial` does, in order:

1. put the dump disk back to the older dump (``base``), write back host I/O;
2. start the real ``progdump write`` CLI as its own process on the captured
   ELF, through the modelled device, with a write trace;
3. killed trials: SIGKILL it ``kill_after_s`` after its device opened (its
   volatile device cache dies with it), then reset the VM and check the
   rebooted guest reads the disk; reference runs: wait for it to finish;
4. ``progdump recover`` the disk, score against the snapshot and markers;
5. from the trace: what was committed by the kill, what failed on the medium,
   layers committed but not recovered (lost), and for killed trials whether a
   replay of the cut trace predicts the real outcome.

The result is a :class:`TrialOutcome`; :meth:`TrialOutcome.row` turns it into
a result row.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.crashsim.overlay import BaseImage
from harness.crashsim.replay import ReplayContext, evaluate, hole_excused, mark_layer
from harness.crashsim.states import committed_marks, crash_state
from harness.crashsim.trace import Trace, read_trace
from harness.errors import TrialError
from harness.report import Row
from harness.scoring import Score, expected_layers, score_recovery
from progdump.layers.plan import get_plan
from progdump.snapshot import Snapshot

if TYPE_CHECKING:  # pragma: no cover
    from harness.controller import GuestSession

__all__ = [
    "TrialSpec",
    "TrialOutcome",
    "TrialContext",
    "Captured",
    "run_trial",
    "durable_times",
    "failed_offsets",
    "agreement",
    "restore_image",
    "writer_argv",
    "recover_argv",
    "guest_sees_disk",
    "manifest_holes",
    "warm_file",
    "quiesce_host_io",
    "child_env",
]

MIB = 1 << 20
#: a reference writer that has not finished after this long is stuck, not slow
WRITER_TIMEOUT_S = 3600.0

#: the tree this code was imported from: a pinned copy in a scenario run (harness.pin), else the checkout
CODE_ROOT = str(Path(__file__).resolve().parents[1])


def child_env() -> dict[str, str]:
    """Environment for the writer and recovery processes: progdump from the same tree as this harness."""
    env = dict(os.environ)
    env["PYTHONPATH"] = CODE_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# -- pure helpers (unit-tested) -------------------------------------------------


def layer_names(plan: str) -> list[str]:
    return [s.name for s in get_plan(plan)]


def durable_times(trace: Trace, names: list[str]) -> dict[str, float]:
    """Seconds from device open to the flush that made each layer's commit durable, by layer name."""
    out: dict[str, float] = {}
    for f in sorted(trace.flushes, key=lambda r: r.t_complete):
        for m in committed_marks(trace, f.t_complete):
            k = mark_layer(m.label)
            if k is None or k >= len(names):
                continue
            out.setdefault(names[k], f.t_complete)
    return out


def open_after_event_s(trace: Trace, panic_event_ns: object) -> float | None:
    """Seconds from the panic event (QEMU's GUEST_PANICKED timestamp) to the writer opening the device.

    Both are host CLOCK_REALTIME: the event's from QMP, the open's from the
    trace header (``open_realtime_ns``). None when either is missing or the
    order is impossible (a clock step): then no from-event figure is given.
    """
    try:
        opened = int(trace.header["open_realtime_ns"])
        event = int(panic_event_ns)  # type: ignore[call-overload]
    except (KeyError, TypeError, ValueError):
        return None
    return (opened - event) / 1e9 if opened >= event else None


def failed_offsets(trace: Trace) -> set[int]:
    """Device offsets of the writes that failed on the medium (the trace's FAILED writes).

    A hole a recovery reports is believed only where the trace shows a failed
    write at that offset: the reader cannot excuse a partial layer by itself.
    """
    return {w.offset for w in trace.failed_writes}


def committed_layers(trace: Trace, t: float) -> list[int]:
    """Indices of the layers whose commit was durable at ``t`` (seconds since device open)."""
    return sorted({k for m in committed_marks(trace, t) if (k := mark_layer(m.label)) is not None})


def count_lost(
    committed: list[int], score: Score, n_layers: int, holes: set[int], reported: dict[int, list[int]]
) -> int:
    """Committed layers not recovered complete, unless a failed write explains the hole (R-WR-7)."""
    return sum(
        1
        for k in committed
        if k < n_layers
        and score.layers[k].status != "complete"
        and not hole_excused(k, score.layers[k].status, holes, reported)
    )


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


def agreement(
    real_statuses: list[str], trace: Trace, base: BaseImage, names: list[str], dump_id: str | None, older_ids: set[str]
) -> tuple[str, str]:
    """Does the replay of the cut trace at the kill predict the real outcome?

    The replayed state is the ``model`` state at the end of the cut trace:
    exactly the writes the modelled device had destaged when it was killed.
    A SIGKILL can land between a destage's pwrite and its trace record, so if
    the first comparison differs, the state with the next cached write also
    destaged is tried; agreement with it is reported as such.
    """
    ctx = ReplayContext(trace, base, names, dump_id=dump_id, older_ids=set(older_ids))
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


def manifest_holes(outdir: str) -> dict[int, list[int]]:
    """Layer index -> offsets of the failed writes the recovery manifest reports for it (R-WR-7)."""
    try:
        layers = json.loads(Path(outdir, "manifest.json").read_text()).get("layers", [])
        return {int(lay["index"]): [int(h["offset"]) for h in lay["holes"]] for lay in layers if lay.get("holes")}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def manifest_dump_id(outdir: str) -> str | None:
    try:
        return str(json.loads(Path(outdir, "manifest.json").read_text()).get("dump_id"))
    except (OSError, ValueError, AttributeError):
        return None


# -- the guest side ------------------------------------------------------------------


def guest_sees_disk(g: GuestSession, image: str) -> tuple[bool, str]:
    """The rebooted guest reads the dump disk: its first 64 KiB hash matches the host's."""
    size = os.path.getsize(image)
    out = g.run("for b in /sys/block/*; do [ -e $b/device ] && echo ${b##*/} $(cat $b/size); done").text
    dev = None
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and int(parts[1]) * 512 == size:
            dev = parts[0]
    if dev is None:
        return False, f"no guest block device of {size} bytes (saw: {out.strip()[:200]})"
    out = g.run(f"head -c 65536 /dev/{dev} | md5sum").text
    with open(image, "rb") as f:
        want = hashlib.md5(f.read(65536)).hexdigest()
    got = out.split()[0] if out.split() else ""
    return got == want, f"/dev/{dev} md5 {got} (host {want})"


# -- one trial ----------------------------------------------------------------------------


@dataclass
class Captured:
    """One panic as the writer gets it: the ELF it reads, the snapshot loaded from it, the markers."""

    elf: str
    snapshot: Snapshot
    markers: dict[str, Any]
    expected: dict[str, Any] = field(default_factory=dict)  # plan -> expected layers (computed once per plan)

    def expected_for(self, plan: str) -> Any:
        if plan not in self.expected:
            self.expected[plan] = expected_layers(self.snapshot, plan)
        return self.expected[plan]


@dataclass(frozen=True)
class TrialSpec:
    """What to run: ``kill_after_s`` None is a reference run (to the end, no reset)."""

    model: str
    plan: str
    name: str  # file names: traces/<name>.trace, recovered/<name>/
    trial: int = -1  # the row's trial number (-1: reference)
    kill_after_s: float | None = None


@dataclass
class TrialContext:
    """What every trial of a run shares: the scenario, the guest, the disk images, the older dump."""

    scenario: Any  # harness.scenario.Scenario
    session: GuestSession | None  # None: reference runs of a unit test, no VM to reset
    work: Path
    image: str
    base: str
    older_ids: set[str] = field(default_factory=set)


@dataclass
class TrialOutcome:
    """Everything one trial measured. ``t_s``: kill time (killed) or the trace's end (reference)."""

    spec: TrialSpec
    names: list[str]
    trace_path: str
    outdir: str
    killed: bool
    t_s: float
    score: Score
    older_returned: bool
    committed: list[int]
    lost: int
    durable: dict[str, float]  # layer name -> seconds from device open (complete writers only)
    failed_writes: int
    reported_holes: dict[int, list[int]]
    #: layer name -> seconds from the panic event (GUEST_PANICKED) to durable: what an operator waits
    durable_after_event: dict[str, float] = field(default_factory=dict)
    agreement: str = "n/a"
    reasons: list[str] = field(default_factory=list)
    writer_rc: int | None = None
    writer_err: str = ""

    @property
    def complete(self) -> bool:
        return not self.killed

    def row(self, sc_name: str, guest: str, seed: int) -> Row:
        return Row(
            scenario=sc_name,
            guest=guest,
            device_model=self.spec.model,
            plan=self.spec.plan,
            source="real",
            trial=self.spec.trial,
            index=-1,
            kind="killed" if self.killed else "complete",
            seed=seed,
            t_ms=round(self.t_s * 1e3, 3),
            layers_total=len(self.names),
            layers_recovered=self.score.layers_recovered,
            statuses="/".join(self.score.statuses()),
            committed=len(self.committed),
            committed_lost=self.lost,
            false_accept=int(self.score.false_accept),
            bytes_recovered=self.score.bytes_recovered,
            verified="full",
            agreement=self.agreement,
            trace=self.trace_path,
            reasons=" | ".join(self.reasons)[:2000],
            t_s=self.t_s,
        )


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


def _run_writer(argv: list[str], trace: str, kill_after_s: float | None) -> tuple[int | None, str, float | None]:
    """Run the writer; killed trials get SIGKILL ``kill_after_s`` after its device opened.

    Returns (exit status or None when killed, stderr tail, kill time in seconds since device open).
    """
    if kill_after_s is None:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, env=child_env(), timeout=WRITER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise TrialError(f"the writer did not finish within {WRITER_TIMEOUT_S:.0f} s: {' '.join(argv)}") from None
        return p.returncode, p.stderr.strip()[-300:], None
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=child_env()
    )
    try:
        open_ns = _wait_trace_open(trace, proc, 120.0)
        kill_ns = None
        if open_ns is not None:
            target = open_ns + int(kill_after_s * 1e9)
            while proc.poll() is None:
                now = time.monotonic_ns()
                if now >= target:
                    os.kill(proc.pid, signal.SIGKILL)
                    kill_ns = time.monotonic_ns()
                    break
                time.sleep(min(0.001, (target - now) / 1e9))
        else:
            proc.kill()
    finally:
        if proc.poll() is None and kill_ns is None:
            proc.kill()
        proc.wait()
    if kill_ns is not None and open_ns is not None:
        return None, "", (kill_ns - open_ns) / 1e9
    return proc.returncode, "", None


def recover(image: str, outdir: str) -> tuple[int, str]:
    """``progdump recover`` into a fresh ``outdir``; (exit status, its output)."""
    if os.path.exists(outdir):
        shutil.rmtree(outdir)
    p = subprocess.run(recover_argv(image, outdir), capture_output=True, text=True, timeout=600, env=child_env())
    return p.returncode, (p.stdout + p.stderr).strip()


def score_real(outdir: str, rc: int, cap: Captured, plan: str, older_ids: set[str]) -> tuple[Score, bool]:
    """Score a real recovery; an older dump returned counts as nothing recovered of this one."""
    expected = cap.expected_for(plan)
    if rc != 0 or not os.path.exists(os.path.join(outdir, "manifest.json")):
        return score_recovery(None, cap.snapshot, expected, cap.markers), False
    did = manifest_dump_id(outdir)
    if did in older_ids:
        s = score_recovery(None, cap.snapshot, expected, cap.markers)
        s.found = True
        s.dump_id = did
        return s, True
    return score_recovery(outdir, cap.snapshot, expected, cap.markers), False


def drop_vmcore(outdir: str) -> None:
    """Scored recoveries keep their manifest and artifacts; the vmcore (~RAM size) goes (disk space)."""
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(outdir, "vmcore"))


def run_trial(ctx: TrialContext, cap: Captured, spec: TrialSpec) -> TrialOutcome:
    """Run one trial (see the module docstring) and return what it measured."""
    names = layer_names(spec.plan)
    restore_image(ctx.base, ctx.image)
    quiesce_host_io()
    trace = str(ctx.work / "traces" / f"{spec.name}.trace")
    os.makedirs(os.path.dirname(trace), exist_ok=True)
    rc, err, t_kill = _run_writer(
        writer_argv(cap.elf, ctx.image, spec.plan, spec.model, trace), trace, spec.kill_after_s
    )
    reasons: list[str] = []
    if spec.kill_after_s is not None and ctx.session is not None:
        ctx.session.reset()
        seen, how = guest_sees_disk(ctx.session, ctx.image)
        if not seen:
            reasons.append(f"guest did not see the dump disk after reset: {how}")
    elif rc not in (0, None):
        reasons.append(f"writer exited {rc}: {err}")
    outdir = str(ctx.work / "recovered" / spec.name)
    rrc, msg = recover(ctx.image, outdir)
    score, older = score_real(outdir, rrc, cap, spec.plan, ctx.older_ids)
    tr = read_trace(trace)
    try:
        killed = t_kill is not None
        t_s = t_kill if t_kill is not None else tr.end_time
        committed = committed_layers(tr, t_s)
        holes = failed_offsets(tr)
        reported = manifest_holes(outdir)
        lost = count_lost(committed, score, len(names), holes, reported)
        durable = {} if killed else durable_times(tr, names)
        lead = open_after_event_s(tr, cap.snapshot.metadata.get("panic_event_ns"))
        after_event = {k: v + lead for k, v in durable.items()} if lead is not None else {}
        ag = "n/a"
        if spec.kill_after_s is not None:
            with BaseImage(ctx.base, os.path.getsize(ctx.base)) as bi:
                ag, why = agreement(score.statuses(), tr, bi, names, None if older else score.dump_id, ctx.older_ids)
            if why:
                reasons.append(why)
        failed = len(tr.failed_writes)
    finally:
        tr.close()
    reasons = list(score.reasons) + reasons
    if score.markers:
        reasons.append("markers: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in score.markers.items()))
    if older:
        reasons.append("the older dump was returned: nothing of this dump was durable")
    if rrc not in (0, 2) or (rrc == 2 and spec.kill_after_s is None):
        reasons.append(f"recover exit {rrc}: {msg[-200:]}")
    out = TrialOutcome(
        spec=spec,
        names=names,
        trace_path=trace,
        outdir=outdir,
        killed=killed,
        t_s=t_s,
        score=score,
        older_returned=older,
        committed=committed,
        lost=lost,
        durable=durable,
        durable_after_event=after_event,
        failed_writes=failed,
        reported_holes=reported,
        agreement=ag,
        reasons=reasons,
        writer_rc=rc,
        writer_err=err,
    )
    return out
