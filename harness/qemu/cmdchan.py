"""Host side of the guest command channel (virtio-serial port ``org.progdump.cmd``).

Why not the console: kernel messages interleave with anything on ttyS0; a
dedicated port carries only this protocol, one line per message::

    host  -> guest   PDCMD <id> <base64 of a sh script>
    guest -> host    PDHELLO <nonce>                     (the server started)
                     PDRES <id> <status> <base64 of output, at most 1 MiB>

Lines from the guest are untrusted: bounded length, strict fields, bounded
base64 decoding; anything else is counted and dropped.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import re
import time
from dataclasses import dataclass

__all__ = ["CommandResult", "CommandChannel", "MAX_CMD_LINE", "MAX_SCRIPT"]

MAX_CMD_LINE = 2 << 20  # base64 of 1 MiB output plus the header
MAX_SCRIPT = 256 * 1024
_RES_RE = re.compile(rb"^PDRES (\d{1,12}) (\d{1,3}) ([A-Za-z0-9+/=]*)$")
_HELLO_RE = re.compile(rb"^PDHELLO ([0-9a-f]{1,64})$")


@dataclass(frozen=True)
class CommandResult:
    status: int
    output: bytes
    seconds: float

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")


class CommandChannel:
    """Send shell scripts to the guest and collect their exit status and output."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self._hello: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.dropped_lines = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cmd-reader")

    def expect_restart(self) -> None:
        """Forget the current guest (before a reset): fail pending commands, await a new hello."""
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionResetError("guest reset while the command ran"))
        self._pending.clear()
        if self._hello.done():
            self._hello = asyncio.get_running_loop().create_future()

    async def wait_hello(self, timeout: float) -> str:
        """Nonce the guest's command server announced (it is ready for commands)."""
        return await asyncio.wait_for(asyncio.shield(self._hello), timeout)

    async def _run(self) -> None:
        try:
            while True:
                try:
                    line = await self.reader.readuntil(b"\n")
                except asyncio.LimitOverrunError as e:
                    # drop the oversized line
                    await self.reader.readexactly(e.consumed)
                    self.dropped_lines += 1
                    continue
                except asyncio.IncompleteReadError:
                    break
                self._handle(line.rstrip(b"\r\n"))
        except (ConnectionError, OSError):
            pass
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionResetError("command channel closed"))

    def _handle(self, line: bytes) -> None:
        m = _RES_RE.match(line)
        if m:
            fut = self._pending.pop(int(m.group(1)), None)
            if fut is None or fut.done():
                self.dropped_lines += 1
                return
            try:
                out = base64.b64decode(m.group(3), validate=True)
            except (binascii.Error, ValueError):
                fut.set_exception(ValueError("guest sent bad base64 output"))
                return
            fut.set_result((int(m.group(2)), out))
            return
        h = _HELLO_RE.match(line)
        if h:
            if not self._hello.done():
                self._hello.set_result(h.group(1).decode())
            return
        self.dropped_lines += 1

    def _send(self, script: str) -> tuple[int, asyncio.Future[tuple[int, bytes]]]:
        data = script.encode()
        if len(data) > MAX_SCRIPT:
            raise ValueError(f"script of {len(data)} bytes exceeds {MAX_SCRIPT}")
        cid = next(self._ids)
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[cid] = fut
        self.writer.write(b"PDCMD %d %s\n" % (cid, base64.b64encode(data)))
        return cid, fut

    async def run(self, script: str, timeout: float) -> CommandResult:
        """Run ``script`` with ``sh`` in the guest; its status and combined output."""
        t0 = time.monotonic()
        cid, fut = self._send(script)
        await self.writer.drain()
        try:
            status, out = await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(cid, None)
        return CommandResult(status, out, time.monotonic() - t0)

    async def fire(self, script: str) -> int:
        """Send ``script`` without waiting for it (it may never answer: a panic trigger)."""
        cid, fut = self._send(script)
        fut.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
        await self.writer.drain()
        return cid

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        try:
            self.writer.close()
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass
