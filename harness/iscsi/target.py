"""A private tgtd iSCSI target on loopback: argv builders (pure) and a lifecycle class.

Why a private instance: the host may run its own tgtd (or none); the scenario
must never touch it and never listen beyond loopback. tgtd's ``-C N`` gives an
instance its own control socket (``/var/run/tgtd/socket.N``); every tgtadm
call carries the same ``-C N``. The first portal is given on tgtd's command
line, the second (127.0.0.2, also loopback) is added with tgtadm, so every
LUN of the one target is reachable through two portals: two paths.

Facts this relies on (checked on Debian 12's tgt 1.0.85, see
/work/shared/notes/qemu-guest-facts.md): tgtd ignores SIGTERM, it is stopped
with ``tgtadm --op delete --mode system`` after each target is deleted with
``--force``; without ``--lld iscsi`` tgtadm answers "invalid request"; tgtd
leaves ``socket.N`` and ``socket.N.lock`` behind, so we remove them.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import MissingTool, SetupError
from harness.qemu.machine import open_log, set_pdeathsig

__all__ = [
    "TGT_IPC_DIR",
    "PORTALS",
    "Lun",
    "tgtd_argv",
    "tgtadm_argv",
    "new_target_argv",
    "new_lun_argv",
    "bind_all_argv",
    "new_portal_argv",
    "delete_lun_argv",
    "delete_target_argv",
    "stop_system_argv",
    "show_target_argv",
    "parse_show_target",
    "check_tools",
    "Target",
    "iqn_for",
]

TGT_IPC_DIR = Path("/var/run/tgtd")
#: the two loopback portals: one path each
PORTALS = ("127.0.0.1", "127.0.0.2")
MiB = 1 << 20


def iqn_for(tag: str) -> str:
    """The target's IQN; ``tag`` keeps concurrent runs apart (pid-based by default)."""
    if not re.fullmatch(r"[a-z0-9.-]{1,40}", tag):
        raise SetupError(f"iSCSI target tag {tag!r}: want 1-40 of [a-z0-9.-]")
    return f"iqn.2026-12.org.progdump:{tag}"


# ---- argv builders (pure) ------------------------------------------------------------


def tgtd_argv(control_port: int, portal: str, port: int) -> list[str]:
    """tgtd in the foreground, its own control socket, one loopback portal."""
    _check_loopback(portal)
    return ["tgtd", "-f", "-C", str(control_port), "--iscsi", f"portal={portal}:{port}"]


def tgtadm_argv(control_port: int, *args: str) -> list[str]:
    return ["tgtadm", "-C", str(control_port), "--lld", "iscsi", *args]


def new_target_argv(cp: int, tid: int, iqn: str) -> list[str]:
    return tgtadm_argv(cp, "--op", "new", "--mode", "target", "--tid", str(tid), "-T", iqn)


def new_lun_argv(cp: int, tid: int, lun: int, backing: Path) -> list[str]:
    return tgtadm_argv(
        cp, "--op", "new", "--mode", "logicalunit", "--tid", str(tid), "--lun", str(lun), "-b", str(backing)
    )


def bind_all_argv(cp: int, tid: int) -> list[str]:
    """Accept every initiator: only loopback can reach the portals."""
    return tgtadm_argv(cp, "--op", "bind", "--mode", "target", "--tid", str(tid), "-I", "ALL")


def new_portal_argv(cp: int, portal: str, port: int) -> list[str]:
    _check_loopback(portal)
    return tgtadm_argv(cp, "--op", "new", "--mode", "portal", "--param", f"portal={portal}:{port}")


def delete_lun_argv(cp: int, tid: int, lun: int) -> list[str]:
    return tgtadm_argv(cp, "--op", "delete", "--mode", "logicalunit", "--tid", str(tid), "--lun", str(lun))


def show_target_argv(cp: int) -> list[str]:
    return tgtadm_argv(cp, "--op", "show", "--mode", "target")


def delete_target_argv(cp: int, tid: int) -> list[str]:
    return tgtadm_argv(cp, "--op", "delete", "--mode", "target", "--tid", str(tid), "--force")


def stop_system_argv(cp: int) -> list[str]:
    return tgtadm_argv(cp, "--op", "delete", "--mode", "system")


