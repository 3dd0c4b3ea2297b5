"""ELF core input and output for :class:`~progdump.snapshot.Snapshot`.

Why ELF: it is what QEMU ``dump-guest-memory`` (format ``elf``, ``paging:
false``) writes, what a kdump kernel shows as ``/proc/vmcore``, and what
``crash``, drgn and gdb open. progdump reads its input snapshot from such a
core and writes the recovered memory back as one.

Reading (:func:`load_elf_snapshot`)
-----------------------------------
Accepted: ELF64, little endian, ``ET_CORE``, ``e_machine`` x86-64 (or i386,
which QEMU writes for a CPU not in long mode). ``e_phoff`` is always read,
never assumed to be 64 (QEMU 7.2 puts the program headers at 0xc0 and writes
a wrong ``e_ehsize``); ``PN_XNUM`` (more than 65534 headers) is honoured.

* ``PT_LOAD``: guest-physical address in ``p_paddr`` (``p_vaddr`` is ignored:
  it is 0 in QEMU dumps and a direct-map address in ``/proc/vmcore``). The
  file is mmapped once and every range is a view of it: memory is never
  copied. Bytes past ``p_filesz`` up to ``p_memsz`` read as zero (an anonymous
  read-only mapping, which costs nothing). Ranges are rounded inwards to page
  boundaries; overlapping segments are clipped so the earlier (lower, then
  larger) one wins, as in ``/proc/vmcore`` where the kernel-text segment
  repeats part of a RAM segment. Each adjustment is recorded in
  ``Snapshot.load_warnings``.
* ``PT_NOTE``: ``CORE``/``NT_PRSTATUS`` per CPU (x86-64 ``elf_prstatus``, 336
  bytes, or i386, 144 bytes) -> ``CpuState.regs`` and ``CpuState.prstatus``
  (raw); ``QEMU``/type 0 (``QEMUCPUState``: general registers, segments with
  base/limit/flags, ldt, tr, gdt, idt, cr0-cr4, kernel_gs_base) merged into
  the same CPU, in order; ``PROGDUMP`` notes (console tail, metadata JSON, CPU
  registers JSON) -> ``console_tail``, ``metadata``, ``cpus``. Every other
  note (``VMCOREINFO`` above all) is kept in ``Snapshot.notes`` in file order.

The file is untrusted: header counts and note sizes are bounded, every
offset is checked against the file size, and anything wrong raises
:class:`SnapshotError` naming the header, segment or note at fault. No other
exception escapes for a bad file.

Writing (:class:`ElfCoreWriter`, :func:`save_elf_snapshot`)
-----------------------------------------------------------
:class:`ElfCoreWriter` streams a core with bounded memory::

    notes = snapshot_notes(cpus, other_notes, console_tail, metadata)
    with ElfCoreWriter(path, notes, [ElfSegment(phys, memsz, filesz), ...]) as w:
        for each segment, in the order given:
            w.write(chunk) / w.write_zeros(n)   # exactly filesz bytes in all

Layout: ELF header; program headers at offset 64 (``PT_NOTE`` first, then one
``PT_LOAD`` per segment, ``p_paddr`` = guest-physical, ``p_vaddr`` = 0); the
note data; then each segment's file bytes at a 4 KiB aligned offset. Bytes
from ``filesz`` to ``memsz`` are zero and take no file space; zero runs
inside a segment given to :meth:`ElfCoreWriter.write_zeros` become holes of a
sparse file. Guest-physical ranges not covered by any segment are absent
(not recovered), which is how a partial dump's vmcore shows missing pages.

Why ``p_vaddr`` = 0: the kernel's direct-map base is randomised (KASLR) and
VMCOREINFO does not carry it, so a direct-map address could be wrong; 0 is
what QEMU writes with ``paging: false``. ``crash`` reads ELF vmcores by
``p_paddr`` and accepts QEMU-style cores; drgn adds every segment at
``p_paddr`` as physical memory when any ``p_paddr`` is non-zero and treats a
core with a ``VMCOREINFO`` note as a Linux kernel (it then reads virtual
memory through the page tables named in VMCOREINFO); gdb needs only
``ET_CORE`` with program headers. Both checked by tests/unit/test_elfcore_tools.py.

Registers are written three ways: ``CORE``/``NT_PRSTATUS`` per CPU (the raw
x86-64 descriptor when the CPU came with one, else synthesised from
``regs``), a ``QEMU`` note per CPU whose regs include ``cr3`` (so tools that
look for cr3 there find it), and one ``PROGDUMP`` CPU-registers JSON note that
holds every register and the raw prstatus, so ``load(save(s))`` equals ``s``:
memory, cpus (index, regs, prstatus), notes, console tail and metadata
(metadata must be JSON-serialisable; non-JSON values are written as strings).
"""

from __future__ import annotations

import io
import json
import mmap
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from progdump.snapshot import (
    NT_PROGDUMP_CONSOLE,
    NT_PROGDUMP_CPUREGS,
    NT_PROGDUMP_METADATA,
    PAGE_SIZE,
    PROGDUMP_NOTE_NAME,
    CpuState,
    MemoryRange,
    Note,
    Snapshot,
    SnapshotError,
)

