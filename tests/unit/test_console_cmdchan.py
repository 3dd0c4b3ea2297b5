"""The command channel's line protocol, over a real socketpair (no guest: the
guest side is played by this test, which says so)."""

from __future__ import annotations

import asyncio
import base64
import socket

import pytest

from harness.qemu.cmdchan import MAX_CMD_LINE, CommandChannel


async def _pair() -> tuple[CommandChannel, asyncio.StreamReader, asyncio.StreamWriter]:
    a, b = socket.socketpair()
    r1, w1 = await asyncio.open_connection(sock=a, limit=MAX_CMD_LINE)
    r2, w2 = await asyncio.open_connection(sock=b)
    ch = CommandChannel(r1, w1)
    ch.start()
    return ch, r2, w2


def test_round_trip_and_hello() -> None:
    async def main() -> None:
        ch, gr, gw = await _pair()
        gw.write(b"PDHELLO 00112233aabbccdd\n")
        assert await ch.wait_hello(2) == "00112233aabbccdd"
        task = asyncio.create_task(ch.run("echo hi", 2))
        line = await gr.readline()
        tag, cid, b64 = line.split()
        assert tag == b"PDCMD" and base64.b64decode(b64) == b"echo hi"
        gw.write(b"junk line\nPDRES 999 0 \n")  # ignored: garbage, unknown id
        gw.write(b"PDRES %s 3 %s\n" % (cid, base64.b64encode(b"out\n")))
        res = await task
        assert res.status == 3 and res.output == b"out\n"
        assert ch.dropped_lines == 2
        await ch.close()
        gw.close()

    asyncio.run(main())


def test_bad_base64_fails_the_command() -> None:
    async def main() -> None:
        ch, gr, gw = await _pair()
        task = asyncio.create_task(ch.run("true", 2))
        cid = (await gr.readline()).split()[1]
        gw.write(
            b"PDRES %s 0 A\n" % cid
        )  # the base64 alphabet, but not base64 (\"####\" was dropped: a timeout passed for it)
        with pytest.raises(ValueError, match="bad base64"):
            await task
        await ch.close()
        gw.close()

    asyncio.run(main())


def test_oversized_line_dropped_then_channel_still_works() -> None:
    async def main() -> None:
        ch, gr, gw = await _pair()
        task = asyncio.create_task(ch.run("true", 5))
        cid = (await gr.readline()).split()[1]
        gw.write(b"PDRES 1 0 " + b"A" * (MAX_CMD_LINE + 10) + b"\n")
        gw.write(b"PDRES %s 0 %s\n" % (cid, base64.b64encode(b"ok")))
        res = await task
        assert res.output == b"ok"
        assert ch.dropped_lines >= 1
        await ch.close()
        gw.close()

    asyncio.run(main())


def test_reset_fails_pending_and_rearms_hello() -> None:
    async def main() -> None:
        ch, gr, gw = await _pair()
        gw.write(b"PDHELLO aa\n")
        assert await ch.wait_hello(2) == "aa"
        task = asyncio.create_task(ch.run("sleep 100", 5))
        await gr.readline()
        ch.expect_restart()
        with pytest.raises(ConnectionResetError):
            await task
        with pytest.raises(asyncio.TimeoutError):
            await ch.wait_hello(0.1)
        gw.write(b"PDHELLO bb\n")
        assert await ch.wait_hello(2) == "bb"
        await ch.close()
        gw.close()

    asyncio.run(main())


def test_script_size_bounded() -> None:
    async def main() -> None:
        ch, gr, gw = await _pair()
        with pytest.raises(ValueError):
            await ch.run("x" * 300_000, 1)
        await ch.close()
        gw.close()

    asyncio.run(main())
