"""The generic producer: what any OS's dump gets, with no OS knowledge.

It is the floor every other producer falls back to. Layer 0 gets the
registers of every CPU, the console tail, the snapshot's ELF notes
(VMCOREINFO included, so an offline debugger can still open the memory
layers), identity metadata, and the panic message when the console shows one
in a form we know. It knows no tasks and no page classes: memory goes to the
``all`` layer in physical order.
"""

from __future__ import annotations

import json
import re
import struct

from progdump.layers.base import Artifact, LayerContent, Producer
from progdump.snapshot import Note, Snapshot

__all__ = ["GenericProducer", "core_artifacts", "encode_notes", "decode_notes", "find_panic_message"]

CONSOLE_TAIL_MAX = 64 * 1024

# Panic lines as the kernels print them (Linux panic(); illumos panic.c).
_PANIC_PATTERNS = (
    re.compile(rb"Kernel panic - not syncing: ?(.*)"),
    re.compile(rb"panic\[cpu\d+\]/thread=[0-9a-f]+: ?(.*)"),
    re.compile(rb"^panic: (.*)", re.M),
)

_REG_ORDER = (
    "rip rsp rbp rax rbx rcx rdx rsi rdi r8 r9 r10 r11 r12 r13 r14 r15 "
    "rflags cs ss ds es fs gs fs_base gs_base cr0 cr2 cr3 cr4 efer"
).split()


def encode_notes(notes: list[Note]) -> bytes:
    """Serialize notes as an ELF note section (namesz, descsz, type; 4-byte padded)."""
    out = bytearray()
    for n in notes:
        name = n.name.encode() + b"\0"
        out += struct.pack("<III", len(name), len(n.desc), n.type)
        out += name + b"\0" * (-len(name) % 4)
        out += n.desc + b"\0" * (-len(n.desc) % 4)
    return bytes(out)


def decode_notes(data: bytes, max_notes: int = 4096) -> list[Note]:
    """Parse an ELF note section; stops at the first malformed entry (never raises)."""
    notes: list[Note] = []
    off = 0
    while off + 12 <= len(data) and len(notes) < max_notes:
        namesz, descsz, type_ = struct.unpack_from("<III", data, off)
        off += 12
        name_end = off + namesz
        desc_off = name_end + (-namesz % 4)
        desc_end = desc_off + descsz
        if desc_end > len(data):
            break
        name = data[off:name_end].rstrip(b"\0").decode("ascii", "replace")
        notes.append(Note(name, type_, bytes(data[desc_off:desc_end])))
        off = desc_end + (-descsz % 4)
    return notes


def find_panic_message(console: bytes) -> str | None:
    """The last panic message the console shows, if it matches a known form."""
    best: tuple[int, bytes] | None = None
    for pat in _PANIC_PATTERNS:
        for m in pat.finditer(console):
            if best is None or m.start() > best[0]:
                best = (m.start(), m.group(1))
    if best is None:
        return None
    return best[1].rstrip(b"\r\n").decode("utf-8", "replace")[:1024]


def _fmt_regs(regs: dict[str, int]) -> list[str]:
    names = [r for r in _REG_ORDER if r in regs] + sorted(set(regs) - set(_REG_ORDER))
    cells = [f"{n:>7}: {regs[n]:016x}" for n in names]
    return ["  " + "  ".join(cells[i : i + 3]) for i in range(0, len(cells), 3)]


def identity(snapshot: Snapshot) -> dict[str, object]:
    md = dict(snapshot.metadata)
    vi = snapshot.vmcoreinfo or {}
    if "release" not in md and "OSRELEASE" in vi:
        md["release"] = vi["OSRELEASE"]
    md.setdefault("ram_bytes", snapshot.total_bytes)
    md.setdefault("cpus", len(snapshot.cpus))
    return md


def core_artifacts(snapshot: Snapshot) -> list[Artifact]:
    """Artifacts every plan puts in its first layer, whatever the producer.

    ``elf-notes.bin`` lets recovery rebuild a vmcore a debugger can open.
    """
    tail = snapshot.console_tail[-CONSOLE_TAIL_MAX:]
    regs = [{"cpu": c.index, "regs": c.regs} for c in snapshot.cpus]
    arts = [
        Artifact("registers.json", json.dumps(regs, indent=1, sort_keys=True).encode()),
        Artifact("console.txt", tail),
        Artifact("metadata.json", json.dumps(identity(snapshot), indent=1, sort_keys=True, default=str).encode()),
        Artifact("elf-notes.bin", encode_notes(snapshot.notes)),
    ]
    raw = snapshot.vmcoreinfo_raw
    if raw is not None:
        arts.append(Artifact("vmcoreinfo.txt", raw.rstrip(b"\0")))
    return arts


class GenericProducer(Producer):
    name = "generic"

    def panic(self) -> LayerContent:
        s = self.snapshot
        md = identity(s)
        msg = find_panic_message(s.console_tail)
        lines = ["progdump layer 0 (generic producer: no OS knowledge used)", ""]
        lines.append(f"panic: {msg}" if msg else "panic: (no panic message recognised on the console)")
        for k in ("os", "release", "hostname", "guest", "ram_bytes", "cpus", "panic_event_ns"):
            if k in md:
                lines.append(f"{k}: {md[k]}")
        lines.append("")
        for c in s.cpus:
            lines.append(f"CPU {c.index}:")
            lines += _fmt_regs(c.regs)
        lines += ["", "---- console tail ----", s.console_tail[-CONSOLE_TAIL_MAX:].decode("utf-8", "replace")]
        notes = [] if msg else ["panic message not found on the console"]
        return LayerContent(artifacts=[Artifact("panic.txt", "\n".join(lines).encode())], notes=notes)

    def tasks(self) -> LayerContent:
        return LayerContent(notes=["generic producer: no task list without OS knowledge"])
