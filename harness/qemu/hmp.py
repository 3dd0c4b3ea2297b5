"""Parsers for HMP text QEMU returns through ``human-monitor-command``.

Why HMP: QMP has no command for the registers of a stopped vCPU or for the
flat RAM map; ``info registers -a`` (~1 ms) and ``info mtree -f`` give both,
and equal what ``dump-guest-memory`` writes (checked by a VM test). The text
is QEMU's, but it is still parsed defensively: bounded size, every value
checked, errors name the CPU and field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["HmpParseError", "parse_registers", "RamBlock", "parse_ram_layout", "MAX_HMP"]

MAX_HMP = 4 << 20


class HmpParseError(ValueError):
    """HMP output did not have the expected shape."""


_CPU_RE = re.compile(r"^CPU#(\d+)\s*$", re.M)
_GPR = {
    "RAX": "rax",
    "RBX": "rbx",
    "RCX": "rcx",
    "RDX": "rdx",
    "RSI": "rsi",
    "RDI": "rdi",
    "RBP": "rbp",
    "RSP": "rsp",
    "R8": "r8",
    "R9": "r9",
    "R10": "r10",
    "R11": "r11",
    "R12": "r12",
    "R13": "r13",
    "R14": "r14",
    "R15": "r15",
    "RIP": "rip",
    "RFL": "rflags",
    "CR0": "cr0",
    "CR2": "cr2",
    "CR3": "cr3",
    "CR4": "cr4",
    "EFER": "efer",
    "DR6": "dr6",
    "DR7": "dr7",
}
_KV_RE = re.compile(r"\b(R[A-Z0-9]{1,2}|CR[0-4]|EFER|DR[67])\s*=([0-9a-fA-F]{1,16})\b")
_SEG_RE = re.compile(r"^(ES|CS|SS|DS|FS|GS|LDT|TR)\s*=([0-9a-f]{4}) ([0-9a-f]{8,16}) ([0-9a-f]{8}) ([0-9a-f]{8})", re.M)
_DT_RE = re.compile(r"^(GDT|IDT)=\s+([0-9a-f]{8,16}) ([0-9a-f]{8})", re.M)
_HLT_RE = re.compile(r"\bHLT=(\d)")
_REQUIRED = ("rip", "rsp", "rflags", "cr0", "cr3", "cr4", "cs")


def parse_registers(text: str) -> list[dict[str, int]]:
    """Registers of every CPU in ``info registers -a`` output, in CPU order.

    Names follow :class:`progdump.snapshot.CpuState`: ``rax``..``r15``,
    ``rip``, ``rflags``, selectors ``cs``..``gs``, ``<seg>_base``,
    ``<seg>_limit``, ``<seg>_flags``, ``fs_base``/``gs_base``, ``ldt``,
    ``tr``, ``gdt_base``/``gdt_limit``, ``idt_base``/``idt_limit``,
    ``cr0`` ``cr2`` ``cr3`` ``cr4`` ``efer`` ``dr6`` ``dr7``, ``halted``.
    """
    if len(text) > MAX_HMP:
        raise HmpParseError(f"register dump of {len(text)} bytes exceeds {MAX_HMP}")
    heads = list(_CPU_RE.finditer(text))
    if not heads:
        raise HmpParseError("no 'CPU#n' header in info registers output")
    cpus: list[dict[str, int]] = []
    for i, h in enumerate(heads):
        idx = int(h.group(1))
        if idx != i:
            raise HmpParseError(f"CPU headers out of order: expected CPU#{i}, got CPU#{idx}")
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        block = text[h.end() : end]
        # FPU/vector registers follow; stop before them so FPR/XMM never confuse the GPR regex.
        cut = block.find("\nFCW=")
        main = block if cut < 0 else block[:cut]
        regs: dict[str, int] = {}
        for m in _KV_RE.finditer(main):
            name = _GPR.get(m.group(1))
            if name is not None and name not in regs:
                regs[name] = int(m.group(2), 16)
        for m in _SEG_RE.finditer(main):
            seg = m.group(1).lower()
            sel, base, limit, flags = (int(m.group(k), 16) for k in range(2, 6))
            regs[seg] = sel
            regs[f"{seg}_base"] = base
            regs[f"{seg}_limit"] = limit
            regs[f"{seg}_flags"] = flags
        for m in _DT_RE.finditer(main):
            dt = m.group(1).lower()
            regs[f"{dt}_base"] = int(m.group(2), 16)
            regs[f"{dt}_limit"] = int(m.group(3), 16)
        hm = _HLT_RE.search(main)
        if hm:
            regs["halted"] = int(hm.group(1))
        missing = [r for r in _REQUIRED if r not in regs]
        if missing:
            raise HmpParseError(f"CPU#{idx}: missing {', '.join(missing)} in info registers output")
        cpus.append(regs)
    return cpus


@dataclass(frozen=True)
class RamBlock:
    """Guest-physical ``[phys_start, phys_start+size)`` is backend bytes at ``offset``."""

    phys_start: int
    size: int
    offset: int


_FLAT_RE = re.compile(
    r"^\s+([0-9a-f]{1,16})-([0-9a-f]{1,16}) \(prio -?\d+, ram\): (\S+)(?: @([0-9a-f]{1,16}))?",
)


def parse_ram_layout(text: str, backend: str) -> list[RamBlock]:
    """RAM of memory backend ``backend`` in the flat view of address space "memory".

    From ``info mtree -f``: QEMU's own map of which guest-physical ranges are
    RAM and where in the backend they live (q35 puts RAM above ~2-2.75 GiB at
    4 GiB and up; ROM shadows 0xc3000-0xfffff). Adjacent blocks that are also
    contiguous in the backend are merged; blocks are cut to whole pages.
    """
    if len(text) > MAX_HMP:
        raise HmpParseError(f"memory tree of {len(text)} bytes exceeds {MAX_HMP}")
    in_view = False
    found_view = False
    blocks: list[RamBlock] = []
    for line in text.splitlines():
        if line.startswith("FlatView #"):
            if found_view:
                break
            in_view = False
            continue
        if line.startswith(' AS "memory",'):
            in_view = found_view = True
            continue
        if not in_view:
            continue
        m = _FLAT_RE.match(line)
        if not m or m.group(3) != backend:
            continue
        start, last = int(m.group(1), 16), int(m.group(2), 16)
        off = int(m.group(4), 16) if m.group(4) else 0
        if last < start:
            raise HmpParseError(f"bad range in memory tree: {line.strip()}")
        # inward page alignment
        a = (start + 0xFFF) & ~0xFFF
        b = (last + 1) & ~0xFFF
        if b <= a:
            continue
        blocks.append(RamBlock(a, b - a, off + (a - start)))
    if not found_view:
        raise HmpParseError('no flat view for address space "memory" in info mtree -f output')
    if not blocks:
        raise HmpParseError(f"no RAM of backend {backend!r} in the memory map")
    blocks.sort(key=lambda b: b.phys_start)
    merged: list[RamBlock] = [blocks[0]]
    for b in blocks[1:]:
        p = merged[-1]
        if b.phys_start < p.phys_start + p.size:
            raise HmpParseError(f"overlapping RAM blocks at {b.phys_start:#x}")
        if b.phys_start == p.phys_start + p.size and b.offset == p.offset + p.size:
            merged[-1] = RamBlock(p.phys_start, p.size + b.size, p.offset)
        else:
            merged.append(b)
    return merged