__all__ = [
    "ElfSegment",
    "ElfCoreWriter",
    "load_elf_snapshot",
    "save_elf_snapshot",
    "snapshot_notes",
    "encode_note_section",
    "parse_note_section",
    "parse_prstatus",
    "build_prstatus",
    "parse_qemu_cpustate",
    "build_qemu_cpustate",
    "EM_X86_64",
    "EM_386",
    "NT_PRSTATUS",
]

# ---------------------------------------------------------------------------
# ELF constants and structures (ELF64, little endian)

ELFMAG = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_CORE = 4
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
PN_XNUM = 0xFFFF
NT_PRSTATUS = 1
QEMU_NOTE_NAME = "QEMU"
QEMU_NOTE_TYPE = 0

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # 64 bytes
PHDR = struct.Struct("<IIQQQQQQ")  # 56 bytes
SHDR = struct.Struct("<IIQQQQIIQQ")  # 64 bytes
NHDR = struct.Struct("<III")
assert EHDR.size == 64 and PHDR.size == 56 and SHDR.size == 64

# Bounds for untrusted input.
MAX_PHNUM = 1 << 22  # 4 Mi program headers (224 MiB of headers) is absurd already
MAX_NOTE_SEGMENT = 64 << 20  # one PT_NOTE segment
MAX_NOTES_TOTAL = 64 << 20  # all PT_NOTE segments together
MAX_NOTES = 1 << 16  # notes in all
MAX_NOTE_NAME = 256
MAX_CPUS = 8192
MAX_PHYS = 1 << 52  # x86-64 physical address width
MAX_PRSTATUS_HEX = 4096
MAX_WARNINGS = 64  # load_warnings kept; the rest are counted  # bytes of raw prstatus kept in the JSON note

# x86-64 struct elf_prstatus: 112 bytes of signal/pid/times, pr_reg (27 x u64),
# pr_fpvalid and padding: 336 bytes; pr_pid at 32.
PRSTATUS64_SIZE = 336
PRSTATUS64_REG_OFF = 112
PRSTATUS64_PID_OFF = 32
USER_REGS64 = (
    "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax "
    "rip cs rflags rsp ss fs_base gs_base ds es fs gs"
).split()
# i386 struct elf_prstatus (QEMU writes it for a CPU outside long mode):
# 72 bytes before pr_reg (17 x u32), 144 in all; pr_pid at 24.
PRSTATUS32_SIZE = 144
PRSTATUS32_REG_OFF = 72
PRSTATUS32_PID_OFF = 24
USER_REGS32 = "rbx rcx rdx rsi rdi rbp rax ds es fs gs orig_rax rip cs rflags rsp ss".split()

# QEMU's QEMUCPUState (target/i386/arch_dump.c): version, size (u32 each);
# 18 u64 (rax rbx rcx rdx rsi rdi rsp rbp r8-r15 rip rflags); ten segments
# (selector, limit, flags, pad: u32; base: u64); cr[5]; kernel_gs_base
# (optional: present when size allows).
QEMU_GPRS = "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
QEMU_SEGS = "cs ds es fs gs ss ldt tr gdt idt".split()
QEMU_SEG = struct.Struct("<IIIIQ")
QEMU_HEAD = struct.Struct("<II")
QEMU_CPUSTATE_VERSION = 1
QEMU_CPUSTATE_BASE = QEMU_HEAD.size + 8 * len(QEMU_GPRS) + QEMU_SEG.size * len(QEMU_SEGS) + 8 * 5
QEMU_CPUSTATE_SIZE = QEMU_CPUSTATE_BASE + 8  # with kernel_gs_base: 440
U64 = (1 << 64) - 1

SEGMENT_ALIGN = PAGE_SIZE  # file offset alignment of segment data


# ---------------------------------------------------------------------------
# notes


def encode_note_section(notes: Iterable[Note]) -> bytes:
    """ELF note section bytes: (namesz, descsz, type), name and desc 4-byte padded."""
    out = bytearray()
    for n in notes:
        name = n.name.encode("ascii", "replace") + b"\0"
        out += NHDR.pack(len(name), len(n.desc), n.type & 0xFFFFFFFF)
        out += name + b"\0" * (-len(name) % 4)
        out += n.desc + b"\0" * (-len(n.desc) % 4)
    return bytes(out)


def parse_note_section(data: bytes, where: str = "notes", align: int = 4, max_notes: int = MAX_NOTES) -> list[Note]:
    """Parse a note section; raises :class:`SnapshotError` naming the bad note.

    A header of all zeros ends the section (``/proc/vmcore`` and some
    producers pad with zeros).
    """
    notes: list[Note] = []
    off = 0
    end = len(data)
    while off < end:
        if end - off < NHDR.size:
            if not any(data[off:end]):
                break
            raise SnapshotError(f"{where}: note {len(notes)} at +{off:#x}: header truncated ({end - off} bytes left)")
        namesz, descsz, ntype = NHDR.unpack_from(data, off)
        if namesz == 0 and descsz == 0 and ntype == 0:
            break
        if len(notes) >= max_notes:
            raise SnapshotError(f"{where}: more than {max_notes} notes")
        if namesz > MAX_NOTE_NAME:
            raise SnapshotError(f"{where}: note {len(notes)} at +{off:#x}: name size {namesz} exceeds {MAX_NOTE_NAME}")
        name_off = off + NHDR.size
        desc_off = name_off + namesz + (-namesz % align)
        desc_end = desc_off + descsz
        if desc_off > end or desc_end > end:
            raise SnapshotError(
                f"{where}: note {len(notes)} at +{off:#x}: name {namesz} + descriptor {descsz} bytes "
                f"run past the segment end (+{end:#x})"
            )
        name = bytes(data[name_off : name_off + namesz]).split(b"\0", 1)[0].decode("ascii", "replace")
        notes.append(Note(name, ntype, bytes(data[desc_off:desc_end])))
        off = desc_end + (-descsz % align)
    return notes


