"""An async QEMU machine on ``qemu.qmp``: launch, console, events, hot-plug, quit.

Why async: QMP events (``GUEST_PANICKED``, ``DEVICE_DELETED``), the console
and the command channel all arrive concurrently; one event loop reads them
all without threads racing. The sync facade (:mod:`harness.controller`)
runs this on its own loop thread.

Lifetime rules (no QEMU may outlive us):
* the child gets ``PR_SET_PDEATHSIG(SIGKILL)`` before exec, so it dies when
  the thread that started it (the facade's loop thread) or the process exits;
* every error path in :meth:`Machine.launch` kills the process;
* :meth:`Machine.close` sends ``quit``, waits, then kills, and removes the
  private socket directory;
* the RAM backend file is unlinked as soon as QEMU has it open; we keep our
  own descriptor, so the memory is freed with the last user; the socket
  directory goes as soon as all three sockets are connected (they are never
  reconnected), so even a SIGKILLed controller leaves no file behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.error import QMPError

from harness.errors import QemuError, QemuExited
from harness.qemu.argv import DiskSpec, MachineConfig, build_argv
from harness.qemu.cmdchan import MAX_CMD_LINE, CommandChannel
from harness.qemu.console import ConsoleReader
from harness.timeouts import Timeouts

__all__ = ["Machine", "RunDir", "set_pdeathsig"]

PR_SET_PDEATHSIG = 1


def set_pdeathsig() -> None:
    """preexec_fn: die with SIGKILL when the parent thread goes away."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(127)
    if os.getppid() == 1:  # parent already gone before prctl took effect
        os._exit(127)


class RunDir:
    """Private places for one machine: sockets (0700 dir in /tmp, short paths
    for the 108-byte socket limit) and the RAM file (0700 dir in /dev/shm)."""

    def __init__(self, shm: bool) -> None:
        self.sock_dir = Path(tempfile.mkdtemp(prefix="pd-qemu-"))
        os.chmod(self.sock_dir, 0o700)
        self.shm_dir: Path | None = None
        if shm:
            base = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self.shm_dir = Path(tempfile.mkdtemp(prefix="pd-ram-", dir=base))
            os.chmod(self.shm_dir, 0o700)

    @classmethod
    def placeholder(cls, shm: bool) -> RunDir:
        """Paths of the right shape, nothing created (for ``--show-command``)."""
        rd = cls.__new__(cls)
        rd.sock_dir = Path("/tmp/pd-qemu-XXXXXXXX")
        rd.shm_dir = Path("/dev/shm/pd-ram-XXXXXXXX") if shm else None
        return rd

    @property
    def qmp(self) -> Path:
        return self.sock_dir / "qmp.sock"

    @property
    def console(self) -> Path:
        return self.sock_dir / "console.sock"

    @property
    def cmd(self) -> Path:
        return self.sock_dir / "cmd.sock"

    @property
    def ram(self) -> Path | None:
        return self.shm_dir / "ram" if self.shm_dir else None

    def remove(self) -> None:
        for d in (self.sock_dir, self.shm_dir):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)


