"""Kernel stack backtraces, each frame labelled with the method that found it.

Why two methods: an operator must know which frames are certain.

* **ORC** (``method="orc"``): the kernel's own unwinder tables
  (``__start_orc_unwind_ip`` / ``__start_orc_unwind``, found through
  kallsyms, entry layout checked against BTF's ``struct orc_entry``) replayed
  on the frozen stack from real registers, as ``arch/x86/kernel/unwind_orc.c``
  does, with each loaded module's own tables (``mod->arch.orc_unwind*``)
  for module text. Frames are reliable as long as the tables and the stack
  are intact; the walk stops, saying why, at the first frame it cannot
  follow.
* **stack scan** (``method="stack scan"``): every word on the stack that
  points into kernel text. A word right after a ``call`` instruction is a
  plausible return address, but it may be stale (left by an earlier call):
  these frames are guesses and are always labelled so, like the kernel's
  ``?`` frames.
"""

from __future__ import annotations

import array
import bisect
import struct
from dataclasses import dataclass
from typing import Any, Protocol

from progdump.layers.linux.translate import FaultError

__all__ = [
    "Frame",
    "MemoryBytes",
    "OrcTable",
    "OrcSet",
    "orc_unwind",
    "stack_scan",
    "stacks_of",
    "THREAD_SIZE",
    "is_call_preceded",
]

THREAD_SIZE = 16384
MAX_FRAMES = 64
ORC_REG_UNDEFINED, ORC_REG_PREV_SP, ORC_REG_DX, ORC_REG_DI, ORC_REG_BP, ORC_REG_SP = 0, 1, 2, 3, 4, 5
ORC_REG_R10, ORC_REG_R13, ORC_REG_BP_INDIRECT, ORC_REG_SP_INDIRECT = 6, 7, 8, 9
ORC_TYPE_CALL, ORC_TYPE_REGS, ORC_TYPE_REGS_PARTIAL = 0, 1, 2
PT_REGS_SIZE = 168
# struct pt_regs (x86-64) member offsets used by the unwinder
PT = {
    "r15": 0,
    "r14": 8,
    "r13": 16,
    "r12": 24,
    "bp": 32,
    "bx": 40,
    "r11": 48,
    "r10": 56,
    "r9": 64,
    "r8": 72,
    "ax": 80,
    "cx": 88,
    "dx": 96,
    "si": 104,
    "di": 112,
    "orig_ax": 120,
    "ip": 128,
    "cs": 136,
    "flags": 144,
    "sp": 152,
    "ss": 160,
}
IRET_FRAME_OFFSET = PT["ip"]
KERNEL_MIN = 0xFFFF800000000000


@dataclass(frozen=True)
class Frame:
    address: int
    symbol: str  # name+0xoff/0xsize, or the hex address
    method: str  # "orc", "stack scan", "registers", "log"
    reliable: bool
    stack_addr: int = 0  # where on the stack it was found (0: from a register)
    note: str = ""
    sp: int = 0  # ORC: the stack pointer at this frame (which stack the walk was on)

    def as_dict(self) -> dict[str, object]:
        return {
            "address": f"{self.address:#x}",
            "symbol": self.symbol,
            "method": self.method,
            "reliable": self.reliable,
            "stack_addr": f"{self.stack_addr:#x}" if self.stack_addr else None,
            "note": self.note or None,
        }


class MemoryBytes:
    """``length`` bytes of guest memory at ``va``, read a slice at a time (only ``len`` and slicing).

    Why: vmlinux's ORC entry table is ~2 MiB and an unwind reads a few
    dozen 6-byte entries of it; copying it whole is most of building the
    table on the layer-0 path. The caller checks once that it is readable.
    """

    def __init__(self, mem, va: int, length: int) -> None:  # type: ignore[no-untyped-def]
        self.mem, self.va, self.length = mem, va, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, s: slice) -> bytes:
        start, stop, _ = s.indices(self.length)
        return self.mem.read(self.va + start, max(0, stop - start))


class ByteTable(Protocol):
    """What the ORC entries are read from: bytes, or guest memory read on demand (MemoryBytes)."""

    def __len__(self) -> int: ...

    def __getitem__(self, s: slice) -> bytes: ...