# ---------------------------------------------------------------------------
# registers


def parse_prstatus(desc: bytes) -> dict[str, int]:
    """Registers of an x86-64 (336-byte) or i386 (144-byte) ``elf_prstatus``.

    Raises :class:`SnapshotError` for any other size.
    """
    if len(desc) == PRSTATUS64_SIZE:
        vals = struct.unpack_from(f"<{len(USER_REGS64)}Q", desc, PRSTATUS64_REG_OFF)
        return dict(zip(USER_REGS64, vals))
    if len(desc) == PRSTATUS32_SIZE:
        vals = struct.unpack_from(f"<{len(USER_REGS32)}I", desc, PRSTATUS32_REG_OFF)
        return dict(zip(USER_REGS32, vals))
    raise SnapshotError(f"NT_PRSTATUS of {len(desc)} bytes is neither x86-64 (336) nor i386 (144)")


def build_prstatus(regs: dict[str, int], pid: int) -> bytes:
    """A 336-byte x86-64 ``elf_prstatus`` with ``pr_pid`` and ``pr_reg`` filled in."""
    buf = bytearray(PRSTATUS64_SIZE)
    struct.pack_into("<I", buf, PRSTATUS64_PID_OFF, pid & 0xFFFFFFFF)
    struct.pack_into(
        f"<{len(USER_REGS64)}Q", buf, PRSTATUS64_REG_OFF, *(int(regs.get(n, 0)) & U64 for n in USER_REGS64)
    )
    return bytes(buf)


def parse_qemu_cpustate(desc: bytes) -> dict[str, int]:
    """Registers from QEMU's ``QEMUCPUState`` note (cr0-cr4 included)."""
    if len(desc) < QEMU_CPUSTATE_BASE:
        raise SnapshotError(f"QEMU CPU note of {len(desc)} bytes is shorter than {QEMU_CPUSTATE_BASE}")
    _version, size = QEMU_HEAD.unpack_from(desc, 0)
    regs: dict[str, int] = {}
    off = QEMU_HEAD.size
    for name, val in zip(QEMU_GPRS, struct.unpack_from(f"<{len(QEMU_GPRS)}Q", desc, off)):
        regs[name] = val
    off += 8 * len(QEMU_GPRS)
    for seg in QEMU_SEGS:
        selector, limit, flags, _pad, base = QEMU_SEG.unpack_from(desc, off)
        off += QEMU_SEG.size
        if seg in ("gdt", "idt"):
            regs[f"{seg}_base"] = base
            regs[f"{seg}_limit"] = limit
            continue
        regs[seg] = selector
        regs[f"{seg}_base"] = base
        regs[f"{seg}_limit"] = limit
        regs[f"{seg}_flags"] = flags
    cr = struct.unpack_from("<5Q", desc, off)
    off += 40
    regs.update(cr0=cr[0], cr2=cr[2], cr3=cr[3], cr4=cr[4])
    if min(size, len(desc)) >= off + 8:
        (regs["kernel_gs_base"],) = struct.unpack_from("<Q", desc, off)
    return regs


def build_qemu_cpustate(regs: dict[str, int]) -> bytes:
    """A ``QEMUCPUState`` (version 1, 440 bytes) from ``regs`` (missing = 0)."""

    def g(name: str) -> int:
        return int(regs.get(name, 0)) & U64

    out = bytearray(QEMU_HEAD.pack(QEMU_CPUSTATE_VERSION, QEMU_CPUSTATE_SIZE))
    out += struct.pack(f"<{len(QEMU_GPRS)}Q", *(g(n) for n in QEMU_GPRS))
    for seg in QEMU_SEGS:
        sel = 0 if seg in ("gdt", "idt") else g(seg)
        out += QEMU_SEG.pack(
            sel & 0xFFFFFFFF, g(f"{seg}_limit") & 0xFFFFFFFF, g(f"{seg}_flags") & 0xFFFFFFFF, 0, g(f"{seg}_base")
        )
    out += struct.pack("<5Q", g("cr0"), 0, g("cr2"), g("cr3"), g("cr4"))
    out += struct.pack("<Q", g("kernel_gs_base"))
    assert len(out) == QEMU_CPUSTATE_SIZE
    return bytes(out)


# ---------------------------------------------------------------------------
# notes <-> snapshot fields


def _is_regenerated(n: Note) -> bool:
    """Notes that :func:`snapshot_notes` derives from structured fields."""
    if n.name == "CORE" and n.type == NT_PRSTATUS:
        return True
    if n.name == QEMU_NOTE_NAME and n.type == QEMU_NOTE_TYPE:
        return True
    return n.name == PROGDUMP_NOTE_NAME and n.type in (NT_PROGDUMP_CONSOLE, NT_PROGDUMP_METADATA, NT_PROGDUMP_CPUREGS)