def open_log(path: Path) -> Any:
    """Open a log for appending, never through a symbolic link (O_NOFOLLOW) and private (0600).

    Why: logs live in a work directory; a link planted there must not make
    QEMU's output land in some other file.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "ab")


class Machine:
    """One QEMU process and its QMP, console and command connections.

    ``config`` must use this machine's :class:`RunDir` paths (see
    :meth:`harness.controller.GuestSession` for how they are put together).
    ``log`` receives one human-readable line per step.
    """

    def __init__(
        self,
        config: MachineConfig,
        rundir: RunDir,
        timeouts: Timeouts,
        console_log: Path,
        qemu_log: Path,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.rundir = rundir
        self.t = timeouts
        self.console_log_path = console_log
        self.qemu_log_path = qemu_log
        self.log = log or (lambda s: None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QMPClient | None = None
        self.console: ConsoleReader | None = None
        self.cmd: CommandChannel | None = None
        self.ram_fd: int | None = None
        self._console_file: Any = None
        self._qemu_log_file: Any = None
        self.argv = build_argv(config)
        self._root_port_of: dict[str, str] = {}
        self._nodes_of: dict[str, list[str]] = {}
        self.console_writer: asyncio.StreamWriter | None = None

    # ---- lifecycle ---------------------------------------------------------------------
    async def launch(self) -> None:
        """Start QEMU (paused, -S), connect QMP, console and command channel."""
        try:
            self._qemu_log_file = open_log(self.qemu_log_path)
            self._console_file = open_log(self.console_log_path)
            self.log(f"launch: {self.config.accel}, {self.config.mem_mib} MiB, {self.config.smp} vCPU")
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._qemu_log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=set_pdeathsig,
                close_fds=True,
            )
            await self._connect_qmp()
            r, w = await asyncio.open_unix_connection(str(self.config.console_socket))
            self.console_writer = w  # keep it: a collected StreamWriter closes the socket
            self.console = ConsoleReader(r, self._console_file)
            self.console.start()
            if self.config.cmd_socket is not None:
                r, w = await asyncio.open_unix_connection(str(self.config.cmd_socket), limit=MAX_CMD_LINE)
                self.cmd = CommandChannel(r, w)
                self.cmd.start()
            if self.config.ram_file is not None:
                self.ram_fd = os.open(self.config.ram_file, os.O_RDONLY | os.O_CLOEXEC)
                os.unlink(self.config.ram_file)  # QEMU and we hold it open; nothing leaks
            # Every connection is made and none is ever remade: the socket paths can go
            # now, so even a SIGKILLed controller leaves nothing behind.
            self.rundir.remove()
        except BaseException:
            await self.kill()
            raise

    async def _connect_qmp(self) -> None:
        deadline = time.monotonic() + self.t.qmp_connect
        while True:
            self.check_alive("while starting")
            if self.config.qmp_socket.exists():
                qmp = QMPClient("progdump")
                try:
                    await asyncio.wait_for(qmp.connect(str(self.config.qmp_socket)), self.t.qmp_connect)
                    self.qmp = qmp
                    return
                except (TimeoutError, QMPError, OSError):
                    with contextlib.suppress(Exception):
                        await qmp.disconnect()
            if time.monotonic() > deadline:
                raise QemuError(f"QMP socket {self.config.qmp_socket} not ready after {self.t.qmp_connect:.0f} s")
            await asyncio.sleep(0.02)

    def _log_tail(self, n: int = 2000) -> str:
        try:
            with open(self.qemu_log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.qemu_log_path) - n))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def check_alive(self, when: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise QemuExited(
                f"QEMU exited with status {self.proc.returncode} {when}", self.proc.returncode, self._log_tail()
            )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def close(self) -> None:
        """Quit QEMU politely, then by force; release every resource. Idempotent."""
        if self.proc is not None and self.proc.poll() is None and self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit"), 2.0)
            try:
                await asyncio.wait_for(asyncio.to_thread(self.proc.wait), self.t.quit)
            except TimeoutError:
                pass
        await self.kill()

    async def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 10)
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
            self.qmp = None
        if self.console is not None:
            await self.console.stop()
        if self.console_writer is not None:
            with contextlib.suppress(Exception):
                self.console_writer.close()
            self.console_writer = None
        if self.cmd is not None:
            await self.cmd.close()
            self.cmd = None
        if self.ram_fd is not None:
            os.close(self.ram_fd)
            self.ram_fd = None
        for f in (self._console_file, self._qemu_log_file):
            if f is not None:
                with contextlib.suppress(Exception):
                    f.close()
        self._console_file = self._qemu_log_file = None
        self.rundir.remove()

    # ---- QMP ---------------------------------------------------------------------------
    async def execute(self, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """One QMP command; errors become :class:`QemuError` naming the command."""
        self.check_alive(f"before {cmd}")
        if self.qmp is None:
            raise QemuError(f"{cmd}: QMP is not connected")
        try:
            return await asyncio.wait_for(self.qmp.execute(cmd, args), timeout or self.t.qmp_command)
        except TimeoutError:
            raise QemuError(f"QMP {cmd} got no answer in {timeout or self.t.qmp_command:.0f} s") from None
        except QMPError as e:
            self.check_alive(f"during {cmd}")
            raise QemuError(f"QMP {cmd} failed: {e}") from e

    async def hmp(self, command_line: str) -> str:
        out = await self.execute("human-monitor-command", {"command-line": command_line})
        if not isinstance(out, str):
            raise QemuError(f"HMP {command_line!r} returned {type(out).__name__}, not text")
        return out

    async def status(self) -> str:
        st = await self.execute("query-status")
        return str(st.get("status")) if isinstance(st, dict) else "unknown"

    @contextlib.asynccontextmanager
    async def listen(self, *names: str) -> AsyncIterator[EventListener]:
        """Register an event listener; use it around the command that causes the event."""
        if self.qmp is None:
            raise QemuError("QMP is not connected")
        listener = EventListener(names)
        with self.qmp.listen(listener):
            yield listener

    async def next_event(
        self, listener: EventListener, timeout: float, pred: Callable[[dict[str, Any]], bool] = lambda e: True
    ) -> dict[str, Any]:
        """The next event on ``listener`` satisfying ``pred``; QemuExited if QEMU dies."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            try:
                ev = await asyncio.wait_for(listener.get(), min(left, 0.5))
            except TimeoutError:
                self.check_alive("while waiting for an event")
                continue
            if pred(ev):
                return dict(ev)

    # ---- convenience --------------------------------------------------------------------
    async def cont(self) -> None:
        await self.execute("cont")

    async def stop(self) -> None:
        await self.execute("stop")

    async def system_reset(self) -> None:
        """Hard reset; from a panicked/stopped state QEMU stays in prelaunch: cont too."""
        await self.execute("system_reset")
        if await self.status() != "running":
            await self.execute("cont")

    async def inject_nmi(self) -> None:
        await self.execute("inject-nmi")

    # ---- hot-plug -----------------------------------------------------------------------
    async def hotplug(self, nodes: list[dict[str, Any]], device: dict[str, Any]) -> None:
        """``blockdev-add`` each node (protocol first), then ``device_add``; undo all on failure.

        Generic on purpose: a file image, an iSCSI LUN through QEMU's initiator
        (``{"driver": "iscsi", "transport": "tcp", "portal": ..., "target": ...,
        "lun": ...}``), NBD ... A ``virtio-*-pci`` device without ``bus`` goes
        to the first free ``pcie-root-port`` (q35's root bus takes no hot-plug).
        """
        device = dict(device)
        dev_id = str(device.get("id", ""))
        if not dev_id:
            raise QemuError("hot-plugged devices need an id (device_del and DEVICE_DELETED use it)")
        added: list[str] = []
        try:
            for n in nodes:
                await self.execute("blockdev-add", n)
                added.append(str(n["node-name"]))
            if str(device.get("driver", "")).endswith("-pci") and "bus" not in device:
                device["bus"] = self._free_root_port()
                self._root_port_of[dev_id] = device["bus"]
            await self.execute("device_add", device)
            self._nodes_of[dev_id] = added
        except BaseException:
            self._root_port_of.pop(dev_id, None)
            for name in reversed(added):
                with contextlib.suppress(Exception):
                    await self.execute("blockdev-del", {"node-name": name})
            raise

    async def unplug(self, device_id: str, timeout: float | None = None) -> None:
        """device_del, wait for DEVICE_DELETED of *this* id (children report first), blockdev-del."""
        limit = timeout or self.t.device_deleted
        async with self.listen("DEVICE_DELETED") as lst:
            await self.execute("device_del", {"id": device_id})
            try:
                await self.next_event(lst, limit, lambda e: e.get("data", {}).get("device") == device_id)
            except TimeoutError:
                raise QemuError(
                    f"no DEVICE_DELETED for {device_id} within {limit:.0f} s (the guest did not release it)"
                ) from None
        self._root_port_of.pop(device_id, None)
        for name in reversed(self._nodes_of.pop(device_id, [])):
            with contextlib.suppress(QemuError):
                await self.execute("blockdev-del", {"node-name": name})

    async def add_disk(self, disk: DiskSpec, bus: str | None = None) -> None:
        """Hot-add an image file as scsi-hd (on ``scsi0.0``) or virtio-blk (on a free root port)."""
        ro = disk.readonly
        nodes = [
            {"driver": "file", "node-name": f"{disk.id}-file", "filename": str(disk.path), "read-only": ro},
            {"driver": disk.fmt, "node-name": f"{disk.id}-fmt", "file": f"{disk.id}-file", "read-only": ro},
        ]
        dev: dict[str, Any] = {"id": disk.id, "drive": f"{disk.id}-fmt"}
        if disk.serial:
            dev["serial"] = disk.serial
        if disk.bus == "scsi":
            dev.update(driver="scsi-hd", bus=bus or "scsi0.0")
        else:
            dev["driver"] = "virtio-blk-pci"
            if bus:
                dev["bus"] = bus
        await self.hotplug(nodes, dev)

    async def remove_disk(self, disk_id: str, timeout: float | None = None) -> None:
        await self.unplug(disk_id, timeout)

    def _free_root_port(self) -> str:
        used = set(self._root_port_of.values())
        for i in range(self.config.root_ports):
            if f"rp{i}" not in used:
                return f"rp{i}"
        raise QemuError(f"no free pcie-root-port (have {self.config.root_ports})")
