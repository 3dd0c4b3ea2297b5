"""The sync facade over the async machine: boot, run, panic, capture, reset.

Why a facade: the scenario runner, the tests and the CLI think in steps;
QMP, the console and the command channel are concurrent streams. A
:class:`GuestSession` runs the async :class:`~harness.qemu.machine.Machine`
on a private event-loop thread and exposes one blocking call per step, each
timed. It is a context manager and never leaves QEMU behind (see
``harness/qemu/machine.py`` for the rules). Example in docs/GUESTS.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from harness.errors import BootError, CommandError, GuestTimeout, HarnessError, PanicError
from harness.guests import get_profile
from harness.guests.base import GuestProfile, parse_marker_json
from harness.qemu.accel import PROBE_SECONDS, choose_accel
from harness.qemu.argv import DiskSpec, MachineConfig
from harness.qemu.capture import capture_state, read_layout, read_notes, read_registers
from harness.qemu.cmdchan import CommandResult
from harness.qemu.console import Pattern, first_match
from harness.qemu.machine import Machine, RunDir
from harness.timeouts import Timeouts, timeouts_for
from progdump.snapshot import Snapshot

__all__ = [
    "GuestSession",
    "BootResult",
    "PanicResult",
    "CommandResult",
    "Handoff",
    "probe_kvm",
    "event_time_ns",
    "stop_after_panic",
]

T = TypeVar("T")
MiB = 1 << 20


@dataclass(frozen=True)
class BootResult:
    boot_id: str  # the guest's per-boot nonce
    seconds: float  # cont (or system_reset) to the ready line
    markers: dict[str, Any]


@dataclass(frozen=True)
class PanicResult:
    trigger: str
    trigger_ns: int  # host CLOCK_REALTIME when the trigger was sent
    event_ns: int  # QEMU's timestamp of GUEST_PANICKED
    event_latency_ms: float  # trigger sent -> event received
    stop_ms: float  # event received -> VM stopped
    panic_string: str  # from "Kernel panic - not syncing: ..." on the console
    console_complete: bool  # the panic's last line reached the console before the stop
    status: str  # QMP run state after the stop (expected "paused")
    #: host CLOCK_MONOTONIC (ns) when the controller received GUEST_PANICKED: the "from event" instant
    event_rx_monotonic_ns: int = 0
    event_rx_ns: int = 0  # the same instant on CLOCK_REALTIME (event_rx_ns - event_ns: QMP delivery)
    #: at_event panics: ms from reception to the stop returning, the registers read, the go line handed over
    handoff_ms: dict[str, float] = field(default_factory=dict)


def event_time_ns(ev: dict[str, Any], fallback_ns: int) -> int:
    """QEMU's own timestamp of a QMP event (CLOCK_REALTIME ns); ``fallback_ns`` when it has none."""
    ts = ev.get("timestamp") or {}
    try:
        return int(ts["seconds"]) * 1_000_000_000 + int(ts["microseconds"]) * 1000
    except (KeyError, TypeError, ValueError):
        return fallback_ns


async def stop_after_panic(
    m: Machine, trigger: str, trigger_ns: int, event_ns: int, t0: float, t_ev: float, cursor: int,
    start_pat: Pattern, end_pat: Pattern, console_timeout: float, rx_mono_ns: int = 0, rx_ns: int = 0,
) -> PanicResult:  # fmt: skip
    """After GUEST_PANICKED: let the console print the panic's last line (bounded), stop the VM, report.

    Shared by every way a panic is induced (the controller's triggers, a scenario setup's stall),
    so each measures the same instants: ``t0`` trigger sent, ``t_ev`` event received (monotonic s).
    """
    complete = True
    try:
        await m.console.wait_for([end_pat], since=cursor, timeout=console_timeout)
    except (TimeoutError, EOFError):
        complete = False
    await m.stop()
    t_stop = time.monotonic()
    hit = first_match(m.console.buffer.lines_since(cursor), [start_pat])
    status = await m.status()
    return PanicResult(
        trigger=trigger,
        trigger_ns=trigger_ns,
        event_ns=event_ns,
        event_latency_ms=(t_ev - t0) * 1000,
        stop_ms=(t_stop - t_ev) * 1000,
        panic_string=hit.group(1) if hit else "",
        console_complete=complete,
        status=status,
        event_rx_monotonic_ns=rx_mono_ns,
        event_rx_ns=rx_ns,
    )


