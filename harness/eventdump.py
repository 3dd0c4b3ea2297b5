"""Dumps timed from the panic event: a writer armed before the panic (issue 13, target 3).

Why a separate path: a trial's ``progdump write`` starts after the snapshot
was saved as an ELF, so its "from event" figure is mostly the ELF save and
the process start. A kernel's dump path is resident; here that is
``python3 -m progdump.resident`` (:class:`ResidentWriter`), started and
armed on the dump disk before the panic, handed the go line by the
controller the moment ``GUEST_PANICKED`` is received
(:meth:`harness.controller.GuestSession.panic` with ``at_event``). It stays
its own process, so a SIGKILL still models a reset.

The clocks (docs/SCENARIOS.md, "Event dumps"):

* **event instant**: host ``CLOCK_MONOTONIC`` when the controller's QMP
  reader handed it the ``GUEST_PANICKED`` event
  (``PanicResult.event_rx_monotonic_ns``). QEMU's own timestamp of the event
  is ``CLOCK_REALTIME``; the difference (QMP delivery) is reported beside;
* **durable instant**: the trace's modelled completion time of the flush
  that made the layer's commit durable (:func:`harness.trial.durable_times`),
  in seconds since the writer's device opened, plus the trace header's
  ``open_monotonic_ns`` (the writer's ``time.monotonic()`` at open, the same
  system-wide clock). The modelled device never lets host time fall behind
  its clock, and pacing returns once host time reached it.

:func:`after_event_ms` is that arithmetic; :func:`recover_layer0_alone`
replays the device as it was at layer 0's commit (flushed writes only, so
layer 0 and nothing after it) and recovers it; :func:`console_expectations`
reads what the kernel printed on the serial console, the independent source
the recovery is checked against (:func:`check_layer0`).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from harness.crashsim.overlay import BaseImage, OverlaySource
from harness.crashsim.states import crash_state
from harness.crashsim.trace import Trace, read_trace
from harness.errors import TrialError

__all__ = [
    "ResidentWriter",
    "resident_argv",
    "after_event_ms",
    "ConsoleExpect",
    "console_expectations",
    "recover_layer0_alone",
    "check_layer0",
    "Layer0Check",
]

#: lines of the kernel log printed between the trigger and the panic line that layer 0 must hold
LOG_LINES = 6
#: bounds on console text we parse (untrusted guest output)
MAX_CONSOLE = 4 << 20
MAX_LINE = 4096


# -- the arithmetic --------------------------------------------------------------------------


def after_event_ms(trace: Trace, names: list[str], event_rx_monotonic_ns: int) -> dict[str, float]:
    """Milliseconds from the panic event's reception to each layer's commit being durable, by layer name.

    ``open_monotonic_ns`` (trace header) + the durable flush's modelled
    completion (seconds since open) - ``event_rx_monotonic_ns``; all on the
    host's CLOCK_MONOTONIC. A layer durable before the event is impossible
    (a clock or wiring mistake) and raises :class:`TrialError`.
    """
    from harness.trial import durable_times  # noqa: PLC0415 - harness.trial imports much; keep this module light

    opened = trace.header.get("open_monotonic_ns")
    if not isinstance(opened, int) or isinstance(opened, bool):
        raise TrialError("trace header has no open_monotonic_ns: cannot time layers from the panic event")
    out: dict[str, float] = {}
    for name, t in durable_times(trace, names).items():
        ms = (opened + t * 1e9 - event_rx_monotonic_ns) / 1e6
        if ms < 0:
            raise TrialError(f"layer {name} durable {-ms:.3f} ms before the panic event: clocks mixed up")
        out[name] = round(ms, 3)
    return out


# -- the resident writer process ---------------------------------------------------------------


def resident_argv(device: str, plan: str, model: str, trace: str) -> list[str]:
    return [
        sys.executable, "-m", "progdump.resident", device, "--plan", plan, "--device-model", model, "--trace", trace,
    ]  # fmt: skip


class ResidentWriter:
    """``python3 -m progdump.resident`` as a child: armed at construction, then :meth:`go`, :meth:`wait`.

    Its own session (a SIGKILL of the group is a reset); stdout lines read
    by a thread; stderr to a file (bounded tail kept for errors).
    """

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        pass_fds: tuple[int, ...] = (),
        arm_timeout: float = 120.0,
        stderr_path: str | None = None,
    ) -> None:
        if stderr_path is None:
            fd, stderr_path = tempfile.mkstemp(prefix="pd-resident-", suffix=".err")
            os.close(fd)
        self._err_path = stderr_path
        self._err = open(self._err_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
            env=env, pass_fds=pass_fds, start_new_session=True,
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()
        self.armed = self._next_json(arm_timeout, "arming")
        if not self.armed.get("armed"):
            err = self.armed.get("error", "no reason given")
            self.close()
            raise TrialError(f"resident writer did not arm: {err}")
        self.go_sent_monotonic_ns: int | None = None
        self.sent: dict[str, Any] | None = None  # the go message handed over (ground truth of the dump)
        self.go_error = ""

    def _read(self, f: IO[bytes]) -> None:
        for raw in f:
            self.lines.put(raw[: MAX_LINE * 64].decode("utf-8", "replace").rstrip("\n"))
        self.lines.put(None)

    def _next_json(self, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TrialError(f"resident writer: nothing within {timeout:.0f} s while {what}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise TrialError(f"resident writer exited while {what}: {self.stderr_tail()}")
            self.seen.append(line)
            if line.startswith("{"):
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    return obj

    def go(self, msg: dict[str, Any]) -> None:
        """Hand over the captured state (one line on stdin). Called on the controller's loop thread."""
        data = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except OSError as e:  # the writer died after arming: wait() reports it with its stderr
            self.go_error = f"{type(e).__name__}: {e}"
            return
        self.go_sent_monotonic_ns = time.monotonic_ns()
        self.sent = msg

    def wait(self, timeout: float) -> dict[str, Any]:
        """The writer's final JSON line (``done``), after it exited."""
        fin = self._next_json(timeout, "writing the dump")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)
        if not fin.get("done"):
            raise TrialError(f"resident writer failed: {fin.get('error', fin)}")
        return fin

    def stderr_tail(self, n: int = 600) -> str:
        with contextlib.suppress(OSError), open(self._err_path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - n))
            return f.read().decode("utf-8", "replace").strip()
        return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def close(self) -> None:
        """Kill if still running (a disarm that cannot hang), reap, drop the stderr file."""
        self.kill()
        for s in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError, ValueError):
                if s is not None:
                    s.close()
        self._err.close()
        with contextlib.suppress(OSError):
            os.unlink(self._err_path)