def snapshot_notes(
    cpus: list[CpuState],
    notes: list[Note] | None = None,
    console_tail: bytes = b"",
    metadata: dict[str, object] | None = None,
) -> list[Note]:
    """The notes an ELF core written by progdump carries, in order.

    ``CORE``/``NT_PRSTATUS`` per CPU; ``QEMU`` per CPU that has ``cr3``;
    ``notes`` (VMCOREINFO and the rest; any note this function generates
    itself is skipped there); then ``PROGDUMP`` CPU registers JSON, metadata
    JSON (when non-empty) and console tail (when non-empty).
    """
    out: list[Note] = []
    for pos, cpu in enumerate(cpus):
        raw = cpu.prstatus
        if raw is not None and len(raw) == PRSTATUS64_SIZE:
            out.append(Note("CORE", NT_PRSTATUS, bytes(raw)))
        else:
            out.append(Note("CORE", NT_PRSTATUS, build_prstatus(cpu.regs, pid=pos + 1)))
    for cpu in cpus:
        if "cr3" in cpu.regs:
            out.append(Note(QEMU_NOTE_NAME, QEMU_NOTE_TYPE, build_qemu_cpustate(cpu.regs)))
    out.extend(n for n in (notes or []) if not _is_regenerated(n))
    if cpus:
        doc = [
            {
                "index": c.index,
                "regs": {k: int(v) for k, v in c.regs.items()},
                "prstatus": c.prstatus.hex() if c.prstatus is not None else None,
            }
            for c in cpus
        ]
        out.append(Note(PROGDUMP_NOTE_NAME, NT_PROGDUMP_CPUREGS, json.dumps(doc, sort_keys=True).encode()))
    if metadata:
        out.append(
            Note(PROGDUMP_NOTE_NAME, NT_PROGDUMP_METADATA, json.dumps(metadata, sort_keys=True, default=str).encode())
        )
    if console_tail:
        out.append(Note(PROGDUMP_NOTE_NAME, NT_PROGDUMP_CONSOLE, bytes(console_tail)))
    return out


def _cpus_from_json(desc: bytes) -> list[CpuState]:
    """Validate and decode a PROGDUMP CPU-registers note; raises ValueError."""
    doc = json.loads(desc.decode("utf-8"))
    if not isinstance(doc, list) or len(doc) > MAX_CPUS:
        raise ValueError(f"not a list of at most {MAX_CPUS} CPUs")
    cpus = []
    for item in doc:
        if not isinstance(item, dict):
            raise ValueError("CPU entry is not an object")
        index, regs, raw = item.get("index"), item.get("regs"), item.get("prstatus")
        if not isinstance(index, int) or isinstance(index, bool) or not isinstance(regs, dict):
            raise ValueError("CPU entry lacks an integer index or a regs object")
        if not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= U64
            for k, v in regs.items()
        ):
            raise ValueError(f"CPU {index}: registers must be name -> unsigned 64-bit integer")
        if raw is not None and (not isinstance(raw, str) or len(raw) > 2 * MAX_PRSTATUS_HEX):
            raise ValueError(f"CPU {index}: prstatus must be a hex string of at most {MAX_PRSTATUS_HEX} bytes")
        cpus.append(CpuState(index, dict(regs), bytes.fromhex(raw) if raw is not None else None))
    return cpus


@dataclass
class _NoteFields:
    cpus: list[CpuState]
    notes: list[Note]
    console_tail: bytes
    metadata: dict[str, object]


def _fields_from_notes(all_notes: list[Note], warnings: list[str]) -> _NoteFields:
    prstatus: list[bytes] = []
    qemu: list[bytes] = []
    cpuregs: bytes | None = None
    metadata: dict[str, object] = {}
    console = b""
    other: list[Note] = []
    for n in all_notes:
        if n.name == "CORE" and n.type == NT_PRSTATUS:
            prstatus.append(n.desc)
        elif n.name == QEMU_NOTE_NAME and n.type == QEMU_NOTE_TYPE:
            qemu.append(n.desc)
        elif n.name == PROGDUMP_NOTE_NAME and n.type == NT_PROGDUMP_CPUREGS and cpuregs is None:
            cpuregs = n.desc
        elif n.name == PROGDUMP_NOTE_NAME and n.type == NT_PROGDUMP_METADATA and not metadata:
            try:
                doc = json.loads(n.desc.decode("utf-8"))
                if not isinstance(doc, dict):
                    raise ValueError("not a JSON object")
                metadata = doc
            except (ValueError, UnicodeDecodeError, RecursionError) as e:
                warnings.append(f"PROGDUMP metadata note ignored: {e}")
                other.append(n)
        elif n.name == PROGDUMP_NOTE_NAME and n.type == NT_PROGDUMP_CONSOLE and not console:
            console = n.desc
        else:
            other.append(n)
    if len(prstatus) > MAX_CPUS or len(qemu) > MAX_CPUS:
        raise SnapshotError(f"more than {MAX_CPUS} CPU notes ({len(prstatus)} NT_PRSTATUS, {len(qemu)} QEMU)")

    if cpuregs is not None:
        try:
            return _NoteFields(_cpus_from_json(cpuregs), other, console, metadata)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            warnings.append(f"PROGDUMP CPU registers note ignored: {e}")

    if prstatus and qemu and len(prstatus) != len(qemu):
        warnings.append(f"{len(prstatus)} NT_PRSTATUS notes but {len(qemu)} QEMU CPU notes; matched in order")
    cpus = []
    for i in range(max(len(prstatus), len(qemu))):
        regs: dict[str, int] = {}
        raw = prstatus[i] if i < len(prstatus) else None
        if raw is not None:
            try:
                regs.update(parse_prstatus(raw))
            except SnapshotError as e:
                warnings.append(f"CPU {i}: {e}; registers from it ignored")
        if i < len(qemu):
            try:
                regs.update(parse_qemu_cpustate(qemu[i]))  # full 64-bit values and control registers
            except SnapshotError as e:
                warnings.append(f"CPU {i}: {e}; ignored")
        cpus.append(CpuState(i, regs, raw))
    return _NoteFields(cpus, other, console, metadata)


