"""Make a real QEMU ELF core in about a second, without booting an OS.

Why: the ELF loader must be tested against what QEMU really writes (QEMU
7.2's header quirks, its i386 NT_PRSTATUS for a CPU in real mode, its QEMU
CPU notes), not only against cores we build ourselves.

How: start ``qemu-system-x86_64 -machine q35,accel=tcg -S`` (paused before
the first instruction) with guest RAM in a shared memory-backend file; write
known bytes into that file (QEMU sees them at the same guest-physical
addresses: file offset = GPA below the low-memory split); then QMP
``dump-guest-memory`` (``paging: false``, format ``elf``). QEMU is killed on
every path.

Use :func:`make_qemu_elf_core` directly or the session fixture
``qemu_elf_core`` in ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

QEMU = "qemu-system-x86_64"

# Known bytes planted in guest RAM: guest-physical address -> bytes.
DEFAULT_PLANTS: dict[int, bytes] = {
    0x1000: b"progdump-plant:low-page " * 8,
    0x200000: bytes(range(256)) * 16,  # a whole page at 2 MiB
    0x3FFF000: b"progdump-plant:last-page".ljust(4096, b"\xa5"),  # last page of 64 MiB
}


class QemuUnavailable(RuntimeError):
    """QEMU or qemu.qmp is missing; the message says which (tests skip with it)."""


@dataclass
class QemuCore:
    path: Path
    mem_bytes: int
    smp: int
    plants: dict[int, bytes] = field(default_factory=dict, repr=False)
    qemu_version: str = ""
    seconds: float = 0.0


def qemu_unavailable_reason() -> str | None:
    """Why a QEMU core cannot be made here, or None when it can."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found on PATH (Debian package qemu-system-x86)"
    try:
        import qemu.qmp  # noqa: F401
    except ImportError:
        return "Python package qemu.qmp is not installed"
    return None


def make_qemu_elf_core(
    workdir: str | os.PathLike[str],
    *,
    mem_mib: int = 64,
    smp: int = 2,
    plants: dict[int, bytes] | None = None,
    vmcoreinfo_device: bool = False,
    timeout: float = 60.0,
) -> QemuCore:
    """Run a paused q35 guest, plant ``plants`` in its RAM, dump it as an ELF core.

    Raises :class:`QemuUnavailable` when QEMU cannot run here, RuntimeError
    when the dump fails (with QEMU's stderr).
    """
    reason = qemu_unavailable_reason()
    if reason:
        raise QemuUnavailable(reason)
    plants = dict(DEFAULT_PLANTS if plants is None else plants)
    mem_bytes = mem_mib << 20
    for addr, data in plants.items():
        if addr + len(data) > min(mem_bytes, 0xB0000000):
            raise ValueError(f"plant at {addr:#x} lies outside low guest RAM")
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    sock = work / "qmp.sock"
    ram = work / "ram.bin"
    core = work / "qemu-core.elf"
    for p in (sock, ram, core):
        if p.exists():
            p.unlink()
    argv = [
        QEMU,
        "-machine", "q35,accel=tcg,memory-backend=mem",
        "-object", f"memory-backend-file,id=mem,size={mem_mib}M,mem-path={ram},share=on",
        "-m", f"{mem_mib}M",
        "-smp", str(smp),
        "-S", "-display", "none", "-nodefaults", "-no-user-config",
        "-qmp", f"unix:{sock},server=on,wait=off",
    ]  # fmt: skip
    if vmcoreinfo_device:
        argv += ["-device", "vmcoreinfo"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        version = asyncio.run(_dump(proc, sock, ram, core, plants, timeout))
    except Exception as e:
        err = _stop(proc)
        raise RuntimeError(f"QEMU ELF dump failed: {e}; QEMU stderr: {err[-2000:]!r}") from e
    else:
        _stop(proc)
    finally:
        if ram.exists():
            ram.unlink()  # QEMU leaves the backend file behind
        if sock.exists():
            sock.unlink()
    os.chmod(core, 0o600)  # QEMU creates dump files mode 0400
    return QemuCore(core, mem_bytes, smp, plants, version, time.monotonic() - t0)


async def _dump(
    proc: subprocess.Popen[bytes], sock: Path, ram: Path, core: Path, plants: dict[int, bytes], timeout: float
) -> str:
    from qemu.qmp import QMPClient

    deadline = time.monotonic() + timeout
    client = QMPClient("progdump-test-core")
    while not sock.exists():  # wait for the socket rather than retrying connects (they log errors)
        if proc.poll() is not None:
            raise RuntimeError(f"QEMU exited with status {proc.returncode} before QMP was up")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no QMP socket at {sock} after {timeout} s")
        await asyncio.sleep(0.02)
    await asyncio.wait_for(client.connect(str(sock)), timeout=max(1.0, deadline - time.monotonic()))
    try:
        info = await client.execute("query-version")
        q = info["qemu"]  # type: ignore[index]
        version = f"{q['major']}.{q['minor']}.{q['micro']}"
        # Guest RAM is the shared file: writes land in the guest at once.
        fd = os.open(ram, os.O_RDWR)
        try:
            for addr, data in plants.items():
                os.pwrite(fd, data, addr)
        finally:
            os.close(fd)
        await asyncio.wait_for(
            client.execute("dump-guest-memory", {"paging": False, "protocol": f"file:{core}", "format": "elf"}),
            timeout=max(1.0, deadline - time.monotonic()),
        )
        return version
    finally:
        await client.disconnect()


def _stop(proc: subprocess.Popen[bytes]) -> str:
    """Kill QEMU (it is paused; nothing to save) and return its stderr."""
    if proc.poll() is None:
        proc.kill()
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        return ""
    return (err or b"").decode("utf-8", "replace")