# -- what the console showed (the independent source) ------------------------------------------

_TS = re.compile(r"^\[\s*\d+\.\d+\]\s?(.*)$")
_PANIC = re.compile(r"^\s*Kernel panic - not syncing: (.*?)\s*$")
_FRAME = re.compile(r"^\s*(\?\s+)?([A-Za-z_][\w.]*)\+0x[0-9a-f]+/0x[0-9a-f]+")


@dataclass(frozen=True)
class ConsoleExpect:
    """What the kernel printed on the serial console around its panic."""

    panic_message: str
    frames: tuple[str, ...]  # functions of the reliable frames of the printed Call Trace, in order
    log_lines: tuple[str, ...]  # kernel log lines printed before the panic line (time stamps stripped)


def console_expectations(text: str, log_lines: int = LOG_LINES) -> ConsoleExpect:
    """Parse the console text of one panic (from just before its trigger); ValueError if it shows none.

    The Call Trace is the one printed after the panic line (``dump_stack``
    in ``panic()``), or, when the kernel printed none there (a panic after
    an oops), the last one printed before it. Frames marked ``?`` (stack
    words the unwinder did not trust) are left out.
    """
    text = text[-MAX_CONSOLE:]
    lines = []
    for raw in text.replace("\r", "").split("\n"):
        raw = raw[:MAX_LINE]
        m = _TS.match(raw)
        lines.append((m is not None, m.group(1) if m else raw))
    at = next((i for i in range(len(lines) - 1, -1, -1) if _PANIC.search(lines[i][1])), None)
    if at is None:
        raise ValueError("the console shows no 'Kernel panic - not syncing:' line")
    msg = _PANIC.search(lines[at][1]).group(1)  # type: ignore[union-attr]

    def trace_from(start: int) -> tuple[str, ...]:
        out = []
        for _, body in lines[start + 1 :]:
            if "</TASK>" in body or "Call Trace:" in body or _PANIC.search(body) or "---[ end" in body:
                break
            fm = _FRAME.match(body)
            if fm and not fm.group(1):
                out.append(fm.group(2))
        return tuple(out)

    after = [i for i in range(at + 1, len(lines)) if "Call Trace:" in lines[i][1]]
    before = [i for i in range(at) if "Call Trace:" in lines[i][1]]
    frames = trace_from(after[0]) if after else (trace_from(before[-1]) if before else ())
    first_trace_line = before[-1] if (before and not after) else at
    logged = [b for ts, b in lines[:first_trace_line] if ts and b.strip()]
    return ConsoleExpect(msg, frames, tuple(logged[-log_lines:]))