@dataclass(frozen=True)
class Handoff:
    """What a resident dump path needs at the panic, prepared once per boot, before it.

    Why before: at ``GUEST_PANICKED`` only the registers are new; the RAM
    layout (QEMU's flat map) and VMCOREINFO (published by the kernel at boot,
    fixed until a kexec loads a crash kernel, which this guest never does)
    are known earlier, and reading VMCOREINFO costs a one-page
    ``dump-guest-memory`` (2-15 ms) that the 20 ms budget cannot hold.
    ``ram_fd`` is the harness's read-only descriptor of QEMU's shared RAM
    file: a child started with ``pass_fds=(ram_fd,)`` opens it as
    ``/proc/self/fd/<ram_fd>`` (the file itself is already unlinked).
    """

    boot_id: str
    ram_fd: int
    ranges: tuple[tuple[int, int, int], ...]  # (guest-physical start, file offset, size)
    vmcoreinfo: str
    prepare_ms: float


class _Loop:
    """An asyncio loop on a daemon thread; ``call`` runs a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="progdump-guest", daemon=True)
        self.thread.start()

    def call(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        try:
            return fut.result(timeout)
        except BaseException:
            fut.cancel()
            raise

    def close(self) -> None:
        if self.loop.is_closed():
            return
        # the default executor's worker threads (run_in_executor) would outlive the session otherwise
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.loop.shutdown_default_executor(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


class GuestSession:
    """One guest under QEMU, step by step. See the module docstring.

    ``dump_disk``: a raw image given to the guest as virtio-blk with serial
    ``pddump`` (created sparse at 64 MiB if missing). ``disks``: more images
    (paths or :class:`DiskSpec`). ``accel``: ``auto`` (KVM only after a probe
    boot proves it, else TCG), ``tcg`` or ``kvm``; ``PROGDUMP_ACCEL``
    overrides ``auto``. ``knobs``: guest settings (Linux: ``panic_print``,
    ``hung_task_panic`` ...). ``shared_ram``: guest RAM on a shared file
    (zero-copy capture); False makes capture fall back to ``pmemsave``.
    ``ssh``: forward a free 127.0.0.1 port to the guest's dropbear.
    ``extra_args``: more QEMU arguments, after the profile's (a scenario setup's devices).
    """

    def __init__(
        self,
        guest: str = "linux",
        mem_mib: int = 512,
        dump_disk: Path | None = None,
        workdir: Path | None = None,
        *,
        smp: int = 1,
        disks: Sequence[Path | DiskSpec] = (),
        accel: str = "auto",
        knobs: dict[str, str] | None = None,
        shared_ram: bool = True,
        ssh: bool = False,
        log: Callable[[str], None] | None = None,
        profile: GuestProfile | None = None,
        timeouts: Timeouts | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.profile = profile or get_profile(guest)
        self.guest = self.profile.name
        self.mem_mib = mem_mib
        self.smp = smp
        self.dump_disk = Path(dump_disk) if dump_disk is not None else None
        self.disks = [d if isinstance(d, DiskSpec) else DiskSpec(Path(d), f"disk{i}") for i, d in enumerate(disks)]
        # A private fresh directory (mkdtemp: 0700, a name nobody can predict or plant beforehand),
        # not /tmp/progdump-<pid>, which another user could create first and fill with links.
        self.workdir = (
            Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"progdump-{self.guest}-"))
        )
        self.accel_request = accel
        self.knobs = dict(knobs or {})
        self.shared_ram = shared_ram
        self.ssh = ssh
        self.extra_args = tuple(extra_args)  # more QEMU arguments (a scenario setup's devices)
        self.ssh_port: int | None = None
        self._log = log or logging.getLogger("harness.guest").info  # accel choice, step timings
        self._timeouts_override = timeouts
        self.t: Timeouts = timeouts or timeouts_for("tcg")
        self.accel: str | None = None
        self.accel_reason = ""
        self.machine: Machine | None = None
        self.markers: dict[str, Any] = {}
        self.boot_id: str | None = None
        self.timings: dict[str, float] = {}  # last duration of each step, seconds
        self.history: list[tuple[str, float]] = []
        self.last_panic: PanicResult | None = None
        self._panic_cursor = 0
        self._loop: _Loop | None = None
        self._live: list[weakref.ref[Snapshot]] = []
        self._closed = False

    # ---- plumbing ----------------------------------------------------------------------
    def log(self, msg: str) -> None:
        self._log(f"[{self.guest}] {msg}")

    def _step(self, name: str, t0: float) -> float:
        dt = time.monotonic() - t0
        self.timings[name] = dt
        self.history.append((name, dt))
        self.log(f"{name}: {dt * 1000:.0f} ms")
        return dt

    def call(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        """Run a coroutine on the session's loop (for direct Machine use)."""
        if self._loop is None:
            raise HarnessError("session not started (use it as a context manager or call start())")
        return self._loop.call(coro, timeout)

    @property
    def m(self) -> Machine:
        if self.machine is None:
            raise HarnessError("no running machine: call boot() first")
        self.machine.check_alive("earlier")  # QemuExited with status and log tail
        if not self.machine.alive():
            raise HarnessError("the machine was closed")
        return self.machine

    def __enter__(self) -> GuestSession:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if self._loop is None:
            self.profile.check_image()
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._loop = _Loop()

    def close(self) -> None:
        """Quit QEMU (kill if needed), stop the loop thread. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.machine is not None and self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.call(self.machine.close(), 30)
        finally:
            if self.machine is not None and self.machine.proc is not None and self.machine.proc.poll() is None:
                self.machine.proc.kill()
                self.machine.proc.wait(10)
            if self._loop is not None:
                self._loop.close()

    # ---- configuration --------------------------------------------------------------------
    def _config(self, rundir: RunDir, create: bool = True) -> MachineConfig:
        spec = self.profile.boot_spec(self.knobs)
        disks = list(self.disks)
        dump = None
        if self.dump_disk is not None:
            if create and not self.dump_disk.exists():
                with open(self.dump_disk, "wb") as f:
                    f.truncate(64 * MiB)
            dump = DiskSpec(self.dump_disk, "pddump", serial="pddump")
        if spec.boot_disk is not None:
            disks.insert(0, DiskSpec(spec.boot_disk, "pdboot", fmt="qcow2"))
        if self.ssh:
            self.ssh_port = _free_port()
        assert self.accel is not None
        return MachineConfig(
            qmp_socket=rundir.qmp,
            console_socket=rundir.console,
            cmd_socket=rundir.cmd if spec.cmd_channel else None,
            mem_mib=self.mem_mib,
            smp=self.smp,
            accel=self.accel,
            kernel=spec.kernel,
            initrd=spec.initrd,
            append=spec.append,
            ram_file=rundir.ram,
            dump_disk=dump,
            disks=tuple(disks),
            ssh_port=self.ssh_port,
            extra_args=tuple(spec.extra_args) + self.extra_args,
        )

    def command_line(self) -> list[str]:
        """The QEMU argv this session would run (for ``--show-command``); starts nothing."""
        from harness.qemu.argv import build_argv

        if self.accel is None:
            self.accel = self.accel_request if self.accel_request in ("tcg", "kvm") else "tcg"
        return build_argv(self._config(RunDir.placeholder(self.shared_ram), create=False))

    # ---- steps ----------------------------------------------------------------------------
    def boot(self, timeout: float | None = None) -> BootResult:
        """Launch QEMU (first call) and wait until the guest is ready for commands."""
        self.start()
        t0 = time.monotonic()
        if self.machine is None:
            if self.accel is None:
                self.accel, self.accel_reason = choose_accel(self.accel_request, self.profile, probe_kvm)
                self.t = self._timeouts_override or timeouts_for(self.accel).scaled(self.profile.timeout_scale)
                self.log(f"accelerator: {self.accel} ({self.accel_reason})")
                self._step("accel_choice", t0)
                t0 = time.monotonic()
            rundir = RunDir(shm=self.shared_ram)
            try:
                cfg = self._config(rundir)
            except BaseException:
                rundir.remove()
                raise
            machine = Machine(cfg, rundir, self.t, self.workdir / "console.log", self.workdir / "qemu.log", self.log)
            self.call(machine.launch())  # kills QEMU and removes rundir itself on failure
            self.machine = machine
            self._step("launch", t0)
        t1 = time.monotonic()
        res = self.call(self._boot(resume=True, timeout=timeout))
        self._step("boot", t1)
        return res

    async def _boot(self, resume: bool, timeout: float | None, since: int = 0) -> BootResult:
        m = self.m
        assert m.console is not None
        t0 = time.monotonic()
        if resume:
            await m.cont()
        limit = timeout or self.t.boot
        try:
            hit = await m.console.wait_for(self.profile.ready_patterns(), since=since, timeout=limit)
        except TimeoutError:
            raise GuestTimeout(
                f"{self.guest}: no ready line within {limit:.0f} s; console tail:\n"
                f"{m.console.buffer.tail(2000).decode('utf-8', 'replace')}"
            ) from None
        except EOFError:
            m.check_alive("during boot")
            raise BootError("console closed during boot") from None
        if hit.failure:
            raise BootError(f"{self.guest}: boot failed ({hit.pattern.name}): {hit.line.decode('utf-8', 'replace')}")
        seconds = time.monotonic() - t0
        boot_id = hit.group(1)
        mk = first_match(m.console.buffer.lines_since(since), [self.profile.marker_pattern()])
        markers: dict[str, Any] = {}
        if mk is not None:
            try:
                markers = parse_marker_json(mk.group(1))
            except ValueError as e:
                raise BootError(f"{self.guest}: bad marker report: {e}") from None
        if m.cmd is not None:
            try:
                hello = await m.cmd.wait_hello(self.t.command)
            except TimeoutError:
                raise GuestTimeout("the guest's command server did not say hello") from None
            if hello != boot_id:
                raise BootError(f"command server of boot {hello} answered, expected {boot_id}")
        better = await self.profile.after_ready(m)  # e.g. SSH up and host key pinned (omnios)
        if better:
            boot_id = better
            seconds = time.monotonic() - t0
        self.markers = markers
        self.boot_id = boot_id
        return BootResult(boot_id, seconds, markers)

    def run(self, cmd: str, timeout: float | None = None, check: bool = False) -> CommandResult:
        """Run a shell command in the guest; ``check`` raises on a non-zero status."""
        m = self.m
        t0 = time.monotonic()
        limit = timeout or self.t.command
        try:
            res = self.call(m.cmd.run(cmd, limit) if m.cmd is not None else self.profile.run_command(m, cmd, limit))
        except TimeoutError:
            raise GuestTimeout(f"command did not finish within {limit:.0f} s: {cmd[:200]!r}") from None
        except (ConnectionError, OSError, ValueError) as e:
            if m.proc is not None:  # a dying QEMU closes its sockets a moment before it is reaped
                with contextlib.suppress(Exception):
                    m.proc.wait(2)
            m.check_alive("while a command ran")  # QemuExited with the log tail, if that is why
            raise CommandError(f"command channel failed: {e}: {cmd[:200]!r}") from None
        self._step("run", t0)
        if check and res.status != 0:
            raise HarnessError(f"guest command failed with status {res.status}: {cmd[:200]!r}\n{res.text[-2000:]}")
        return res

    def workload(self, kind: str, amount: int, timeout: float | None = None) -> CommandResult:
        """Give a dump layer content: ``pagecache`` / ``anon`` (MiB) or ``slab`` (entries)."""
        return self.run(self.profile.workload_script(kind, amount), timeout=timeout, check=True)

    def panic(
        self,
        trigger: str = "sysrq",
        at_event: Callable[[dict[str, Any]], None] | None = None,
        handoff: Handoff | None = None,
    ) -> PanicResult:
        """Make the guest panic; return once GUEST_PANICKED arrived and the VM is stopped.

        ``at_event`` (with the ``handoff`` :meth:`prepare_handoff` made for
        this boot) is the resident dump path: the moment the event is
        received the VM is stopped, its registers read, and
        ``at_event(go)`` is called on the session's loop thread with the go
        message of ``progdump.resident`` (shared RAM file, ranges, registers,
        VMCOREINFO, console tail, metadata). Nothing waits for the console
        first: the panic's last lines are printed later by
        :meth:`finish_console`. ``at_event`` must not block for long (write
        the line to the armed writer's stdin).
        """
        if trigger not in self.profile.triggers:
            raise ValueError(
                f"unknown trigger {trigger!r} for {self.guest} (known: {', '.join(self.profile.triggers)})"
            )
        if at_event is not None:
            if handoff is None or handoff.boot_id != self.boot_id:
                raise HarnessError("panic(at_event=...) needs the handoff prepare_handoff() made for this boot")
            if self.profile.panic_detection != "event":
                raise HarnessError(f"{self.guest}: at_event needs GUEST_PANICKED (pvpanic), not console detection")
        t0 = time.monotonic()
        res = self.call(self._panic(trigger, at_event, handoff))
        self._step("panic", t0)
        self.last_panic = res
        return res

    def prepare_handoff(self) -> Handoff:
        """RAM layout and VMCOREINFO of this boot, for a dump path armed before the panic (:class:`Handoff`)."""
        m = self.m
        if m.ram_fd is None or self.boot_id is None:
            raise HarnessError("prepare_handoff needs a booted guest with shared RAM (shared_ram=True)")
        t0 = time.monotonic()

        async def prep() -> tuple[list[Any], list[Any]]:
            blocks = await read_layout(m)
            notes, _ = await read_notes(m, self.workdir)  # a one-page dump: QEMU pauses the guest for it
            return blocks, notes

        blocks, notes = self.call(prep())
        vmci = next((n.desc for n in notes if n.name == "VMCOREINFO"), b"")
        h = Handoff(
            boot_id=self.boot_id,
            ram_fd=m.ram_fd,
            ranges=tuple((b.phys_start, b.offset, b.size) for b in blocks),
            vmcoreinfo=vmci.rstrip(b"\0").decode("utf-8", "replace"),
            prepare_ms=(time.monotonic() - t0) * 1e3,
        )
        self._step("prepare_handoff", t0)
        return h

    def finish_console(self) -> bool:
        """After an ``at_event`` panic: let the stopped guest finish printing its panic, stop it again.

        The VM was stopped the moment the event arrived, before the kernel
        printed the panic's last lines (``---[ end Kernel panic``). Run it
        until that line is on the console (at most ``panic_console``
        seconds), then stop it. Call this only once nothing reads guest
        memory as it was at the event (the writer finished, the snapshot
        was saved): the guest changes its memory while it runs. Returns
        whether the end line was seen.
        """
        m = self.m
        assert m.console is not None
        _, end_pat = self.profile.panic_patterns()
        since = self._panic_cursor
        if first_match(m.console.buffer.lines_since(since), [end_pat]) is not None:
            return True

        async def run_to_end() -> bool:
            await m.cont()
            try:
                await m.console.wait_for([end_pat], since=since, timeout=self.t.panic_console)  # type: ignore[union-attr]
                ok = True
            except (TimeoutError, EOFError):
                ok = False
            await m.stop()
            return ok

        t0 = time.monotonic()
        ok = self.call(run_to_end())
        self._step("finish_console", t0)
        if self.last_panic is not None:
            start_pat, _ = self.profile.panic_patterns()
            hit = first_match(m.console.buffer.lines_since(since), [start_pat])
            self.last_panic = replace(
                self.last_panic,
                console_complete=ok,
                panic_string=self.last_panic.panic_string or (hit.group(1) if hit else ""),
            )
        return ok

    def console_since_panic(self) -> str:
        """Console text from just before the last panic's trigger to now."""
        if self.machine is None or self.machine.console is None:
            return ""
        lines = self.machine.console.buffer.lines_since(self._panic_cursor)
        return b"\n".join(text for _, text in lines).decode("utf-8", "replace")

    async def _panic(
        self,
        trigger: str,
        at_event: Callable[[dict[str, Any]], None] | None = None,
        handoff: Handoff | None = None,
    ) -> PanicResult:
        m = self.m
        assert m.console is not None
        start_pat, end_pat = self.profile.panic_patterns()
        await self.profile.prepare_trigger(trigger, m)
        cursor = m.console.cursor()
        self._panic_cursor = cursor
        if self.profile.panic_detection == "console":
            return await self._panic_console(trigger, m, cursor, start_pat, end_pat)
        if at_event is not None:
            # QEMU itself pauses the VM at the pvpanic write (the guest's panic notifier): no `stop`
            # round trip on the way to the go line, and memory frozen at the event. Set back after.
            await m.execute("set-action", {"panic": "pause"})
        async with m.listen("GUEST_PANICKED") as lst:
            trigger_ns = time.time_ns()
            t0 = time.monotonic()
            await self.profile.trigger(trigger, m)
            try:
                ev = await m.next_event(lst, self.t.panic_event)
            except TimeoutError:
                raise PanicError(
                    f"trigger {trigger!r}: no GUEST_PANICKED within {self.t.panic_event:.0f} s; "
                    f"console tail:\n{m.console.buffer.tail(2000).decode('utf-8', 'replace')}"
                ) from None
        rx_mono_ns = time.monotonic_ns()
        rx_ns = time.time_ns()
        t_ev = rx_mono_ns / 1e9
        event_ns = event_time_ns(ev, rx_ns)
        if at_event is not None:
            assert handoff is not None
            try:
                return await self._hand_over(
                    m, trigger, trigger_ns, t0, event_ns, rx_mono_ns, rx_ns, cursor, start_pat, at_event, handoff,
                    paused_by_qemu=ev.get("data", {}).get("action") == "pause",
                )  # fmt: skip
            finally:
                await m.execute("set-action", {"panic": m.config.panic_action})
        return await stop_after_panic(
            m, trigger, trigger_ns, event_ns, t0, t_ev, cursor, start_pat, end_pat, self.t.panic_console,
            rx_mono_ns, rx_ns,
        )  # fmt: skip

    async def _hand_over(
        self,
        m: Machine,
        trigger: str,
        trigger_ns: int,
        t0: float,
        event_ns: int,
        rx_mono_ns: int,
        rx_ns: int,
        cursor: int,
        start_pat: Any,
        at_event: Callable[[dict[str, Any]], None],
        handoff: Handoff,
        paused_by_qemu: bool = False,
    ) -> PanicResult:
        """The resident path at GUEST_PANICKED: (stop,) registers, go line; nothing else before the go.

        With ``-action panic=pause`` in force (``panic()`` sets it for the
        event) QEMU has already stopped the vCPU that wrote the pvpanic
        register; otherwise the VM is stopped here first.
        """
        assert m.console is not None
        if not paused_by_qemu:
            await m.stop()
        t_stop = time.monotonic_ns()
        regs = await read_registers(m)
        t_regs = time.monotonic_ns()
        meta = {
            "os": self.profile.os,
            "release": str(self.markers.get("release", "")),
            "hostname": str(self.markers.get("hostname", "")),
            "ram_bytes": self.mem_mib * MiB,
            "guest": self.guest,
            "accel": self.accel or "",
            "boot_id": self.boot_id or "",
            "panic_event_ns": event_ns,
            "panic_event_rx_monotonic_ns": rx_mono_ns,
            "panic_trigger": trigger,
            "capture_method": "resident-shared-memory-backend",
        }
        go = {
            "ram": f"/proc/self/fd/{handoff.ram_fd}",
            "ranges": [list(r) for r in handoff.ranges],
            "cpus": [{"index": i, "regs": {k: v for k, v in r.items() if v >= 0}} for i, r in enumerate(regs)],
            "vmcoreinfo": handoff.vmcoreinfo,
            "console_tail": m.console.buffer.tail(16 * 1024).decode("utf-8", "replace"),
            "metadata": meta,
        }
        at_event(go)
        t_go = time.monotonic_ns()
        hit = first_match(m.console.buffer.lines_since(cursor), [start_pat])
        return PanicResult(
            trigger=trigger,
            trigger_ns=trigger_ns,
            event_ns=event_ns,
            event_latency_ms=(rx_mono_ns / 1e9 - t0) * 1000,
            stop_ms=(t_stop - rx_mono_ns) / 1e6,
            panic_string=hit.group(1) if hit else "",
            console_complete=False,
            status="paused",
            event_rx_monotonic_ns=rx_mono_ns,
            event_rx_ns=rx_ns,
            handoff_ms={
                "stop": round((t_stop - rx_mono_ns) / 1e6, 3),  # 0 when QEMU paused the VM itself
                "paused_by_qemu": 1.0 if paused_by_qemu else 0.0,
                "registers": round((t_regs - rx_mono_ns) / 1e6, 3),
                "go_sent": round((t_go - rx_mono_ns) / 1e6, 3),
            },
        )

    async def _panic_console(self, trigger: str, m: Machine, cursor: int, start_pat: Any, end_pat: Any) -> PanicResult:
        """No pvpanic (illumos): stop the VM the moment the panic line is on the console.

        The stop comes before the guest's own dump code can run; the panic's
        later lines (stack, dump progress) are usually not printed yet, so
        ``console_complete`` says whether the end pattern was already seen.
        ``event_ns`` is the host clock when the line was read.
        """
        assert m.console is not None
        trigger_ns = time.time_ns()
        t0 = time.monotonic()
        await self.profile.trigger(trigger, m)
        try:
            hit = await m.console.wait_for([start_pat], since=cursor, timeout=self.t.panic_event)
        except (TimeoutError, EOFError):
            raise PanicError(
                f"trigger {trigger!r}: no panic line on the console within {self.t.panic_event:.0f} s; "
                f"console tail:\n{m.console.buffer.tail(2000).decode('utf-8', 'replace')}"
            ) from None
        t_ev = time.monotonic()
        event_ns = time.time_ns()
        await m.stop()
        t_stop = time.monotonic()
        complete = first_match(m.console.buffer.lines_since(cursor), [end_pat]) is not None
        return PanicResult(
            trigger=trigger,
            trigger_ns=trigger_ns,
            event_ns=event_ns,
            event_latency_ms=(t_ev - t0) * 1000,
            stop_ms=(t_stop - t_ev) * 1000,
            panic_string=hit.group(1),
            console_complete=complete,
            status=await m.status(),
        )

    def capture(self, method: str = "auto") -> Snapshot:
        """Snapshot of the stopped guest (zero-copy over guest RAM when shared).

        A shared-RAM snapshot is a live view of the guest's memory: it stays
        exact while the guest is stopped. :meth:`reset` first copies any such
        snapshot still open (``preserve_snapshots``), so it stays exact after.
        """
        m = self.m
        assert m.console is not None
        t0 = time.monotonic()
        meta: dict[str, Any] = {
            "os": self.profile.os,
            "release": str(self.markers.get("release", "")),
            "hostname": str(self.markers.get("hostname", "")),
            "ram_bytes": self.mem_mib * MiB,
            "guest": self.guest,
            "accel": self.accel,
            "boot_id": self.boot_id,
        }
        if self.last_panic is not None:
            meta.update(
                panic_event_ns=self.last_panic.event_ns,
                panic_trigger=self.last_panic.trigger,
                panic_string=self.last_panic.panic_string,
            )
        res = self.call(capture_state(m, self.workdir, method, m.console.buffer.tail(64 * 1024), meta))
        snap = res.snapshot
        snap.notes.extend(self.profile.snapshot_notes())  # e.g. the illumos symbol manifest
        vmci = snap.vmcoreinfo or {}
        if vmci.get("OSRELEASE"):
            snap.metadata["release"] = vmci["OSRELEASE"]
        if res.warnings:
            self.log("capture warnings: " + "; ".join(res.warnings))
        if snap.metadata.get("capture_method") == "shared-memory-backend":
            self._live.append(weakref.ref(snap))
        self._step("capture", t0)
        if self.last_panic is not None:
            self.timings["event_to_snapshot"] = (time.time_ns() - self.last_panic.event_ns) / 1e9
        return snap

    def reset(self, preserve_snapshots: bool = True, timeout: float | None = None) -> BootResult:
        """Hard reset (``system_reset`` + ``cont``) and wait until ready again."""
        m = self.m
        assert m.console is not None
        t0 = time.monotonic()
        if preserve_snapshots:
            self._detach_snapshots()
        if m.cmd is not None:
            self.call(self._expect_restart())
        cursor = m.console.cursor()
        self.call(m.system_reset())
        self.last_panic = None
        res = self.call(self._boot(resume=False, timeout=timeout, since=cursor))
        self._step("reset", t0)
        return res

    async def _expect_restart(self) -> None:
        assert self.m.cmd is not None
        self.m.cmd.expect_restart()

    def _detach_snapshots(self) -> None:
        """Copy RAM under still-open shared snapshots into private memory (guest is stopped)."""
        for ref in self._live:
            snap = ref()
            if snap is None or not snap.maps_memory:
                continue
            t0 = time.monotonic()
            snap.detach()
            self._step("detach_snapshot", t0)
        self._live.clear()

    # ---- disks, ssh ------------------------------------------------------------------------
    def add_disk(self, path: Path, disk_id: str, bus: str = "scsi", serial: str | None = None) -> None:
        t0 = time.monotonic()
        self.call(self.m.add_disk(DiskSpec(Path(path), disk_id, bus=bus, serial=serial)))
        self._step("add_disk", t0)

    def remove_disk(self, disk_id: str) -> None:
        t0 = time.monotonic()
        self.call(self.m.remove_disk(disk_id))
        self._step("remove_disk", t0)

    def hotplug(self, nodes: list[dict[str, Any]], device: dict[str, Any]) -> None:
        """Generic hot-plug (iSCSI LUN, NBD ...): see :meth:`Machine.hotplug`."""
        t0 = time.monotonic()
        self.call(self.m.hotplug(nodes, device))
        self._step("hotplug", t0)

    def unplug(self, device_id: str) -> None:
        t0 = time.monotonic()
        self.call(self.m.unplug(device_id))
        self._step("unplug", t0)

    def ssh_client(self, timeout: float = 30.0) -> Any:
        """A connected paramiko SSHClient (needs ``ssh=True``); host key pinned from the image."""
        import paramiko

        if self.ssh_port is None:
            raise HarnessError("session started without ssh=True")
        creds = self.profile.ssh_credentials()
        if creds is None:
            raise HarnessError(f"guest {self.guest} declares no SSH credentials")
        key = paramiko.Ed25519Key.from_private_key_file(str(creds.key_file))
        client = paramiko.SSHClient()
        kt, kb = creds.host_key.split()[:2]
        client.get_host_keys().add(f"[127.0.0.1]:{self.ssh_port}", kt, paramiko.Ed25519Key(data=base64.b64decode(kb)))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(
            "127.0.0.1",
            port=self.ssh_port,
            username=creds.user,
            pkey=key,
            timeout=timeout,
            allow_agent=False,
            look_for_keys=False,
        )
        return client

    @property
    def console_text(self) -> str:
        if self.machine is None or self.machine.console is None:
            return ""
        return self.machine.console.buffer.text()


def probe_kvm(profile: GuestProfile, seconds: float = PROBE_SECONDS) -> tuple[bool, str]:
    """Boot ``profile`` under KVM once; (works, why)."""
    t = timeouts_for("kvm")
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="progdump-kvm-probe-"))
    try:
        with GuestSession(profile=profile, accel="kvm", mem_mib=256, shared_ram=False, workdir=work, timeouts=t) as s:
            s.boot(timeout=seconds)
        shutil.rmtree(work, ignore_errors=True)
        return True, f"probe boot reached ready in {time.monotonic() - t0:.1f} s"
    except HarnessError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return False, (
            f"probe boot under KVM failed after {time.monotonic() - t0:.1f} s: {first[:200]} (logs in {work})"
        )


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
