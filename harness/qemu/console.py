"""The guest's serial console: a bounded line buffer, pattern matching, a reader.

Why line based: every signal the harness takes from a console (ready lines,
marker reports, ``Kernel panic - not syncing``, illumos ``panic[cpu0]``) is
one line. Console text is untrusted: lines are cut at ``MAX_LINE`` bytes, the
buffer keeps at most ``max_bytes`` and patterns only ever see bounded lines.

:class:`ConsoleBuffer` and :func:`first_match` are pure (unit-tested against
recorded console text in ``tests/testdata/console``); :class:`ConsoleReader`
is the asyncio task that feeds a buffer from QEMU's console socket and tees
the raw bytes to a log file.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

__all__ = [
    "MAX_LINE",
    "Pattern",
    "PatternMatch",
    "ConsoleBuffer",
    "first_match",
    "ConsoleReader",
]

MAX_LINE = 16 * 1024  # longer lines are cut into pieces of this size


@dataclass(frozen=True)
class Pattern:
    """A named regular expression over one console line (bytes, no newline).

    ``failure`` patterns end a wait with an error (e.g. a panic while
    booting); success patterns end it normally.
    """

    name: str
    regex: re.Pattern[bytes]
    failure: bool = False

    @classmethod
    def of(cls, name: str, regex: str | bytes, failure: bool = False) -> Pattern:
        rx = regex.encode() if isinstance(regex, str) else regex
        return cls(name, re.compile(rx), failure)


@dataclass(frozen=True)
class PatternMatch:
    pattern: Pattern
    lineno: int
    line: bytes
    match: re.Match[bytes]

    @property
    def failure(self) -> bool:
        return self.pattern.failure

    def group(self, i: int | str = 1) -> str:
        g = self.match.group(i)
        return g.decode("utf-8", "replace") if g is not None else ""


def first_match(lines: Iterable[tuple[int, bytes]], patterns: Iterable[Pattern]) -> PatternMatch | None:
    """The first line (in order) any pattern matches; failure patterns win ties."""
    pats = sorted(patterns, key=lambda p: not p.failure)
    for lineno, line in lines:
        for p in pats:
            m = p.regex.search(line)
            if m:
                return PatternMatch(p, lineno, line, m)
    return None


class ConsoleBuffer:
    """Bounded console history: complete lines (numbered) and a raw byte tail.

    ``feed`` accepts arbitrary chunks; ``\\r`` is dropped, lines end at
    ``\\n`` or at ``MAX_LINE`` bytes. Line numbers start at 0 and never reuse.
    """

    def __init__(self, max_bytes: int = 1 << 20, max_lines: int = 50_000) -> None:
        self.max_bytes = max_bytes
        self._lines: deque[tuple[int, bytes]] = deque(maxlen=max_lines)
        self._line_bytes = 0
        self._partial = bytearray()
        self._tail = bytearray()
        self.next_lineno = 0
        self.total_bytes = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add raw bytes; return the lines they completed."""
        self.total_bytes += len(data)
        self._tail += data
        if len(self._tail) > self.max_bytes:
            del self._tail[: len(self._tail) - self.max_bytes]
        return self._split(data)

    def _split(self, data: bytes) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        parts = data.replace(b"\r", b"").split(b"\n")
        for i, part in enumerate(parts):
            self._partial += part
            while len(self._partial) > MAX_LINE:
                out.append(self._push(bytes(self._partial[:MAX_LINE])))
                del self._partial[:MAX_LINE]
            if i < len(parts) - 1:
                out.append(self._push(bytes(self._partial)))
                self._partial.clear()
        return out

    def _push(self, line: bytes) -> tuple[int, bytes]:
        item = (self.next_lineno, line)
        self.next_lineno += 1
        if len(self._lines) == self._lines.maxlen:
            self._line_bytes -= len(self._lines[0][1])
        self._lines.append(item)
        self._line_bytes += len(line)
        while self._line_bytes > self.max_bytes and len(self._lines) > 1:
            self._line_bytes -= len(self._lines.popleft()[1])
        return item

    def lines_since(self, lineno: int) -> list[tuple[int, bytes]]:
        """Retained complete lines numbered ``>= lineno``."""
        if not self._lines or lineno >= self.next_lineno:
            return []
        first = self._lines[0][0]
        start = max(0, lineno - first)
        return [self._lines[i] for i in range(start, len(self._lines))]

    @property
    def partial(self) -> bytes:
        """The current unterminated line."""
        return bytes(self._partial)

    def tail(self, nbytes: int = 64 * 1024) -> bytes:
        """The last ``nbytes`` raw bytes received (including an unfinished line)."""
        return bytes(self._tail[-nbytes:]) if nbytes > 0 else b""

    def text(self) -> str:
        return self.tail(self.max_bytes).decode("utf-8", "replace")


class ConsoleReader:
    """Reads a console stream into a :class:`ConsoleBuffer`, tees it to ``log``.

    ``wait_for`` returns the first match of any pattern on lines numbered
    ``>= since`` (lines already received count, so a waiter set up late never
    misses a line), raising :class:`TimeoutError` after ``timeout`` seconds
    and :class:`EOFError` if the stream ends first.
    """

    def __init__(
        self, reader: asyncio.StreamReader, log: BinaryIO | None = None, buffer: ConsoleBuffer | None = None
    ) -> None:
        self.reader = reader
        self.log = log
        self.buffer = buffer or ConsoleBuffer()
        self._cond = asyncio.Condition()
        self.eof = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="console-reader")

    async def _run(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                if self.log is not None:
                    self.log.write(data)
                    self.log.flush()
                async with self._cond:
                    self.buffer.feed(data)
                    self._cond.notify_all()
        except (ConnectionError, OSError):
            pass
        finally:
            self.eof = True
            async with self._cond:
                self._cond.notify_all()

    def cursor(self) -> int:
        """Line number the next complete line will get: pass as ``since``."""
        return self.buffer.next_lineno

    async def wait_for(self, patterns: Iterable[Pattern], since: int = 0, timeout: float | None = None) -> PatternMatch:
        pats = list(patterns)
        checked = since

        async def _wait() -> PatternMatch:
            nonlocal checked
            async with self._cond:
                while True:
                    m = first_match(self.buffer.lines_since(checked), pats)
                    if m is not None:
                        return m
                    checked = max(checked, self.buffer.next_lineno)
                    if self.eof:
                        raise EOFError("console closed")
                    await self._cond.wait()

        return await asyncio.wait_for(_wait(), timeout)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
