"""The illumos symbol and offset manifest: what the host knows of a guest kernel.

Why a manifest: an illumos kernel carries no VMCOREINFO. Before the panic the
controller asks the live guest (over SSH, as root) for the addresses of the
symbols the dump path reads and for the structure offsets layer 1 needs:

* symbols from ``/dev/ksyms`` (ksyms(4D): an ELF image whose SYMTAB holds
  absolute kernel virtual addresses, locals first, ``st_shndx = SHN_ABS``),
  read with :func:`ksyms_symbols`;
* offsets and sizes from ``mdb -k``: ``::offsetof TYPE MEMBER`` prints
  ``offsetof (TYPE, MEMBER) = 0x18, sizeof (...->MEMBER) = 8`` and ``::sizeof
  TYPE`` prints ``sizeof (TYPE) = 0xa08`` (illumos-gate
  ``usr/src/cmd/mdb/common/mdb/mdb_cmds.c``, ``cmd_offsetof``/``cmd_sizeof``;
  the ``%#lr`` format is the current radix, 16 by default, with ``0x``).

illumos has no KASLR but modules load anywhere and structures change between
releases, so the manifest is gathered again after every boot and travels with
the snapshot as an ELF note (owner ``PROGDUMP``, type
:data:`NT_PROGDUMP_ILLUMOS_MANIFEST`, a JSON object). Its presence is what the
illumos producer accepts a snapshot on.

Everything here is pure and bounded: mdb output and ksyms are untrusted.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from progdump.errors import ProgdumpError
from progdump.snapshot import PROGDUMP_NOTE_NAME, Note, Snapshot

__all__ = [
    "NT_PROGDUMP_ILLUMOS_MANIFEST",
    "MANIFEST_VERSION",
    "WANTED_SYMBOLS",
    "WANTED_OFFSETS",
    "WANTED_SIZES",
    "Manifest",
    "ManifestError",
    "mdb_script",
    "parse_mdb_output",
    "ksyms_symbols",
    "manifest_note",
    "manifest_from_snapshot",
]

NT_PROGDUMP_ILLUMOS_MANIFEST = 0x50440010  # next to the PROGDUMP note types in progdump/snapshot.py
MANIFEST_VERSION = 1
MAX_MDB_OUTPUT = 1 << 20
MAX_MANIFEST_JSON = 1 << 20
MAX_KSYMS = 64 << 20
MAX_SYMBOLS = 1 << 20

#: symbols the illumos producer reads (``usr/src/uts/common/sys/panic.h``, ``os/log.c``, ``os/thread.c``)
WANTED_SYMBOLS = (
    "panicbuf",  # char panicbuf[PANICBUFSIZE]: a panic_data_t (sys/panic.h)
    "panicstr",  # const char *: set once panic() starts
    "panic_thread",  # kthread_t *
    "panic_cpu",  # cpu_t (a copy of the panicking CPU's cpu_t)
    "panic_reg",  # struct regs *: the trap frame, when a trap panicked
    "panic_hrtime",
    "log_recentq",  # static queue_t *: recent messages (os/log.c; what mdb ::msgbuf walks)
    "allthreads",  # kthread_t *: circular list through t_next
    "practive",  # proc_t *: list through p_next
    "utsname",  # struct utsname
    "dumphdr",  # dumphdr_t *
)

#: (type, member) pairs for layer 1; each key in :attr:`Manifest.offsets` is ``type.member``
WANTED_OFFSETS = (
    ("kthread_t", "t_next"),
    ("kthread_t", "t_stk"),
    ("kthread_t", "t_stkbase"),
    ("kthread_t", "t_state"),
    ("kthread_t", "t_tid"),
    ("kthread_t", "t_pri"),
    ("kthread_t", "t_procp"),
    ("kthread_t", "t_cpu"),
    ("kthread_t", "t_pcb"),
    ("proc_t", "p_next"),
    ("proc_t", "p_pidp"),
    ("proc_t", "p_user"),
    ("struct pid", "pid_id"),
    ("user_t", "u_comm"),
    ("cpu_t", "cpu_id"),
    ("queue_t", "q_first"),
    ("mblk_t", "b_next"),
    ("mblk_t", "b_cont"),
    ("mblk_t", "b_rptr"),
    ("mblk_t", "b_wptr"),
    ("log_ctl_t", "seq_no"),
    ("log_ctl_t", "ttime"),
    ("log_ctl_t", "level"),
    ("log_ctl_t", "flags"),
)
WANTED_SIZES = ("kthread_t", "proc_t", "cpu_t", "log_ctl_t", "mblk_t")

_HEADER = "== progdump illumos manifest v1"
_OFFSETOF = re.compile(
    r"^offsetof \(([\w ]+), (\w+)\) = (0x[0-9a-fA-F]+|\d+)(?:\.\d+)?(?:, sizeof \(\.\.\.->\w+\) = (0x[0-9a-fA-F]+|\d+))?\s*$"
)
_SIZEOF = re.compile(r"^sizeof \(([\w ]+)\) = (0x[0-9a-fA-F]+|\d+)\s*$")
_NAME_RE = re.compile(r"^[\w .]{1,64}$")


class ManifestError(ProgdumpError, ValueError):
    """The manifest (mdb output, ksyms, or the note) is malformed; the message says where."""


@dataclass
class Manifest:
    """Symbols (name -> kernel VA), offsets (``type.member`` -> bytes), sizes (type -> bytes)."""

    symbols: dict[str, int] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    release: str = ""
    page_size: int = 4096
    errors: list[str] = field(default_factory=list)  # what mdb refused (kept: it tells the reader why)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "os": "illumos",
            "release": self.release,
            "page_size": self.page_size,
            "symbols": {k: f"{v:#x}" for k, v in sorted(self.symbols.items())},
            "offsets": dict(sorted(self.offsets.items())),
            "sizes": dict(sorted(self.sizes.items())),
            "errors": self.errors[:64],
        }

    @classmethod
    def from_json(cls, doc: Any) -> Manifest:
        if not isinstance(doc, dict) or doc.get("os") != "illumos":
            raise ManifestError("not an illumos manifest (want a JSON object with os=illumos)")
        if doc.get("version") != MANIFEST_VERSION:
            raise ManifestError(f"manifest version {doc.get('version')!r}, this reader knows {MANIFEST_VERSION}")
        m = cls(release=str(doc.get("release", ""))[:256])
        try:
            ps = int(doc.get("page_size", 4096))
            if ps not in (4096, 8192):
                raise ManifestError(f"page_size {ps} is not 4096 or 8192")
            m.page_size = ps
            for k, v in dict(doc.get("symbols", {})).items():
                m.symbols[_name(k)] = _u64(int(v, 16) if isinstance(v, str) else int(v), k)
            for src, dst in ((doc.get("offsets", {}), m.offsets), (doc.get("sizes", {}), m.sizes)):
                for k, v in dict(src).items():
                    n = int(v)
                    if not 0 <= n < 1 << 20:
                        raise ManifestError(f"{k} = {n} is not a plausible offset or size")
                    dst[_name(k)] = n
        except (TypeError, ValueError) as e:
            if isinstance(e, ManifestError):
                raise
            raise ManifestError(f"malformed manifest: {e}") from None
        m.errors = [str(e)[:200] for e in list(doc.get("errors", []))[:64]]
        return m

    def off(self, type_: str, member: str) -> int:
        """Offset of ``member`` in ``type_``; KeyError names what is missing."""
        key = f"{type_}.{member}"
        if key not in self.offsets:
            raise KeyError(f"manifest has no offset for {key}")
        return self.offsets[key]


def _name(k: object) -> str:
    s = str(k)
    if not _NAME_RE.match(s):
        raise ManifestError(f"bad name {s[:80]!r} in manifest")
    return s


def _u64(v: int, what: str) -> int:
    if not 0 <= v < 1 << 64:
        raise ManifestError(f"{what}: {v} is not a 64-bit address")
    return v


def mdb_script(offsets: tuple[tuple[str, str], ...] = WANTED_OFFSETS, sizes: tuple[str, ...] = WANTED_SIZES) -> str:
    """Shell script run in the guest as root; its output is what :func:`parse_mdb_output` reads."""
    lines = [f"echo '{_HEADER}'", "echo '== uname'", "uname -a", "echo '== pagesize'", "pagesize"]
    for t, mbr in offsets:
        lines += [f"echo '== offsetof {t} {mbr}'", f"echo '::offsetof {t} {mbr}' | mdb -k 2>&1"]
    for t in sizes:
        lines += [f"echo '== sizeof {t}'", f"echo '::sizeof {t}' | mdb -k 2>&1"]
    lines.append("echo '== end'")
    return "\n".join(lines) + "\n"


def parse_mdb_output(text: str) -> Manifest:
    """Parse the output of :func:`mdb_script` (recorded text; bounded; mdb's refusals kept as errors)."""
    if len(text) > MAX_MDB_OUTPUT:
        raise ManifestError(f"mdb output of {len(text)} characters exceeds {MAX_MDB_OUTPUT}")
    lines = text.replace("\r", "").split("\n")
    if not lines or lines[0].strip() != _HEADER:
        raise ManifestError(f"mdb output does not start with {_HEADER!r}")
    if "== end" not in (ln.strip() for ln in lines):
        raise ManifestError("mdb output is cut short (no '== end' line)")
    m = Manifest()
    section: list[str] = []
    body: list[str] = []

    def finish() -> None:
        if not section:
            return
        what, content = section[0], [b for b in body if b.strip()]
        if what == "uname":
            m.release = (content[0].strip() if content else "")[:256]
        elif what == "pagesize":
            try:
                ps = int(content[0].strip())
            except (IndexError, ValueError):
                m.errors.append("pagesize: no number")
                return
            if ps not in (4096, 8192):
                raise ManifestError(f"pagesize {ps} is not 4096 or 8192")
            m.page_size = ps
        elif what.startswith("offsetof "):
            _, t_m = what.split(" ", 1)
            type_, _, member = t_m.rpartition(" ")
            hit = next((x for x in (_OFFSETOF.match(c.strip()) for c in content) if x), None)
            if hit is None or hit.group(1) != type_ or hit.group(2) != member:
                m.errors.append(f"offsetof {type_} {member}: {(content[0].strip() if content else 'no output')[:200]}")
                return
            m.offsets[f"{_name(type_)}.{_name(member)}"] = _bounded(int(hit.group(3), 0), what)
        elif what.startswith("sizeof "):
            type_ = what.split(" ", 1)[1]
            hit = next((x for x in (_SIZEOF.match(c.strip()) for c in content) if x), None)
            if hit is None or hit.group(1) != type_:
                m.errors.append(f"sizeof {type_}: {(content[0].strip() if content else 'no output')[:200]}")
                return
            m.sizes[_name(type_)] = _bounded(int(hit.group(2), 0), what)

    for ln in lines[1:]:
        s = ln.strip()
        if s.startswith("== "):
            finish()
            section[:] = [s[3:].strip()]
            body.clear()
            if s == "== end":
                break
        else:
            body.append(ln)
    return m


def _bounded(n: int, what: str) -> int:
    if not 0 <= n < 1 << 20:
        raise ManifestError(f"{what}: {n} is not a plausible offset or size")
    return n


def ksyms_symbols(elf: bytes, wanted: tuple[str, ...] | None = WANTED_SYMBOLS) -> dict[str, int]:
    """Symbol name -> value from a ksyms(4D) ELF image (ELF64 little-endian; SYMTAB + its STRTAB).

    ``wanted=None`` returns every named symbol (bounded by :data:`MAX_SYMBOLS`).
    The first definition of a name wins (ksyms lists locals first).
    """
    if len(elf) > MAX_KSYMS:
        raise ManifestError(f"ksyms image of {len(elf)} bytes exceeds {MAX_KSYMS}")
    if elf[:4] != b"\x7fELF" or len(elf) < 64:
        raise ManifestError("ksyms: not an ELF image")
    if elf[4] != 2 or elf[5] != 1:
        raise ManifestError(f"ksyms: ELF class {elf[4]} / data {elf[5]} (want ELF64 little-endian)")
    (e_shoff,) = struct.unpack_from("<Q", elf, 0x28)
    e_shentsize, e_shnum = struct.unpack_from("<HH", elf, 0x3A)
    if e_shentsize < 64 or e_shnum > 4096 or e_shoff + e_shnum * e_shentsize > len(elf):
        raise ManifestError("ksyms: section headers out of the image")
    sections = []
    for i in range(e_shnum):
        o = e_shoff + i * e_shentsize
        _nm, sh_type, _fl, _addr, sh_offset, sh_size, sh_link, _info, _al, sh_entsize = struct.unpack_from(
            "<IIQQQQIIQQ", elf, o
        )
        sections.append((sh_type, sh_offset, sh_size, sh_link, sh_entsize))
    want = None if wanted is None else set(wanted)
    out: dict[str, int] = {}
    for sh_type, off, size, link, entsize in sections:
        if sh_type != 2:  # SHT_SYMTAB
            continue
        if entsize != 24 or off + size > len(elf) or link >= len(sections):
            raise ManifestError("ksyms: symbol table out of the image")
        s_type, s_off, s_size, _, _ = sections[link]
        if s_type != 3 or s_off + s_size > len(elf):  # SHT_STRTAB
            raise ManifestError("ksyms: string table out of the image")
        strtab = elf[s_off : s_off + s_size]
        for j in range(size // 24):
            st_name, _info, _other, _shndx, st_value, _size = struct.unpack_from("<IBBHQQ", elf, off + j * 24)
            if st_name == 0 or st_name >= len(strtab):
                continue
            end = strtab.find(b"\0", st_name)
            name = strtab[st_name : end if end >= 0 else len(strtab)].decode("ascii", "replace")
            if (want is None or name in want) and name not in out:
                out[name] = st_value
                if len(out) >= MAX_SYMBOLS:
                    raise ManifestError(f"ksyms: more than {MAX_SYMBOLS} symbols")
    return out


def manifest_note(m: Manifest) -> Note:
    """The ELF note the snapshot carries (see the module docstring)."""
    return Note(PROGDUMP_NOTE_NAME, NT_PROGDUMP_ILLUMOS_MANIFEST, json.dumps(m.to_json(), sort_keys=True).encode())


def manifest_from_snapshot(snapshot: Snapshot) -> Manifest | None:
    """The manifest note of ``snapshot``, or None when it has none. ManifestError when it is malformed."""
    note = snapshot.find_note(PROGDUMP_NOTE_NAME, NT_PROGDUMP_ILLUMOS_MANIFEST)
    if note is None:
        return None
    if len(note.desc) > MAX_MANIFEST_JSON:
        raise ManifestError(f"manifest note of {len(note.desc)} bytes exceeds {MAX_MANIFEST_JSON}")
    try:
        doc = json.loads(note.desc.rstrip(b"\0").decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ManifestError(f"manifest note is not JSON: {e}") from None
    return Manifest.from_json(doc)
