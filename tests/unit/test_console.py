"""Console buffer and matcher against recorded console text (tests/testdata/console)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from harness.guests.base import parse_marker_json
from harness.guests.linux import LinuxGuest
from harness.qemu.console import MAX_LINE, ConsoleBuffer, Pattern, first_match

DATA = Path(__file__).resolve().parent.parent / "testdata" / "console"
LINUX = LinuxGuest(image_dir=Path("/nonexistent"))  # patterns only; no image needed


def load(name: str) -> bytes:
    return (DATA / name).read_bytes()


def feed_chunked(data: bytes, seed: int) -> ConsoleBuffer:
    rng = random.Random(seed)
    buf = ConsoleBuffer()
    i = 0
    while i < len(data):
        n = rng.choice([1, 2, 7, 100, 4096])
        buf.feed(data[i : i + n])
        i += n
    return buf


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunking_does_not_change_lines(seed: int) -> None:
    data = load("linux-boot-sysrq-panic.txt")
    whole = ConsoleBuffer()
    whole.feed(data)
    pieces = feed_chunked(data, seed)
    assert whole.lines_since(0) == pieces.lines_since(0)
    assert whole.tail(5000) == pieces.tail(5000) == data[-5000:]
    expected = data.replace(b"\r", b"").split(b"\n")[:-1]
    assert [ln for _, ln in whole.lines_since(0)] == expected


def test_ready_and_markers_found() -> None:
    buf = ConsoleBuffer()
    buf.feed(load("linux-boot-sysrq-panic.txt"))
    hit = first_match(buf.lines_since(0), LINUX.ready_patterns())
    assert hit is not None and not hit.failure and hit.pattern.name == "ready"
    boot_id = hit.group(1)
    assert re.fullmatch(r"[0-9a-f]{16}", boot_id)
    mk = first_match(buf.lines_since(0), [LINUX.marker_pattern()])
    assert mk is not None and mk.lineno < hit.lineno
    markers = parse_marker_json(mk.group(1))
    assert markers["nonce"] == boot_id
    assert markers["comm"] == "pdmarker"
    assert len(markers["anon_unit"]) == 32 and markers["anon_unit"].endswith("\n")
    assert markers["kmsg"].startswith("PD-KMSG-" + boot_id)


@pytest.mark.parametrize(
    "name, panic_string",
    [
        ("linux-boot-sysrq-panic.txt", "sysrq triggered crash"),
        ("linux-boot-nmi-panic.txt", "NMI: Not continuing"),
    ],
)
def test_panic_start_and_end(name: str, panic_string: str) -> None:
    buf = ConsoleBuffer()
    buf.feed(load(name))
    ready = first_match(buf.lines_since(0), LINUX.ready_patterns())
    assert ready is not None
    start, end = LINUX.panic_patterns()
    s = first_match(buf.lines_since(ready.lineno + 1), [start])
    e = first_match(buf.lines_since(ready.lineno + 1), [end])
    assert s is not None and e is not None
    assert s.group(1) == panic_string
    assert e.group(1) == panic_string
    assert s.lineno < e.lineno
    # the end line is the last complete line: the console tail ends with it
    assert buf.lines_since(0)[-1][0] == e.lineno


def test_failed_boot_is_a_failure_match() -> None:
    buf = ConsoleBuffer()
    buf.feed(load("linux-boot-no-root.txt"))
    hit = first_match(buf.lines_since(0), LINUX.ready_patterns())
    assert hit is not None and hit.failure
    assert "Unable to mount root fs" in hit.group(1)


def test_failure_wins_over_success_on_the_same_line() -> None:
    pats = [Pattern.of("ok", rb"READY"), Pattern.of("bad", rb"panic", failure=True)]
    hit = first_match([(0, b"READY panic")], pats)
    assert hit is not None and hit.pattern.name == "bad"


def test_no_match_in_sysrq_log_for_a_boot_failure_before_ready() -> None:
    buf = ConsoleBuffer()
    buf.feed(load("linux-boot-sysrq-panic.txt"))
    lines = buf.lines_since(0)
    ready = first_match(lines, LINUX.ready_patterns())
    assert ready is not None
    before = [ln for ln in lines if ln[0] <= ready.lineno]
    hit = first_match(before, LINUX.ready_patterns())
    assert hit is not None and hit.pattern.name == "ready"


def test_long_lines_are_cut_and_bounded() -> None:
    buf = ConsoleBuffer(max_bytes=4 * MAX_LINE)
    buf.feed(b"x" * (MAX_LINE * 10 + 5) + b"\nend\n")
    lines = buf.lines_since(0)
    assert all(len(ln) <= MAX_LINE for _, ln in lines)
    assert lines[-1][1] == b"end"
    assert sum(len(ln) for _, ln in lines) <= 4 * MAX_LINE + 3
    assert len(buf.tail(10**9)) <= 4 * MAX_LINE


def test_carriage_returns_dropped_and_partial_kept() -> None:
    buf = ConsoleBuffer()
    new = buf.feed(b"one\r\ntw")
    assert new == [(0, b"one")]
    assert buf.partial == b"tw"
    assert buf.feed(b"o\r\n") == [(1, b"two")]
    assert buf.tail() == b"one\r\ntwo\r\n"


def test_lines_since_after_eviction() -> None:
    buf = ConsoleBuffer(max_lines=10)
    for i in range(25):
        buf.feed(b"line %d\n" % i)
    got = buf.lines_since(0)
    assert [n for n, _ in got] == list(range(15, 25))
    assert buf.lines_since(20)[0] == (20, b"line 20")
    assert buf.lines_since(25) == []


def test_marker_json_is_bounded_and_flat() -> None:
    with pytest.raises(ValueError):
        parse_marker_json("[1, 2]")
    with pytest.raises(ValueError):
        parse_marker_json(json.dumps({"a": {"nested": 1}}))
    with pytest.raises(ValueError):
        parse_marker_json(json.dumps({"a": "x" * 10000}))
    with pytest.raises(ValueError):
        parse_marker_json("{not json")


def test_ready_and_markers_survive_a_kernel_message_on_the_same_line() -> None:
    # seen in CI: a kernel message printed before init's newline reached the console
    buf = ConsoleBuffer()
    buf.feed(load("linux-boot-interleaved-ready.txt"))
    hit = first_match(buf.lines_since(0), LINUX.ready_patterns())
    assert hit is not None and hit.pattern.name == "ready" and b"IPv6" in hit.line
    mk = first_match(buf.lines_since(0), [LINUX.marker_pattern()])
    assert mk is not None
    assert parse_marker_json(mk.group(1))["nonce"] == hit.group(1)