# ---------------------------------------------------------------------------
# reading


class _Phdr(NamedTuple):
    num: int  # the header's position in the table (not `index`: tuple.index)
    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


def _read_headers(mm: mmap.mmap, fsize: int, name: str) -> tuple[int, list[_Phdr]]:
    if fsize < EHDR.size:
        raise SnapshotError(f"{name}: {fsize} bytes is too short for an ELF header")
    (ident, e_type, e_machine, _ver, _entry, e_phoff, e_shoff, _flags, _ehsize, e_phentsize, e_phnum,
     e_shentsize, _shnum, _shstrndx) = EHDR.unpack_from(mm, 0)  # fmt: skip
    if ident[:4] != ELFMAG:
        raise SnapshotError(f"{name}: not an ELF file (magic {bytes(ident[:4])!r})")
    if ident[4] != ELFCLASS64:
        raise SnapshotError(f"{name}: ELF class {ident[4]} is not ELFCLASS64")
    if ident[5] != ELFDATA2LSB:
        raise SnapshotError(f"{name}: ELF data encoding {ident[5]} is not little endian")
    if e_type != ET_CORE:
        raise SnapshotError(f"{name}: ELF type {e_type} is not ET_CORE (4)")
    if e_machine not in (EM_X86_64, EM_386):
        raise SnapshotError(f"{name}: ELF machine {e_machine} is not x86-64 (62) or i386 (3)")
    if e_phentsize != PHDR.size:
        raise SnapshotError(f"{name}: e_phentsize {e_phentsize} is not {PHDR.size}")
    phnum = e_phnum
    if e_phnum == PN_XNUM:
        # The real count is in section header 0's sh_info.
        if e_shentsize != SHDR.size or e_shoff == 0 or e_shoff > fsize - SHDR.size:
            raise SnapshotError(f"{name}: e_phnum is PN_XNUM but section header 0 is missing or out of the file")
        phnum = SHDR.unpack_from(mm, e_shoff)[7]
    if phnum == 0:
        raise SnapshotError(f"{name}: no program headers")
    if phnum > MAX_PHNUM:
        raise SnapshotError(f"{name}: {phnum} program headers exceed the limit of {MAX_PHNUM}")
    if e_phoff < EHDR.size or e_phoff > fsize or phnum * PHDR.size > fsize - e_phoff:
        raise SnapshotError(
            f"{name}: program header table ({phnum} x {PHDR.size} bytes at {e_phoff:#x}) lies outside the file "
            f"({fsize} bytes)"
        )
    phdrs = [_Phdr(i, *PHDR.unpack_from(mm, e_phoff + i * PHDR.size)) for i in range(phnum)]
    return e_machine, phdrs


def _read_notes(mm: mmap.mmap, fsize: int, name: str, phdrs: list[_Phdr]) -> list[Note]:
    notes: list[Note] = []
    total = 0
    for ph in phdrs:
        if ph.type != PT_NOTE:
            continue
        where = f"{name}: PT_NOTE[{ph.num}] at {ph.offset:#x}"
        if ph.filesz > MAX_NOTE_SEGMENT:
            raise SnapshotError(f"{where}: {ph.filesz} bytes exceed the limit of {MAX_NOTE_SEGMENT}")
        if ph.offset > fsize or ph.filesz > fsize - ph.offset:
            raise SnapshotError(f"{where}: {ph.filesz} bytes run past the end of the file ({fsize} bytes)")
        total += ph.filesz
        if total > MAX_NOTES_TOTAL:
            raise SnapshotError(f"{name}: note segments exceed {MAX_NOTES_TOTAL} bytes in all")
        align = 8 if ph.align == 8 else 4
        data = mm[ph.offset : ph.offset + ph.filesz]
        notes += parse_note_section(data, where, align, MAX_NOTES - len(notes))
    return notes


class _Piece(NamedTuple):
    """A page-aligned part of guest memory: ``nfile`` bytes from ``foff``, then zeros."""

    phys: int
    size: int
    foff: int
    nfile: int


