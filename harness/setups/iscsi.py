"""The ``iscsi`` scenario setup: a fileserver whose multipathed iSCSI disks are being hot-added.

Host side: a private tgtd (:mod:`harness.iscsi.target`) with ``boot_luns``
LUNs at start, every LUN on two loopback portals. QEMU's iSCSI initiator
gives the guest both paths of each boot LUN as ``scsi-block`` devices
(:mod:`harness.iscsi.guest`). After every boot the guest assembles each LUN's
two paths by WWID into a dm-multipath device, puts ext4 on it and starts a
writer/verifier. The panic comes during the hot-add of ``hotadd_luns`` more
LUNs, at a seeded random step of that sequence:

* ``mode = "sysrq"``: ``echo c > /proc/sysrq-trigger`` right after the step;
* ``mode = "stall"``: tgtd is stopped right after the step (both portals stop
  answering, I/O in flight never completes), the multipath devices queue,
  writers block in D state and the hung-task detector (``hung_task_panic``,
  ``hung_task_timeout`` seconds) panics the guest. tgtd is continued as soon
  as GUEST_PANICKED arrives: QEMU's ``stop`` drains in-flight I/O and would
  wait for ever otherwise.

Params (``[setup_params]``): ``mode``, ``boot_luns`` (1-4), ``hotadd_luns``
(1-8), ``lun_mib`` (8-4096), ``hung_task_timeout`` (2-120 s),
``queue_if_no_path`` (bool).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from harness.errors import MissingTool, PanicError, SetupError
from harness.iscsi import guest as G
from harness.iscsi.target import Target, check_tools
from harness.setups import register_setup
from harness.setups.base import ScenarioSetup, SessionOverrides

__all__ = ["IscsiSetup", "hotadd_steps", "STEP_KINDS"]

#: one hot-added LUN, as an operator adds it; the panic point is drawn over all of them
STEP_KINDS = ("target-lun", "path0", "path1", "rescan", "multipath", "mkfs", "io")


def hotadd_steps(first_lun: int, count: int) -> list[tuple[int, str]]:
    """(LUN, step) in order, for ``count`` LUNs from ``first_lun``."""
    return [(n, k) for n in range(first_lun, first_lun + count) for k in STEP_KINDS]


def _int_param(params: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    v = params.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise SetupError(f"[setup_params] {key} = {v!r}: want an integer {lo}-{hi}")
    return v


@register_setup("iscsi")
class IscsiSetup(ScenarioSetup):
    triggers = ("stall",)

    def __init__(
        self, scenario: Any, workdir: Path, params: Mapping[str, Any], log: Callable[[str], None] = print
    ) -> None:
        super().__init__(scenario, workdir, params, log)
        known = {
            "mode",
            "boot_luns",
            "hotadd_luns",
            "lun_mib",
            "hung_task_timeout",
            "queue_if_no_path",
            "guest_timeout",
        }
        unknown = set(self.params) - known
        if unknown:
            raise SetupError(
                f"[setup_params]: unknown keys {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})"
            )
        self.mode = self.params.get("mode", "sysrq")
        if self.mode not in ("sysrq", "stall"):
            raise SetupError(f"[setup_params] mode = {self.mode!r}: want 'sysrq' or 'stall'")
        self.boot_luns = _int_param(self.params, "boot_luns", 2, 1, 4)
        self.hotadd_luns = _int_param(self.params, "hotadd_luns", 2, 1, 8)
        self.lun_mib = _int_param(self.params, "lun_mib", 64, 8, 4096)
        self.hung_timeout = _int_param(self.params, "hung_task_timeout", 5, 2, 120)
        self.guest_timeout = _int_param(self.params, "guest_timeout", 60, 5, 600)
        q = self.params.get("queue_if_no_path", True)
        if not isinstance(q, bool):
            raise SetupError(f"[setup_params] queue_if_no_path = {q!r}: want true or false")
        self.queue = q
        self.target: Target | None = None
        self._plugged: list[str] = []  # hot-added device ids, unplugged after the next boot
        self._notes: list[str] = []
        self._closed = False

    # ---- lifecycle ----------------------------------------------------------------------
    def check(self) -> None:
        check_tools()
        from harness.guests import get_profile

        prof = get_profile(getattr(self.scenario, "guest", "linux"))
        man = getattr(prof, "manifest", {}) or {}
        mods = set(man.get("modules", []))
        for m in ("dm_mod", "dm_multipath", "dm_round_robin"):
            if m not in mods:
                raise MissingTool(f"guest image lacks kernel module {m}: rebuild it (`make guest-image`)")
        pkgs = {p.get("name") for p in man.get("packages", [])}
        if "dmsetup" not in pkgs:
            raise MissingTool("guest image lacks dmsetup (Debian package dmsetup): rebuild it (`make guest-image`)")

    def start(self) -> SessionOverrides:
        self.target = Target(self.workdir / "target", log=self.log)
        self.target.start()
        for _ in range(self.boot_luns):
            self.target.add_lun(self.lun_mib)
        t = self.target
        self.log(
            f"iscsi: tgtd pid {t.proc.pid if t.proc else '?'} control port {t.control_port}, "
            f"portals 127.0.0.1:{t.port} 127.0.0.2:{t.port}, {self.boot_luns} LUNs"
        )
        notes = [
            f"iSCSI target {t.iqn}: private tgtd (-C {t.control_port}), portals 127.0.0.1:{t.port} and "
            f"127.0.0.2:{t.port}; {self.boot_luns} boot LUNs + {self.hotadd_luns} hot-added, {self.lun_mib} MiB each, "
            f"mode {self.mode}"
        ]
        return SessionOverrides(extra_args=G.boot_args(t.iqn, t.port, [lu.lun for lu in t.luns]), notes=notes)

    def _run(self, session: Any, script: str, what: str, timeout: float | None = None) -> str:
        res = session.run(script, timeout=timeout or float(self.guest_timeout))
        if res.status != 0:
            raise SetupError(f"iscsi: {what} failed in the guest (status {res.status}): {res.text.strip()[-400:]}")
        return res.text

    def after_boot(self, session: Any) -> None:
        """Drop last round's hot-added paths, assemble the boot LUNs, file systems, I/O."""
        assert self.target is not None
        for dev in self._plugged:
            with contextlib.suppress(Exception):
                session.unplug(dev)
        self._plugged.clear()
        self.target.remove_luns_above(self.boot_luns)
        for lu in self.target.luns:
            self._run(session, G.wait_paths_script(lu.lun, self.guest_timeout), f"LUN {lu.lun} paths")
            self._run(session, G.assemble_script(lu.lun, self.queue), f"multipath for LUN {lu.lun}")
            self._run(session, G.mkfs_mount_script(lu.lun), f"file system on mpath{lu.lun}")
            self._run(session, G.start_io_script(lu.lun), f"I/O on mpath{lu.lun}")

    def _step(self, session: Any, lun: int, kind: str) -> None:
        assert self.target is not None
        t = self.target
        if kind == "target-lun":
            got = t.add_lun(self.lun_mib)
            if got.lun != lun:
                raise SetupError(f"iscsi: tgtd gave LUN {got.lun}, expected {lun}")
        elif kind in ("path0", "path1"):
            p = int(kind[-1])
            session.hotplug([G.blockdev_node(t.iqn, t.port, lun, p)], G.scsi_block_device(lun, p))
            self._plugged.append(G.node_name(lun, p))
        elif kind == "rescan":
            self._run(session, G.wait_paths_script(lun, self.guest_timeout), f"LUN {lun} paths")
        elif kind == "multipath":
            self._run(session, G.assemble_script(lun, self.queue), f"multipath for LUN {lun}")
        elif kind == "mkfs":
            self._run(session, G.mkfs_mount_script(lun), f"file system on mpath{lun}")
        elif kind == "io":
            self._run(session, G.start_io_script(lun), f"I/O on mpath{lun}")

    def panic(self, session: Any, trigger: str, rng: random.Random) -> Any:
        """Hot-add LUNs step by step; panic after a seeded random step (see the module docstring)."""
        steps = hotadd_steps(self.boot_luns + 1, self.hotadd_luns)
        # from the first path's device_add on: before it nothing has reached the guest yet
        at = rng.randrange(1, len(steps))
        lun, kind = steps[at]
        t0 = time.monotonic()
        for i in range(at + 1):
            self._step(session, *steps[i])
        t_steps = time.monotonic() - t0
        how = "sysrq" if self.mode == "sysrq" else f"tgtd stopped, hung_task_timeout {self.hung_timeout} s"
        self._notes = [
            f"iscsi: panic after hot-add step {at + 1}/{len(steps)} (LUN {lun}: {kind}), "
            f"{t_steps:.1f} s into the hot-add; {how}"
        ]
        self.log(self._notes[0])
        if self.mode == "sysrq":
            return session.panic("sysrq")
        return self._stall_panic(session)

    def _stall_panic(self, session: Any) -> Any:
        from harness.controller import PanicResult, event_time_ns, stop_after_panic

        assert self.target is not None
        self._run(
            session,
            f"sysctl -qw kernel.hung_task_timeout_secs={self.hung_timeout}; sysctl -qw kernel.hung_task_panic=1",
            "hung-task settings",
        )
        start_pat, end_pat = session.profile.panic_patterns()
        limit = self.hung_timeout * 3 + 60.0  # TCG: the detector's period plus slack

        async def go() -> PanicResult:
            m = session.m
            cursor = m.console.cursor()
            async with m.listen("GUEST_PANICKED") as lst:
                trigger_ns = time.time_ns()
                t0 = time.monotonic()
                self.target.stall()
                try:
                    ev = await m.next_event(lst, limit)
                except TimeoutError:
                    self.target.resume()
                    raise PanicError(
                        f"tgtd stalled: no hung-task panic within {limit:.0f} s; console tail:\n"
                        f"{m.console.buffer.tail(2000).decode('utf-8', 'replace')}"
                    ) from None
                finally:
                    t_ev = time.monotonic()
            self.target.resume()  # before `stop`: QEMU drains in-flight I/O
            event_ns = event_time_ns(ev, time.time_ns())
            return await stop_after_panic(
                m, "stall", trigger_ns, event_ns, t0, t_ev, cursor, start_pat, end_pat, session.t.panic_console
            )

        try:
            res = session.call(go(), limit + 120)
        finally:
            self.target.resume()
        session.last_panic = res
        self._notes.append(
            f"iscsi: stall to GUEST_PANICKED {res.event_latency_ms / 1000:.1f} s; panic: {res.panic_string[:120]}"
        )
        return res

    def notes(self) -> list[str]:
        return list(self._notes)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.target is not None:
            with contextlib.suppress(Exception):
                self.target.close()
