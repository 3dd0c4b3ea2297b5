"""The illumos panic report, from a console log or a syslog excerpt.

The approach follows syzkaller's ``pkg/report`` (find the crash header, then
read the report that follows it with per-OS line formats), written for the
lines illumos prints (``usr/src/uts/common/os/panic.c``, ``dumpsubr.c``,
``i86pc/os/trap.c``)::

    panic[cpu0]/thread=fffffe09186d6be0: BAD TRAP: type=e (#pf Page fault) rp=... addr=0 ...
    fffffe000c416a80 unix:die+c6 ()             <- traceregs(): "%p %s:%s+%lx (" or "%p %p ("
    dumping to /dev/zvol/dsk/rpool/dump, offset 65536, content: kernel
    dumping:  0:03 100% done
    100% done: 47931 pages dumped, dump succeeded
    skipping system dump - no dump device configured

What real logs do to these lines, and what this module undoes:

* syslog prefixes (``Dec 25 10:07:04 host unix: [ID 836849 kern.notice] ``
  and the RFC 3339 form rsyslog writes) are stripped;
* rsyslog's control-character escapes (``#012`` newline, ``#015`` CR) and a
  literal ``^M`` become the characters they stand for; a CR splits a line
  (``panic.c`` prints ``"\\n\\rpanic[cpu%d]..."``, progress is redrawn with CR);
* the message may sit on the lines after the panic line (syslog logs it as
  a separate record; narrow consoles wrap it): it runs to the first blank
  or structural line, at most :data:`MAX_MESSAGE_LINES` lines;
* frame arguments wrapped onto following lines, frames without a symbol
  (the bare return address), a frame cut off at the end of the log;
* a log with no panic line at all: the report says so with nulls.

Input is untrusted: at most :data:`MAX_INPUT` bytes are read (the tail, where
a panic is), lines are cut at :data:`MAX_LINE` characters, frames and
message are bounded.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "IllumosReport",
    "Trap",
    "parse_illumos",
    "normalize_lines",
    "PANIC_RE",
    "LOGIN_RE",
    "MAX_INPUT",
    "MAX_LINE",
    "MAX_FRAMES",
    "MAX_MESSAGE_LINES",
    "CONTRACT_KEYS",
]

MAX_INPUT = 8 << 20  # bytes of log read (the tail)
MAX_LINE = 4096  # characters per line after normalisation
MAX_FRAMES = 256
MAX_MESSAGE_LINES = 4
MAX_MESSAGE = 1024
CONTRACT_KEYS = ("panic_cpu", "thread", "message", "frames", "dump_started", "dump_succeeded")

# panic.c: "\n\rpanic[cpu%d]/thread=%p: " then the formatted message.
PANIC_RE = re.compile(r"panic\[cpu(\d{1,5})\]/thread=([0-9a-fA-F]{1,16}):[ \t]?(.*)$")
# trap.c die(): "BAD TRAP: type=%x (#%s %s) rp=%p addr=%lx" (SPARC: no parenthesis).
TRAP_RE = re.compile(r"BAD TRAP: type=([0-9a-fA-F]+)(?: \(([^)]*)\))? rp=([0-9a-fA-F]+) addr=([0-9a-fA-F]+)")
# traceregs(): "%016lx %s:%s+%lx (" with a symbol, "%016lx %016lx (" without one.
FRAME_RE = re.compile(r"^([0-9a-fA-F]{8,16})\s+((?:[\w.$-]+:[\w.$-]+(?:\+[0-9a-fA-F]+)?)|[0-9a-fA-F]{8,16})\s*\(")
DUMP_TO_RE = re.compile(r"dumping to (\S+), offset (\d+), content: (.+?)\s*$")
PROGRESS_RE = re.compile(r"(\d{1,3})% done")
DUMP_END_RE = re.compile(r"dump\s+(succeeded|failed(?::\s*error\s*\d+)?)")
NODUMP_RE = re.compile(r"skipping system dump")
LOGIN_RE = re.compile(r"(\S+) console login:")
# Structural lines end a message that continues on following lines.
_STRUCTURAL = re.compile(
    r"^(?:BAD TRAP:|panic\[cpu|syncing file systems|dumping|skipping system dump|rebooting|"
    r"\d{1,3}% done|%[lio]\d|[a-z0-9]{2,6}:\s+[0-9a-f]+\s|cr[0-48]:|pid=\d|Bad kernel fault|#\w\w )"
)

_SYSLOG_BSD = re.compile(r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \S+ ")
_SYSLOG_ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)? \S+ ")
_SYSLOG_TAG = re.compile(r"^[A-Za-z0-9_.-]{1,64}(?:\[\d{1,10}\])?: ")
_SYSLOG_ID = re.compile(r"^\[ID \d+ [\w.]+\] ?")
_SYSLOG_ID_CUT = re.compile(r"^\[ID\b[^\]]*$")
_ESCAPE = re.compile(r"#(0[0-3][0-7]|177)")


@dataclass(frozen=True)
class Trap:
    """One ``BAD TRAP`` line: trap type (hex as printed), its name, trap frame address, fault address."""

    type: str
    name: str | None
    rp: str
    addr: str


@dataclass
class IllumosReport:
    """What the log says; ``None`` where it does not say. ``frames`` as printed, in order."""

    panic_cpu: int | None = None
    thread: str | None = None
    message: str | None = None
    frames: list[str] = field(default_factory=list)
    dump_started: bool | None = None
    dump_succeeded: bool | None = None
    # beyond the CLI contract
    trap: Trap | None = None
    dump_device: str | None = None
    dump_content: str | None = None
    dump_percent: int | None = None
    login_seen: bool = False
    panic_line: int | None = None  # index in the normalised lines
    notes: list[str] = field(default_factory=list)

    def contract(self) -> dict[str, Any]:
        """The six keys ``python3 -m harness report`` prints."""
        d = asdict(self)
        return {k: d[k] for k in CONTRACT_KEYS}

    def full(self) -> dict[str, Any]:
        return asdict(self)


def _unescape(s: str) -> str:
    s = s.replace("^M", "\r")
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), s)


def _strip_syslog(line: str) -> str:
    m = _SYSLOG_ISO.match(line) or _SYSLOG_BSD.match(line)
    if not m:
        return line
    rest = line[m.end() :]
    t = _SYSLOG_TAG.match(rest)
    if t:
        rest = rest[t.end() :]
    i = _SYSLOG_ID.match(rest)
    if i:
        rest = rest[i.end() :]
    elif _SYSLOG_ID_CUT.match(rest):
        return ""  # the record was cut inside its [ID ...] tag: nothing of the message survived
    return rest


def normalize_lines(text: str) -> Iterator[str]:
    """Console/syslog text -> logical lines: prefixes stripped, escapes undone, CR splits, bounded."""
    for raw in text.split("\n"):
        body = _unescape(_strip_syslog(raw.rstrip("\r")))
        for piece in re.split(r"[\r\n]", body):
            yield piece[:MAX_LINE].strip()


def _message(lines: list[str], start: int, first: str) -> str | None:
    """The panic message: ``first`` (rest of the panic line) plus continuation lines."""
    parts = [first] if first else []
    i = start
    if not parts:  # message on the following line(s), after at most one blank line
        while i < len(lines) and i < start + 2 and not lines[i]:
            i += 1
    while i < len(lines) and len(parts) < MAX_MESSAGE_LINES:
        ln = lines[i]
        if not ln or FRAME_RE.match(ln) or PANIC_RE.search(ln):
            break
        if parts and _STRUCTURAL.match(ln):
            break
        parts.append(ln)
        i += 1
    msg = " ".join(parts).strip()
    return msg[:MAX_MESSAGE] if msg else None


def parse_illumos(data: bytes | str) -> IllumosReport:
    """Parse a console log (bytes or text). Never raises on content; bounded."""
    if isinstance(data, bytes):
        if len(data) > MAX_INPUT:
            data = data[-MAX_INPUT:]
        text = data.decode("utf-8", "replace")
    else:
        text = data[-MAX_INPUT:]
    rep = IllumosReport()
    lines = list(normalize_lines(text))
    panic_at: int | None = None
    for i, ln in enumerate(lines):
        if LOGIN_RE.search(ln):
            rep.login_seen = True
        m = PANIC_RE.search(ln)
        if m:
            if panic_at is None:
                panic_at = i
                rep.panic_cpu = int(m.group(1))
                rep.thread = m.group(2).lower()
                rep.message = _message(lines, i + 1, m.group(3).strip())
            else:
                rep.notes.append(f"another panic line after the first (line {i}): {ln[:200]}")
    rep.panic_line = panic_at
    if panic_at is None:
        rep.notes.append("no panic line")
    # Trap, frames and dump progress: after the panic line, or over the whole log without one.
    # A BAD TRAP printed just before the panic line (syslog reorders) counts too.
    begin = 0 if panic_at is None else max(0, panic_at - 16)
    frames_from = 0 if panic_at is None else panic_at
    # the trap nearest after the panic line wins over one printed before it
    order = list(range(frames_from, min(len(lines), frames_from + 64))) + list(range(begin, frames_from))
    for i in order:
        t = TRAP_RE.search(lines[i])
        if t:
            rep.trap = Trap(t.group(1).lower(), t.group(2), t.group(3).lower(), t.group(4).lower())
            break
    for i in range(frames_from, len(lines)):
        ln = lines[i]
        if i > frames_from and panic_at is not None and PANIC_RE.search(ln):
            break  # a second panic (e.g. during the dump): its frames are not this panic's
        f = FRAME_RE.match(ln)
        if f and rep.dump_started is None:
            if len(rep.frames) < MAX_FRAMES:
                rep.frames.append(f.group(2))
            continue
        d = DUMP_TO_RE.search(ln)
        if d:
            rep.dump_started = True
            rep.dump_device, rep.dump_content = d.group(1), d.group(3)
            continue
        if NODUMP_RE.search(ln):
            rep.dump_started = False
            continue
        p = PROGRESS_RE.search(ln)
        if p and rep.dump_started:
            rep.dump_percent = min(100, int(p.group(1)))
        # "dump succeeded" may be wrapped onto the next line: look at this line and the next together
        if rep.dump_started and ("dump" in ln or "% done" in ln):
            window = ln + " " + (lines[i + 1] if i + 1 < len(lines) else "")
            e = DUMP_END_RE.search(window)
            if e and rep.dump_succeeded is None:
                rep.dump_succeeded = e.group(1) == "succeeded"
    if len(rep.frames) >= MAX_FRAMES:
        rep.notes.append(f"frames cut at {MAX_FRAMES}")
    return rep