def _memory_plan(phdrs: list[_Phdr], fsize: int, name: str, warnings: list[str]) -> list[_Piece]:
    """Page-aligned, sorted, non-overlapping pieces of memory from the PT_LOADs.

    A piece is all file (``nfile == size``), all zero (``nfile == 0``) or one
    page that is partly file and partly zero fill.
    """
    loads = []
    for ph in phdrs:
        if ph.type != PT_LOAD or ph.memsz == 0:
            continue
        where = f"{name}: PT_LOAD[{ph.num}] (paddr {ph.paddr:#x})"
        if ph.filesz > ph.memsz:
            raise SnapshotError(f"{where}: p_filesz {ph.filesz:#x} exceeds p_memsz {ph.memsz:#x}")
        if ph.paddr + ph.memsz > MAX_PHYS:
            raise SnapshotError(
                f"{where}: p_paddr + p_memsz {ph.memsz:#x} lies beyond the 52-bit x86-64 physical address space"
            )
        if ph.offset > fsize or ph.filesz > fsize - ph.offset:
            raise SnapshotError(
                f"{where}: file bytes {ph.offset:#x}+{ph.filesz:#x} run past the end of the file ({fsize:#x} bytes); "
                "truncated core?"
            )
        start = -(-ph.paddr // PAGE_SIZE) * PAGE_SIZE
        end = (ph.paddr + ph.memsz) // PAGE_SIZE * PAGE_SIZE
        if start != ph.paddr or end != ph.paddr + ph.memsz:
            warnings.append(
                f"PT_LOAD[{ph.num}] {ph.paddr:#x}+{ph.memsz:#x} is not page aligned; rounded inwards to "
                f"{start:#x}-{end:#x}"
            )
        if end > start:
            loads.append((start, end, ph))
    loads.sort(key=lambda t: (t[0], -(t[1] - t[0]), t[2].num))

    pieces: list[_Piece] = []
    covered = 0
    for start, end, ph in loads:
        if end <= covered:
            warnings.append(f"PT_LOAD[{ph.num}] {start:#x}-{end:#x} lies inside earlier segments; ignored")
            continue
        if start < covered:
            warnings.append(f"PT_LOAD[{ph.num}] {start:#x}-{end:#x} overlaps earlier segments; clipped to {covered:#x}")
            start = covered
        file_end = ph.paddr + ph.filesz  # physical address where file bytes stop
        fend = min(end, max(start, file_end // PAGE_SIZE * PAGE_SIZE))
        if fend > start:
            pieces.append(_Piece(start, fend - start, ph.offset + (start - ph.paddr), fend - start))
        zstart = fend
        if zstart < end and zstart < file_end:  # one page: file bytes, then zero fill
            pieces.append(_Piece(zstart, PAGE_SIZE, ph.offset + (zstart - ph.paddr), file_end - zstart))
            zstart += PAGE_SIZE
        if zstart < end:
            pieces.append(_Piece(zstart, end - zstart, 0, 0))
        covered = end
    return pieces


def load_elf_snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """Load an ELF core (QEMU dump-guest-memory, /proc/vmcore, progdump's own).

    Raises :class:`SnapshotError` with a message naming what is wrong for any
    unusable file. See the module docstring for what is read.
    """
    name = os.fspath(path)
    try:
        # A FIFO would block the open (and the reads) forever: check the kind first, open
        # non-blocking, and check again what was opened. A core is mapped: a regular file.
        if not stat.S_ISREG(os.stat(name).st_mode):
            raise SnapshotError(f"{name}: not a regular file (an ELF core file is needed)")
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise SnapshotError(f"{name}: cannot open: {e.strerror}") from None
    owned: list[object] = []
    try:
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SnapshotError(f"{name}: not a regular file (an ELF core file is needed)")
            fsize = st.st_size
            if fsize == 0:
                raise SnapshotError(f"{name}: empty file")
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise SnapshotError(f"{name}: cannot map: {e.strerror}") from None
        finally:
            os.close(fd)
        owned.append(mm)
        warnings: list[str] = []
        _machine, phdrs = _read_headers(mm, fsize, name)
        notes = _read_notes(mm, fsize, name, phdrs)
        fields = _fields_from_notes(notes, warnings)
        plan = _memory_plan(phdrs, fsize, name, warnings)

        view = memoryview(mm)
        owned.append(view)
        zero_len = max((p.size for p in plan if p.nfile == 0), default=0)
        zeros = None
        if zero_len:
            try:  # private, read-only, unreserved: every page is the shared zero page
                zeros = mmap.mmap(
                    -1, zero_len, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_NORESERVE", 0), prot=mmap.PROT_READ
                )
            except OSError as e:
                raise SnapshotError(f"{name}: cannot map {zero_len:#x} bytes of zero fill: {e.strerror}") from None
            owned.append(zeros)
            zview = memoryview(zeros)
            owned.append(zview)
        ranges = []
        for p in plan:
            if p.nfile == 0:
                ranges.append(MemoryRange(p.phys, p.size, zview[: p.size]))
            elif p.nfile < p.size:  # a single partly-filled page: the only copy, bounded
                buf = memoryview(bytes(mm[p.foff : p.foff + p.nfile]) + bytes(p.size - p.nfile))
                ranges.append(MemoryRange(p.phys, p.size, buf))
            else:
                ranges.append(MemoryRange(p.phys, p.size, view[p.foff : p.foff + p.size], mm, p.foff))
        snap = Snapshot(
            ranges=ranges,
            cpus=fields.cpus,
            notes=fields.notes,
            console_tail=fields.console_tail,
            metadata=fields.metadata,
            load_warnings=warnings,
            _owned=owned,
        )
        if not ranges:
            warnings.append("no memory: the core has no PT_LOAD with page-sized content")
        if len(warnings) > MAX_WARNINGS:  # e.g. a paging:true dump maps pages many times over
            more = len(warnings) - MAX_WARNINGS
            warnings[MAX_WARNINGS:] = [f"... and {more} more adjustments of the same kinds"]
        return snap
    except SnapshotError:
        _release(owned)
        raise
    except (struct.error, ValueError, OverflowError, MemoryError) as e:  # defensive: report, never traceback
        _release(owned)
        raise SnapshotError(f"{name}: malformed ELF core: {e}") from None


def _release(owned: list[object]) -> None:
    for obj in reversed(owned):
        try:
            if isinstance(obj, memoryview):
                obj.release()
            else:
                obj.close()  # type: ignore[attr-defined]
        except Exception:
            pass


# ---------------------------------------------------------------------------
# writing


class ElfSegment(NamedTuple):
    """One PT_LOAD to write: guest-physical start, memory size, file bytes.

    ``filesz <= memsz``; memory from ``phys_start + filesz`` to
    ``phys_start + memsz`` reads as zero and takes no file space.
    """

    phys_start: int
    memsz: int
    filesz: int


class ElfCoreWriter:
    """Stream an ELF core: headers and notes at open, then segment bytes in order.

    Usage: create with the notes and the segments (sorted by physical address,
    not overlapping), then call :meth:`write` and :meth:`write_zeros` with
    exactly ``filesz`` bytes per segment, in segment order; any chunk size,
    chunks may span segment boundaries. :meth:`close` (or leaving the
    ``with`` block) checks every byte was given and sets the file size.
    Memory use is bounded by the 1 MiB write buffer whatever the core size.
    ``write_zeros`` of 64 KiB or more seeks instead of writing, so zero runs
    become holes of a sparse file.
    """

    BUFFER = 1 << 20
    SEEK_MIN = 64 << 10

    def __init__(
        self,
        path: str | os.PathLike[str],
        notes: list[Note],
        segments: Iterable[ElfSegment | tuple[int, int, int]],
        *,
        e_machine: int = EM_X86_64,
    ) -> None:
        self.path = os.fspath(path)
        self.segments = [ElfSegment(*s) for s in segments]
        prev_end = 0
        for i, s in enumerate(self.segments):
            if min(s) < 0 or s.filesz > s.memsz or s.phys_start + s.memsz > U64 + 1:
                raise ValueError(f"segment {i} {s}: negative, filesz > memsz or beyond 64 bits")
            if s.phys_start < prev_end:
                raise ValueError(f"segment {i} at {s.phys_start:#x} is out of order or overlaps the previous one")
            prev_end = s.phys_start + s.memsz
        note_data = encode_note_section(notes)
        nph = 1 + len(self.segments)
        if nph > MAX_PHNUM:
            raise ValueError(f"{nph} program headers exceed {MAX_PHNUM}")
        xnum = nph >= PN_XNUM
        phoff = EHDR.size
        shoff = phoff + nph * PHDR.size if xnum else 0
        note_off = shoff + SHDR.size if xnum else phoff + nph * PHDR.size
        note_off += -note_off % 8
        off = note_off + len(note_data)
        self._offsets = []
        for s in self.segments:
            # Every PT_LOAD gets a real, aligned offset even with no file bytes:
            # crash sizes the headers from the first PT_LOAD's p_offset.
            off += -off % SEGMENT_ALIGN
            self._offsets.append(off)
            off += s.filesz
        self.total_size = off

        head = bytearray(
            EHDR.pack(
                ELFMAG + bytes([ELFCLASS64, ELFDATA2LSB, EV_CURRENT]) + bytes(9),
                ET_CORE, e_machine, EV_CURRENT, 0, phoff, shoff, 0, EHDR.size, PHDR.size,
                PN_XNUM if xnum else nph, SHDR.size, 1 if xnum else 0, 0,
            )
        )  # fmt: skip
        head += PHDR.pack(PT_NOTE, 0, note_off, 0, 0, len(note_data), len(note_data), 4)
        for s, o in zip(self.segments, self._offsets):
            head += PHDR.pack(PT_LOAD, 7, o, 0, s.phys_start, s.filesz, s.memsz, 0)
        if xnum:
            head += SHDR.pack(0, 0, 0, 0, 0, 0, 0, nph, 0, 0)
        head += bytes(note_off - len(head))
        head += note_data

        self._f = io.FileIO(self.path, "w")
        self._w = io.BufferedWriter(self._f, self.BUFFER)
        self._w.write(head)
        self._pos = len(head)  # logical file position
        self._seg = 0
        self._seg_left = self.segments[0].filesz if self.segments else 0
        self._closed = False
        self._advance()

    # -- streaming ---------------------------------------------------------
    def _advance(self) -> None:
        """Skip finished (or file-less) segments and pad to the next segment's offset."""
        while self._seg < len(self.segments) and self._seg_left == 0:
            self._seg += 1
            if self._seg < len(self.segments):
                self._seg_left = self.segments[self._seg].filesz
        if self._seg < len(self.segments) and self.segments[self._seg].filesz and self._pos < self._offsets[self._seg]:
            self._skip(self._offsets[self._seg] - self._pos)

    def _skip(self, n: int) -> None:
        if n < self.SEEK_MIN:
            self._w.write(bytes(n))
        else:
            self._w.seek(n, os.SEEK_CUR)
        self._pos += n

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append the next bytes of the current segment(s)."""
        mv = memoryview(data).cast("B")
        while len(mv):
            if self._seg >= len(self.segments):
                raise ValueError(f"{self.path}: {len(mv)} bytes written past the last segment")
            n = min(len(mv), self._seg_left)
            self._w.write(mv[:n])
            self._pos += n
            self._seg_left -= n
            mv = mv[n:]
            self._advance()

    def write_zeros(self, n: int) -> None:
        """Append ``n`` zero bytes of the current segment(s); large runs become file holes."""
        while n > 0:
            if self._seg >= len(self.segments):
                raise ValueError(f"{self.path}: {n} zero bytes written past the last segment")
            k = min(n, self._seg_left)
            self._skip(k)
            self._seg_left -= k
            n -= k
            self._advance()

    @property
    def current_segment(self) -> int:
        """Index of the segment the next byte goes to (``len(segments)`` when all are done)."""
        return self._seg

    def close(self) -> None:
        """Flush, set the file size, and check that every segment got all its bytes."""
        if self._closed:
            return
        self._closed = True
        try:
            self._w.flush()
            self._f.truncate(self.total_size)
        finally:
            self._w.close()
        if self._seg < len(self.segments):
            s = self.segments[self._seg]
            raise ValueError(
                f"{self.path}: segment {self._seg} at {s.phys_start:#x} got {s.filesz - self._seg_left} of "
                f"{s.filesz} bytes; core is incomplete"
            )

    def abort(self) -> None:
        """Close without the completeness check (the file is left incomplete)."""
        if not self._closed:
            self._closed = True
            try:
                self._w.close()
            except OSError:
                pass

    def __enter__(self) -> ElfCoreWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


ZERO_PAGE = bytes(PAGE_SIZE)
_SCAN = 256 * PAGE_SIZE  # bytes examined at a time when saving


def _zero_pages_tail(buf: memoryview, size: int) -> int:
    """Bytes of file content needed: ``size`` less the run of zero pages at its end."""
    end = size
    while end > 0:
        start = max(0, end - _SCAN)
        chunk = bytes(buf[start:end])
        if chunk == bytes(len(chunk)):
            end = start
            continue
        # Find the last non-zero page in this chunk.
        p = len(chunk) - PAGE_SIZE
        while p >= 0 and chunk[p : p + PAGE_SIZE] == ZERO_PAGE:
            p -= PAGE_SIZE
        return start + p + PAGE_SIZE
    return 0


def save_elf_snapshot(snapshot: Snapshot, path: str | os.PathLike[str]) -> None:
    """Write ``snapshot`` as an ELF core (see the module docstring).

    One PT_LOAD per physically contiguous run of ranges. Zero pages at the end
    of a run are left out of the file (``p_memsz > p_filesz``); zero runs
    inside become holes of a sparse file. Memory use is bounded (1 MiB chunks).
    """
    groups: list[list[MemoryRange]] = []
    for r in snapshot.ranges:
        if groups and groups[-1][-1].phys_end == r.phys_start:
            groups[-1].append(r)
        else:
            groups.append([r])
    segments = []
    for g in groups:
        memsz = sum(r.size for r in g)
        filesz = 0
        tail = 0
        for r in reversed(g):  # zero pages at the end of the run need no file bytes
            need = _zero_pages_tail(r.buffer, r.size)
            if need:
                filesz = memsz - tail - (r.size - need)
                break
            tail += r.size
        segments.append(ElfSegment(g[0].phys_start, memsz, filesz))
    notes = snapshot_notes(snapshot.cpus, snapshot.notes, snapshot.console_tail, snapshot.metadata)
    with ElfCoreWriter(path, notes, segments) as w:
        for g, seg in zip(groups, segments):
            left = seg.filesz
            for r in g:
                off = 0
                while off < r.size and left > 0:
                    n = min(_SCAN, r.size - off, left)
                    _write_sparse(w, r.buffer[off : off + n])
                    snapshot.release_phys(r.phys_start + off, n)  # keep the resident set bounded
                    off += n
                    left -= n


def _write_sparse(w: ElfCoreWriter, chunk: memoryview) -> None:
    """Write ``chunk``, turning runs of zero pages into :meth:`ElfCoreWriter.write_zeros`."""
    data = bytes(chunk)
    if data == bytes(len(data)):
        w.write_zeros(len(data))
        return
    n = len(data)
    p = 0
    while p < n:
        q = p
        if data[p : p + PAGE_SIZE] == ZERO_PAGE[: min(PAGE_SIZE, n - p)]:
            while q < n and data[q : q + PAGE_SIZE] == ZERO_PAGE[: min(PAGE_SIZE, n - q)]:
                q += PAGE_SIZE
            w.write_zeros(min(q, n) - p)
        else:
            while q < n and data[q : q + PAGE_SIZE] != ZERO_PAGE[: min(PAGE_SIZE, n - q)]:
                q += PAGE_SIZE
            w.write(memoryview(data)[p : min(q, n)])
        p = min(q, n)