# -- layer 0 alone --------------------------------------------------------------------------------


@dataclass
class Layer0Check:
    """Layer 0 recovered alone from the device state at its commit, checked against the console."""

    t_s: float  # layer 0's durable time, seconds since device open (the replayed moment)
    statuses: list[str]
    problems: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)  # what was compared: counts

    @property
    def ok(self) -> bool:
        return not self.problems


def recover_layer0_alone(trace_path: str, base_image: str, names: list[str], outdir: str) -> tuple[float, list[str]]:
    """Replay the device as it was when layer 0's commit became durable and recover it into ``outdir``.

    The crash state is ``prefix`` at that moment: every write covered by a
    flush completed by then (layer 0 and the records before it), nothing
    later, the older dump everywhere else. Returns (that moment, per-layer
    statuses from the recovery manifest).
    """
    from harness.trial import durable_times  # noqa: PLC0415
    from progdump import reader  # noqa: PLC0415
    from progdump.export import export  # noqa: PLC0415

    tr = read_trace(trace_path)
    try:
        dur = durable_times(tr, names)
        if names[0] not in dur:
            raise TrialError(f"{trace_path}: layer 0 ({names[0]}) never became durable")
        t0 = dur[names[0]]
        st = crash_state(tr, t0, "prefix", 0)
        with BaseImage(base_image, os.path.getsize(base_image)) as bi:
            ov = OverlaySource(bi, tr, st)
            if os.path.exists(outdir):
                shutil.rmtree(outdir)
            export(reader.scan(ov), outdir)
    finally:
        tr.close()
    man = json.loads(Path(outdir, "manifest.json").read_text())
    statuses = ["missing"] * len(names)
    for lay in man.get("layers", []):
        i = int(lay.get("index", -1))
        if 0 <= i < len(names):
            statuses[i] = str(lay.get("status"))
    return t0, statuses


def _read(path: Path, limit: int = 64 << 20) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return ""


def check_layer0(outdir: str, statuses: list[str], expect: ConsoleExpect, kmsg_marker: str = "") -> list[str]:
    """Problems with a layer-0-alone recovery (empty: it holds what the console showed).

    Layer 0 complete and no later layer complete; ``panic.txt`` names the
    panic message; ``dmesg.txt`` (the kernel's log, rendered from layer 0's
    raw ring pages) holds the panic line, every reliable frame of the Call
    Trace in the printed order, the log lines printed before the panic and
    the guest's planted log line (``kmsg_marker``, from boot).
    """
    problems: list[str] = []
    if not statuses or statuses[0] != "complete":
        problems.append(f"layer 0 not complete: {'/'.join(statuses)}")
    late = [i for i, s in enumerate(statuses[1:], 1) if s == "complete"]
    if late:
        problems.append(f"not layer 0 alone: layers {late} complete too")
    panic = _read(Path(outdir, "panic.txt"))
    dmesg = _read(Path(outdir, "dmesg.txt"))
    if not panic:
        problems.append("no panic.txt")
    elif expect.panic_message not in panic:
        problems.append(f"panic.txt lacks the panic message {expect.panic_message!r}")
    if not dmesg:
        problems.append("no dmesg.txt")
        return problems
    if f"Kernel panic - not syncing: {expect.panic_message}" not in dmesg:
        problems.append("dmesg.txt lacks the panic line")
    if not expect.frames:
        problems.append("the console showed no Call Trace to compare with")
    pos = dmesg.rfind("Call Trace:")
    for fn in expect.frames:
        hit = re.search(rf"\s{re.escape(fn)}\+0x", dmesg[pos:]) if pos >= 0 else None
        if hit is None:
            problems.append(f"dmesg.txt lacks backtrace frame {fn} (in order after 'Call Trace:')")
            break
        pos += hit.end()
    for ln in expect.log_lines:
        if ln.strip() not in dmesg:
            problems.append(f"dmesg.txt lacks the log line {ln.strip()[:100]!r}")
    if kmsg_marker and kmsg_marker not in dmesg:
        problems.append(f"dmesg.txt lacks the planted log line {kmsg_marker[:80]!r}")
    return problems