class OrcTable:
    """The vmlinux ORC tables: sorted ips and 6-byte entries (pure over bytes)."""

    def __init__(self, ip_table_va: int, ip_table: bytes, entries: ByteTable) -> None:
        n = len(ip_table) // 4
        if len(entries) < 6 * n:
            raise ValueError("ORC entry table shorter than its ip table")
        self.entries = entries
        self._np: Any  # numpy uint64 ips, or None without numpy
        self.ips: Any  # the same array, or array('Q')
        try:
            import numpy as np  # noqa: PLC0415

            rel = np.frombuffer(ip_table, dtype="<i4", count=n).astype(np.int64)
            base = np.uint64(ip_table_va)
            # ip = &table[i] + table[i], modulo 2^64
            self._np = (base + np.arange(n, dtype=np.uint64) * np.uint64(4)) + rel.astype(np.uint64)
            self.ips = self._np
        except ImportError:
            self._np = None
            rel32 = array.array("i")
            rel32.frombytes(ip_table[: 4 * n])
            mask = (1 << 64) - 1
            # array('Q'), not a list: 8 bytes per entry however large the table claims to be
            self.ips = array.array("Q", ((ip_table_va + 4 * i + r) & mask for i, r in enumerate(rel32)))

    def _index(self, ip: int) -> int:
        if self._np is not None:
            import numpy as np  # noqa: PLC0415

            return int(np.searchsorted(self._np, np.uint64(ip), side="right")) - 1
        return bisect.bisect_right(self.ips, ip) - 1

    def __len__(self) -> int:
        return len(self.ips)

    def find(self, ip: int) -> tuple[int, int, int, int, int, int] | None:
        """``(sp_offset, bp_offset, sp_reg, bp_reg, type, end)`` covering ``ip``."""
        i = self._index(ip)
        if i < 0 or ip - int(self.ips[i]) > 1 << 20:
            return None
        sp_off, bp_off, bits = struct.unpack("<hhH", self.entries[6 * i : 6 * i + 6])
        return sp_off, bp_off, bits & 0xF, (bits >> 4) & 0xF, (bits >> 8) & 0x3, (bits >> 10) & 1


class OrcSet:
    """vmlinux's ORC table plus each module's, looked up by the module's text range."""

    def __init__(self, vmlinux: OrcTable) -> None:
        self.vmlinux = vmlinux
        self._mods: list[tuple[int, int, OrcTable]] = []

    def add(self, lo: int, hi: int, table: OrcTable) -> None:
        self._mods.append((lo, hi, table))
        self._mods.sort(key=lambda m: m[0])

    def __len__(self) -> int:
        return len(self.vmlinux) + sum(len(t) for _, _, t in self._mods)

    def find(self, ip: int) -> tuple[int, int, int, int, int, int] | None:
        for lo, hi, t in self._mods:
            if lo <= ip < hi:
                return t.find(ip)
        return self.vmlinux.find(ip)


def orc_unwind(
    mem,
    syms,
    orc: OrcTable | OrcSet,
    ip: int,
    sp: int,
    bp: int,
    regs_valid: bool = True,
    stack_lo: int = 0,
    stack_hi: int = 1 << 64,
    max_frames: int = MAX_FRAMES,
) -> tuple[list[Frame], str]:
    """Unwind from ``(ip, sp, bp)``: frames and the reason the walk ended.

    ``regs_valid`` is true when ``ip`` came from a register (the first lookup
    uses ``ip`` itself) and false when it is a return address (``ip - 1``).
    """
    frames: list[Frame] = []
    signal = regs_valid
    regs: int | None = None  # address of a full pt_regs on the stack
    for _ in range(max_frames):
        if ip < KERNEL_MIN:
            return frames, "reached user mode"
        frames.append(Frame(ip, syms.format(ip, return_address=not signal), "orc", True, sp=sp))
        e = orc.find(ip if signal else ip - 1)
        if e is None:
            where = "text without ORC data" if syms.is_text(ip) else "not in known text"
            return frames, f"no ORC entry for {ip:#x} ({where}); stack scan below may continue"
        sp_off, bp_off, sp_reg, bp_reg, typ, end = e
        if sp_reg == ORC_REG_UNDEFINED:
            return frames, "end of stack (ORC)" if end else f"ORC says undefined stack at {ip:#x}"
        try:
            indirect = False
            if sp_reg == ORC_REG_SP:
                new_sp = sp + sp_off
            elif sp_reg == ORC_REG_BP:
                new_sp = bp + sp_off
            elif sp_reg == ORC_REG_SP_INDIRECT:
                new_sp, indirect = sp, True
            elif sp_reg == ORC_REG_BP_INDIRECT:
                new_sp, indirect = bp + sp_off, True
            elif sp_reg in (ORC_REG_R10, ORC_REG_R13, ORC_REG_DI, ORC_REG_DX) and regs is not None:
                name = {ORC_REG_R10: "r10", ORC_REG_R13: "r13", ORC_REG_DI: "di", ORC_REG_DX: "dx"}[sp_reg]
                new_sp = mem.u64(regs + PT[name])
            else:
                return frames, f"ORC stack register {sp_reg} unavailable at {ip:#x}"
            if indirect:
                new_sp = mem.u64(new_sp)
                if sp_reg == ORC_REG_SP_INDIRECT:
                    new_sp += sp_off
            new_sp &= (1 << 64) - 1
            if typ == ORC_TYPE_CALL:
                new_ip = mem.u64(new_sp - 8)
                regs, signal, nxt_sp = None, False, new_sp
            elif typ == ORC_TYPE_REGS:
                regs = new_sp
                new_ip = mem.u64(regs + PT["ip"])
                nxt_sp = mem.u64(regs + PT["sp"])
                signal = True
            elif typ == ORC_TYPE_REGS_PARTIAL:
                base = new_sp - IRET_FRAME_OFFSET
                new_ip = mem.u64(base + PT["ip"])
                nxt_sp = mem.u64(base + PT["sp"])
                regs, signal = None, True
            else:
                return frames, f"unknown ORC type {typ} at {ip:#x}"
            if bp_reg == ORC_REG_PREV_SP:
                bp = mem.u64(new_sp + bp_off)
            elif bp_reg == ORC_REG_BP:
                bp = mem.u64(bp + bp_off)
            elif bp_reg == ORC_REG_UNDEFINED and typ == ORC_TYPE_REGS:
                bp = mem.u64(regs + PT["bp"])  # type: ignore[operator]
        except FaultError as ex:
            return frames, f"stack unreadable: {ex}"
        if typ == ORC_TYPE_CALL and nxt_sp <= sp and nxt_sp // THREAD_SIZE == sp // THREAD_SIZE:
            # moving down within one stack is a loop; a lower address on another
            # stack (IRQ stack -> task stack) is a legitimate stack switch
            return frames, f"stack pointer went backwards at {ip:#x}"
        ip, sp = new_ip, nxt_sp
    return frames, f"stopped after {max_frames} frames"