def _check_loopback(addr: str) -> None:
    if not re.fullmatch(r"127\.\d{1,3}\.\d{1,3}\.\d{1,3}", addr):
        raise SetupError(f"iSCSI portal {addr!r} is not a loopback address (127.0.0.0/8 only)")


def parse_show_target(text: str) -> dict[int, dict[str, str]]:
    """LUN number -> {"SCSI ID", "SCSI SN", "Type", "Backing store path", ...} from ``--op show``.

    tgtadm's own report: the tests compare what the guest sees with this.
    Bounded: at most 4096 LUN records and 256 characters a value.
    """
    luns: dict[int, dict[str, str]] = {}
    cur: dict[str, str] | None = None
    for line in text.splitlines()[:200_000]:
        m = re.match(r"^\s*LUN: (\d+)\s*$", line)
        if m:
            if len(luns) >= 4096:
                break
            cur = luns.setdefault(int(m.group(1)), {})
            continue
        if cur is not None:
            m = re.match(r"^\s{12,}([A-Za-z][A-Za-z \-]*?):\s?(.*)$", line)
            if m:
                cur[m.group(1)] = m.group(2)[:256]
            elif line.strip() and not line.startswith(" " * 12):
                cur = None
    return luns


QEMU_MODULE_DIRS = ("/usr/lib/x86_64-linux-gnu/qemu", "/usr/lib/qemu", "/usr/lib64/qemu")


def check_tools(
    path: str | None = None, qemu_module_dirs: tuple[str, ...] = QEMU_MODULE_DIRS, euid: int | None = None
) -> None:
    """Raise :class:`MissingTool` naming the first missing host piece (never starts anything).

    ``path``: where to look for tgtd/tgtadm (default: $PATH plus /usr/sbin and /sbin,
    where Debian puts them); the arguments exist so a test can point at an empty place.
    """
    if path is None:
        path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    for tool in ("tgtd", "tgtadm"):
        if shutil.which(tool, path=path) is None:
            raise MissingTool(f"{tool} not found: install Debian's tgt (`make setup`)")
    if not any(Path(d, "block-iscsi.so").exists() for d in qemu_module_dirs):
        raise MissingTool("QEMU's iSCSI initiator (block-iscsi.so) not found: install qemu-block-extra (`make setup`)")
    if (os.geteuid() if euid is None else euid) != 0:
        raise MissingTool(f"tgtd needs root: its control socket lives in {TGT_IPC_DIR} (run as root)")


def _port_free(port: int) -> bool:
    for addr in PORTALS:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((addr, port))
            except OSError:
                return False
    return True


def free_port(rng: random.Random | None = None) -> int:
    """A TCP port free on both loopback portals (checked by binding; tgtd may still race)."""
    rng = rng or random.Random()
    for _ in range(200):
        p = rng.randrange(20000, 60000)
        if _port_free(p):
            return p
    raise SetupError("no free TCP port on 127.0.0.1 and 127.0.0.2 after 200 tries")


def free_control_port(rng: random.Random | None = None) -> int:
    """A tgtd control port whose socket (and lock) does not exist yet."""
    rng = rng or random.Random()
    for _ in range(200):
        n = rng.randrange(1000, 30000)
        if not (TGT_IPC_DIR / f"socket.{n}").exists() and not (TGT_IPC_DIR / f"socket.{n}.lock").exists():
            return n
    raise SetupError(f"no free tgtd control port in {TGT_IPC_DIR}")


# ---- lifecycle -------------------------------------------------------------------------


@dataclass
class Lun:
    lun: int
    backing: Path
    size_mib: int


