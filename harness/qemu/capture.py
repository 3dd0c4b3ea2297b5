"""Capture a frozen guest as a progdump :class:`~progdump.snapshot.Snapshot`.

What is taken, and from where (all through QMP, the guest stays paused):

* registers of every vCPU: HMP ``info registers -a`` (~1 ms; control
  registers and EFER included);
* the VMCOREINFO note and QEMU's own per-CPU notes: a ``dump-guest-memory``
  of one page (``begin=0, length=4096``). QEMU writes all ELF notes whatever
  the range, and the VMCOREINFO note it writes is read from the guest
  address the guest published through fw_cfg (``etc/vmcoreinfo``); no QMP
  command exposes that address, and scanning RAM for the note could find a
  stale copy. Costs 2-15 ms and a 10 KB file. The CPU notes of the same dump
  cross-check the HMP registers at every capture;
* RAM layout: HMP ``info mtree -f`` (QEMU's flat map: which guest-physical
  ranges are RAM and at which backend offset; q35 moves RAM above the
  low-memory split to 4 GiB);
* RAM itself: the shared memory-backend file, mapped read-only (zero copy);
  without a shared backend, ``pmemsave`` of each RAM block (or a full
  ``dump-guest-memory``) into a file under the work directory.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import CaptureError, QemuError
from harness.qemu.hmp import HmpParseError, RamBlock, parse_ram_layout, parse_registers
from harness.qemu.machine import Machine
from progdump.elfcore import load_elf_snapshot
from progdump.snapshot import CpuState, Note, Snapshot, SnapshotError

__all__ = ["CaptureResult", "capture_state", "RAM_BACKEND_ID", "COMPARED_REGS"]

RAM_BACKEND_ID = "pdram"  # the memory-backend id harness.qemu.argv uses
ANON_RAM_REGION = "pc.ram"  # QEMU's region name without a memory backend
# Registers present both in HMP output and in QEMU's ELF CPU notes.
COMPARED_REGS = (
    "rax",
    "rbx",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "rsp",
    "rbp",
    "r8",
    "r9",
    "r10",
    "r11",
    "r12",
    "r13",
    "r14",
    "r15",
    "rip",
    "rflags",
    "cr0",
    "cr2",
    "cr3",
    "cr4",
    "cs",
    "ss",
    "fs_base",
    "gs_base",
)


@dataclass
class CaptureResult:
    snapshot: Snapshot
    timings_ms: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


async def read_registers(m: Machine) -> list[dict[str, int]]:
    try:
        return parse_registers(await m.hmp("info registers -a"))
    except HmpParseError as e:
        raise CaptureError(f"registers: {e}") from e


async def read_layout(m: Machine) -> list[RamBlock]:
    backend = RAM_BACKEND_ID if m.config.ram_file is not None else ANON_RAM_REGION
    try:
        return parse_ram_layout(await m.hmp("info mtree -f"), backend)
    except HmpParseError as e:
        raise CaptureError(f"memory layout: {e}") from e


async def dump_elf(
    m: Machine, path: Path, begin: int | None = None, length: int | None = None, timeout: float | None = None
) -> None:
    """``dump-guest-memory`` (ELF, no paging) of all RAM or of ``[begin, begin+length)``."""
    args: dict[str, Any] = {"paging": False, "protocol": f"file:{path}"}
    if begin is not None and length is not None:
        args.update(begin=begin, length=length)
    await m.execute("dump-guest-memory", args, timeout=timeout or m.t.dump)


async def read_notes(m: Machine, workdir: Path) -> tuple[list[Note], list[CpuState]]:
    """ELF notes QEMU writes (VMCOREINFO, CORE, QEMU) via a one-page dump."""
    path = workdir / f"notes-{os.getpid()}-{time.monotonic_ns()}.elf"
    try:
        await dump_elf(m, path, begin=0, length=4096, timeout=m.t.qmp_command)
        try:
            with load_elf_snapshot(path) as small:
                return list(small.notes), [CpuState(c.index, dict(c.regs), c.prstatus) for c in small.cpus]
        except SnapshotError as e:
            raise CaptureError(f"notes dump {path.name}: {e}") from e
    finally:
        path.unlink(missing_ok=True)


def compare_regs(hmp: list[dict[str, int]], notes: list[CpuState]) -> list[str]:
    """Differences between HMP registers and the ELF CPU notes (empty when equal)."""
    out: list[str] = []
    if len(hmp) != len(notes):
        return [f"{len(hmp)} CPUs from HMP but {len(notes)} in the ELF notes"]
    for i, (a, b) in enumerate(zip(hmp, notes)):
        for r in COMPARED_REGS:
            if r in a and r in b.regs and a[r] != b.regs[r]:
                out.append(f"CPU {i} {r}: HMP {a[r]:#x} != ELF note {b.regs[r]:#x}")
    return out


async def _pmemsave_file(m: Machine, blocks: list[RamBlock], workdir: Path) -> tuple[Path, list[tuple[int, int, int]]]:
    """All RAM blocks, one after another, in one file under ``workdir``."""
    out = workdir / f"ram-{os.getpid()}-{time.monotonic_ns()}.raw"
    ranges: list[tuple[int, int, int]] = []
    off = 0
    with open(out, "wb") as dst:
        for b in blocks:
            part = workdir / f"{out.name}.part"
            await m.execute("pmemsave", {"val": b.phys_start, "size": b.size, "filename": str(part)}, timeout=m.t.dump)
            try:
                with open(part, "rb") as src:
                    n = os.fstat(src.fileno()).st_size
                    if n != b.size:
                        raise CaptureError(f"pmemsave of {b.phys_start:#x}+{b.size:#x} wrote {n} bytes")
                    left = n
                    while left:
                        k = os.copy_file_range(src.fileno(), dst.fileno(), left)
                        if k <= 0:
                            raise CaptureError("copy_file_range stopped early")
                        left -= k
            finally:
                part.unlink(missing_ok=True)
            ranges.append((b.phys_start, off, b.size))
            off += b.size
    return out, ranges


async def capture_state(
    m: Machine, workdir: Path, method: str = "auto", console_tail: bytes = b"", metadata: dict[str, Any] | None = None
) -> CaptureResult:
    """Snapshot of the paused machine ``m``.

    ``method``: ``shared`` (zero-copy view of the memory-backend file),
    ``pmemsave`` or ``elf`` (``dump-guest-memory``), or ``auto`` (shared when
    the backend is shared, else pmemsave). Files written by the fallbacks
    live in ``workdir`` and are unlinked once mapped.
    """
    t0 = time.monotonic()
    tm: dict[str, float] = {}
    warnings: list[str] = []

    def lap(name: str, since: float) -> float:
        now = time.monotonic()
        tm[name] = round((now - since) * 1000, 3)
        return now

    st = await m.status()
    if st == "running":
        raise CaptureError("the guest is running; capture needs it paused (panic() stops it)")
    t = time.monotonic()
    hmp_regs = await read_registers(m)
    t = lap("registers", t)
    notes, note_cpus = await read_notes(m, workdir)
    t = lap("notes", t)
    diffs = compare_regs(hmp_regs, note_cpus)
    if diffs:
        warnings += diffs[:16]
    blocks = await read_layout(m)
    t = lap("layout", t)

    if method == "auto":
        method = "shared" if m.ram_fd is not None else "pmemsave"
    cpus = [CpuState(i, r, note_cpus[i].prstatus if i < len(note_cpus) else None) for i, r in enumerate(hmp_regs)]
    keep = [n for n in notes if n.name not in ("CORE", "QEMU")]
    meta = dict(metadata or {})
    meta["capture_method"] = {
        "shared": "shared-memory-backend",
        "pmemsave": "qmp-pmemsave",
        "elf": "qmp-dump-guest-memory",
    }.get(method, method)
    meta.setdefault("ram_bytes", sum(b.size for b in blocks))
    meta["capture_warnings"] = warnings
    try:
        if method == "shared":
            if m.ram_fd is None:
                raise CaptureError("no shared memory backend on this machine; use pmemsave or elf")
            snap = Snapshot.from_file_ranges(
                f"/proc/self/fd/{m.ram_fd}",
                [(b.phys_start, b.offset, b.size) for b in blocks],
                cpus=cpus,
                notes=keep,
                console_tail=console_tail,
                metadata=meta,
            )
        elif method == "pmemsave":
            path, ranges = await _pmemsave_file(m, blocks, workdir)
            try:
                snap = Snapshot.from_file_ranges(
                    path, ranges, cpus=cpus, notes=keep, console_tail=console_tail, metadata=meta
                )
            finally:
                path.unlink(missing_ok=True)
        elif method == "elf":
            path = workdir / f"dump-{os.getpid()}-{time.monotonic_ns()}.elf"
            try:
                await dump_elf(m, path)
                snap = load_elf_snapshot(path)
            finally:
                path.unlink(missing_ok=True)
            snap.cpus = cpus
            snap.notes = keep
            snap.console_tail = console_tail
            snap.metadata = meta
        else:
            raise CaptureError(f"unknown capture method {method!r}")
    except (SnapshotError, OSError, QemuError) as e:
        raise CaptureError(f"capture ({method}): {e}") from e
    lap("memory", t)
    tm["total"] = round((time.monotonic() - t0) * 1000, 3)
    meta["capture_ms"] = dict(tm)
    return CaptureResult(snap, tm, warnings)