def is_call_preceded(mem, addr: int) -> bool:
    """Do the bytes before ``addr`` end with a ``call`` (rel32 or indirect)?"""
    try:
        b = mem.read(addr - 7, 7)
    except FaultError:
        return False
    if b[2] == 0xE8:  # call rel32
        return True
    for k in (2, 3, 6, 7):  # call *r/m64: FF /2 with modrm at -k+1
        i = 7 - k
        if b[i] == 0xFF and (b[i + 1] >> 3) & 7 == 2:
            return True
    return False


def stacks_of(sps: list[int]) -> list[tuple[int, int]]:
    """``(lowest sp, top)`` of each distinct stack the stack pointers visit, in visit order.

    Task and IRQ stacks are THREAD_SIZE aligned; an exception stack (NMI,
    #DF ...) is smaller, and :func:`stack_scan` stops at its guard page.
    """
    out: dict[int, int] = {}
    for sp in sps:
        if sp < KERNEL_MIN:
            continue
        top = (sp & ~(THREAD_SIZE - 1)) + THREAD_SIZE
        out[top] = min(out.get(top, sp), sp)
    return [(lo, top) for top, lo in out.items()]


def stack_scan(
    mem, syms, sp: int, stack_hi: int, text_ok=None, max_frames: int = MAX_FRAMES
) -> tuple[list[Frame], str]:
    """Text addresses found on the stack from ``sp`` up to ``stack_hi``."""
    frames: list[Frame] = []
    sp &= ~7
    if not sp < stack_hi <= sp + THREAD_SIZE * 4:
        return frames, f"stack bounds {sp:#x}..{stack_hi:#x} implausible"
    data = b""
    end_note = "top of stack"
    va = sp
    while va < stack_hi:  # page by page: exception stacks end below the task-stack alignment
        n = min(stack_hi, (va | 0xFFF) + 1) - va
        try:
            data += mem.read(va, n)
        except FaultError:
            end_note = f"stack ends at unreadable page {va:#x}"
            break
        va += n
    if not data:
        return frames, f"stack unreadable at {sp:#x}"
    is_text = text_ok or syms.is_text
    for i, (w,) in enumerate(struct.iter_unpack("<Q", data)):
        if w < KERNEL_MIN or not is_text(w):
            continue
        call = is_call_preceded(mem, w)
        note = "after a call: plausible return address, may be stale" if call else "not after a call: likely data"
        if not call:
            continue
        frames.append(Frame(w, syms.format(w, return_address=True), "stack scan", False, sp + 8 * i, note))
        if len(frames) >= max_frames:
            return frames, f"stopped after {max_frames} frames"
    return frames, end_note