@dataclass
class Target:
    """One private tgtd with one target, its LUNs backed by sparse files in ``workdir``.

    ``start()`` then ``add_lun()``; ``stall()`` / ``resume()`` stop and continue
    tgtd (SIGSTOP/SIGCONT: both portals stop answering, I/O in flight hangs);
    ``close()`` always, idempotent, never raises.
    """

    workdir: Path
    tag: str = field(default_factory=lambda: f"pd{os.getpid()}")
    tid: int = 1
    log: object = print
    control_port: int = 0
    port: int = 0
    proc: subprocess.Popen | None = None
    luns: list[Lun] = field(default_factory=list)
    stalled: bool = False
    _closed: bool = False

    @property
    def iqn(self) -> str:
        return iqn_for(self.tag)

    def _adm(self, argv: list[str], timeout: float = 15.0) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SetupError(f"{' '.join(argv)}: no answer within {timeout:.0f} s") from None
        if p.returncode != 0:
            raise SetupError(f"{' '.join(argv)} failed ({p.returncode}): {(p.stderr or p.stdout).strip()[:300]}")
        return p.stdout

    def start(self) -> None:
        check_tools()
        self.workdir.mkdir(parents=True, exist_ok=True)
        rng = random.Random(os.getpid() ^ time.monotonic_ns())
        last = ""
        for _ in range(5):  # a port taken between the check and tgtd's bind: try another
            self.control_port = free_control_port(rng)
            self.port = free_port(rng)
            logf = open_log(self.workdir / "tgtd.log")  # never through a planted link
            try:
                self.proc = subprocess.Popen(
                    tgtd_argv(self.control_port, PORTALS[0], self.port),
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    start_new_session=True,  # Ctrl-C reaches us (we stop tgtd), not tgtd
                    preexec_fn=set_pdeathsig,
                )  # and if we are killed outright, tgtd dies too
            finally:
                logf.close()
            if self._wait_ready(10.0):
                break
            last = (self.workdir / "tgtd.log").read_text(errors="replace")[-300:]
            self._kill()
            self._remove_socket()
        else:
            raise SetupError(f"tgtd did not come up on 127.0.0.1 (log tail: {last.strip()})")
        self._adm(new_target_argv(self.control_port, self.tid, self.iqn))
        self._adm(bind_all_argv(self.control_port, self.tid))
        self._adm(new_portal_argv(self.control_port, PORTALS[1], self.port))

    def _wait_ready(self, timeout: float) -> bool:
        """Ready = tgtadm answers on the control socket and the first portal accepts."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            p = subprocess.run(
                tgtadm_argv(self.control_port, "--op", "show", "--mode", "sys"),
                capture_output=True,
                text=True,
                timeout=10,
            )
            if p.returncode == 0:
                with contextlib.suppress(OSError), socket.create_connection((PORTALS[0], self.port), 1.0):
                    return True
            time.sleep(0.05)
        return False

    def add_lun(self, size_mib: int) -> Lun:
        """A new LUN (next number) backed by a new sparse file; reachable on both portals at once."""
        n = len(self.luns) + 1
        path = self.workdir / f"lun{n}.img"
        with open(path, "wb") as f:
            f.truncate(size_mib * MiB)
        self._adm(new_lun_argv(self.control_port, self.tid, n, path))
        lun = Lun(n, path, size_mib)
        self.luns.append(lun)
        return lun

    def remove_luns_above(self, keep: int) -> None:
        """Delete LUNs numbered above ``keep`` (last round's hot-adds) and their backing files."""
        for lu in [lu for lu in self.luns if lu.lun > keep]:
            self._adm(delete_lun_argv(self.control_port, self.tid, lu.lun))
            with contextlib.suppress(OSError):
                lu.backing.unlink()
            self.luns.remove(lu)

    def show(self) -> dict[int, dict[str, str]]:
        return parse_show_target(self._adm(show_target_argv(self.control_port)))

    def stall(self) -> None:
        """Both portals stop answering: tgtd is stopped (SIGSTOP), its connections stay open."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)
            self.stalled = True

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None and self.stalled:
            os.kill(self.proc.pid, signal.SIGCONT)
        self.stalled = False

    def close(self) -> None:
        """Delete the target, stop tgtd (tgtadm, then SIGKILL), remove its socket. Never raises."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.resume()
        if self.proc is not None and self.proc.poll() is None:
            for argv in (delete_target_argv(self.control_port, self.tid), stop_system_argv(self.control_port)):
                with contextlib.suppress(Exception):
                    subprocess.run(argv, capture_output=True, timeout=10)
            with contextlib.suppress(Exception):
                self.proc.wait(5)
        self._kill()
        self._remove_socket()

    def _kill(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.kill()
            self.proc.wait(10)

    def _remove_socket(self) -> None:
        if not self.control_port:
            return
        for suffix in ("", ".lock"):
            with contextlib.suppress(OSError):
                (TGT_IPC_DIR / f"socket.{self.control_port}{suffix}").unlink()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
