"""Layer 0 as a kernel's dump path would write it: raw pages now, text at recovery.

Why: decoding the panic (kallsyms, BTF, ORC, the printk records) takes
100-300 ms of Python before anything reaches the device. A dump path copies
memory; it does not decode it. So the ``panic-raw`` part of a plan holds
only the *pages* the panic text is made from:

* the printk ring buffer: its ``struct printk_ringbuffer`` (and the ``prb``
  pointer's page), the descriptor and info arrays and the text data ring,
  located with VMCOREINFO alone (``SYMBOL(prb)`` and the ring's offsets);
* every CPU's current stack (the ``THREAD_SIZE``-aligned block around its
  saved ``rsp``), where the panicking task's frames are;
* every page-table page walked to find those pages, so recovery translates
  the same virtual addresses again from layer 0 alone.

Registers, VMCOREINFO, the notes and the console tail are the core artifacts
every plan puts in its first layer already. ``progdump recover`` renders
``dmesg.txt`` and ``panic.txt`` from these pages with the same printk reader
(:mod:`progdump.layers.linux.recovery`); the fully decoded text follows in
the next layer.

Which pages were read is recorded by wrapping the snapshot: the capture
reads exactly what the recovery-side reader will read, no more.
"""

from __future__ import annotations

import json

from progdump.errors import ProgdumpError
from progdump.layers.base import Artifact, LayerContent
from progdump.layers.linux.printk import PrintkError, ring_regions
from progdump.layers.linux.translate import FaultError, KernelMemory
from progdump.layers.linux.unwind import THREAD_SIZE
from progdump.layers.linux.vmcoreinfo import Vmcoreinfo, VmcoreinfoMissing
from progdump.snapshot import PAGE_SIZE, Snapshot, SnapshotError

__all__ = ["RawPanicError", "minimal_memory", "raw_panic", "RAW_ARTIFACT"]

RAW_ARTIFACT = "panic-raw.json"
MAX_RAW_PAGES = 16384  # 64 MiB: a bound on what layer 0 may hold, whatever the guest claims


class RawPanicError(ProgdumpError):
    """The snapshot lacks what the raw capture needs; the message says what."""


class _Recording:
    """A snapshot proxy that notes every page frame read through it."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.s = snapshot
        self.ranges = snapshot.ranges
        self.pfns: set[int] = set()

    def _note(self, paddr: int, length: int) -> None:
        self.pfns.update(range(paddr // PAGE_SIZE, (paddr + max(length, 1) - 1) // PAGE_SIZE + 1))

    def view_phys(self, paddr: int, length: int) -> memoryview:
        v = self.s.view_phys(paddr, length)
        self._note(paddr, length)
        return v

    def read_phys(self, paddr: int, length: int) -> bytes:
        b = self.s.read_phys(paddr, length)
        self._note(paddr, length)
        return b

    def has_phys(self, paddr: int, length: int = 1) -> bool:
        return self.s.has_phys(paddr, length)


def minimal_memory(snapshot) -> tuple[KernelMemory, Vmcoreinfo]:  # type: ignore[no-untyped-def]
    """Kernel virtual memory from VMCOREINFO alone (no kallsyms): page-table walks from the top table."""
    raw = snapshot.vmcoreinfo_raw if hasattr(snapshot, "vmcoreinfo_raw") else snapshot.s.vmcoreinfo_raw
    if raw is None:
        raise RawPanicError("no VMCOREINFO note")
    vi = Vmcoreinfo(raw)
    try:
        phys_base = vi.number("phys_base")
        levels = 5 if ("NUMBER(pgtable_l5_enabled)" in vi and vi.number("pgtable_l5_enabled")) else 4
        sme = vi.number("sme_mask") if "NUMBER(sme_mask)" in vi else 0
        top = vi.symbol("init_top_pgt") if "SYMBOL(init_top_pgt)" in vi else vi.symbol("swapper_pg_dir")
    except (VmcoreinfoMissing, ValueError) as e:
        raise RawPanicError(f"VMCOREINFO unusable: {e}") from None
    mem = KernelMemory(snapshot, phys_base, 0, levels, sme)
    pgd = mem.image_to_phys(top)
    if pgd is None or not snapshot.has_phys(pgd, PAGE_SIZE):
        raise RawPanicError(f"top page table {top:#x} not in the snapshot")
    mem.pgd = pgd
    return mem, vi


def _runs(pfns: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for p in pfns:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


def raw_panic(snapshot: Snapshot) -> LayerContent:
    """Layer 0's raw content (see the module docstring). Raises :class:`RawPanicError` when impossible."""
    rec = _Recording(snapshot)
    mem, vi = minimal_memory(rec)
    notes: list[str] = []
    regions: list[dict[str, object]] = []
    try:
        wanted = ring_regions(mem, vi)
    except PrintkError as e:
        wanted = []
        notes.append(f"raw layer 0: no printk ring ({e}); stacks and registers only")
    for c in snapshot.cpus:
        rsp = c.regs.get("rsp", 0)
        if rsp:
            wanted.append((f"cpu {c.index} stack", rsp & ~(THREAD_SIZE - 1), THREAD_SIZE))
    for what, va, length in wanted:
        got = 0
        try:
            for _va, pa, n in mem.chunks(va, length):
                if snapshot.has_phys(pa, n):
                    rec._note(pa, n)
                    got += n
        except (FaultError, SnapshotError) as e:
            notes.append(f"raw layer 0: {what} at {va:#x}: {e}")
        regions.append({"what": what, "va": f"{va:#x}", "length": length, "mapped": got})
    pfns = sorted(p for p in rec.pfns if snapshot.has_phys(p * PAGE_SIZE, PAGE_SIZE))
    if len(pfns) > MAX_RAW_PAGES:
        notes.append(f"raw layer 0: {len(pfns)} pages wanted, the first {MAX_RAW_PAGES} kept")
        pfns = pfns[:MAX_RAW_PAGES]
    runs = _runs(pfns)
    doc = {
        "format": 1,
        "regions": regions,
        "pages": len(pfns),
        "render": "progdump recover renders dmesg.txt and panic.txt from these pages (progdump.layers.linux.recovery)",
    }
    return LayerContent(artifacts=[Artifact(RAW_ARTIFACT, json.dumps(doc, indent=1).encode())],
                        page_runs=lambda: iter(runs), notes=notes)  # fmt: skip
