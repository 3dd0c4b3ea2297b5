"""The illumos console report against real transcripts from public bug reports.

Each ``tests/testdata/console/illumos/NAME.txt`` is an excerpt of a public
report; ``NAME.expected.json`` names its source and holds the expected
report, written by hand from reading the transcript (not produced by the
parser). Plus edge cases on small inline text.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from progdump.layers.illumos.console import CONTRACT_KEYS, MAX_FRAMES, normalize_lines, parse_illumos

DATA = Path(__file__).resolve().parent.parent / "testdata" / "console" / "illumos"
CASES = sorted(p.name[: -len(".txt")] for p in DATA.glob("*.txt"))
REPO = Path(__file__).resolve().parent.parent.parent


def test_corpus_is_big_enough_and_sourced():
    assert len(CASES) >= 8
    for name in CASES:
        doc = json.loads((DATA / f"{name}.expected.json").read_text())
        assert doc["source"].startswith("https://"), name
        assert set(doc["expected"]) == set(CONTRACT_KEYS), name


@pytest.mark.parametrize("name", CASES)
def test_golden(name: str):
    doc = json.loads((DATA / f"{name}.expected.json").read_text())
    got = parse_illumos((DATA / f"{name}.txt").read_bytes()).contract()
    assert got == doc["expected"]


@pytest.mark.parametrize("name", CASES)
def test_cli_prints_one_json_object(name: str):
    doc = json.loads((DATA / f"{name}.expected.json").read_text())
    r = subprocess.run(
        [sys.executable, "-m", "harness", "report", "--guest", "omnios", str(DATA / f"{name}.txt")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1
    assert json.loads(r.stdout) == doc["expected"]


def test_cli_unreadable_file(tmp_path: Path):
    for target in (tmp_path / "missing.log", tmp_path):  # absent; a directory
        r = subprocess.run(
            [sys.executable, "-m", "harness", "report", "--guest", "omnios", str(target)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 1
        assert r.stdout == ""
        assert "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and str(target) in r.stderr


def test_trap_prefers_the_one_after_the_panic_line():
    rep = parse_illumos((DATA / "illumos-joyent-164-trap-before-panic.txt").read_bytes())
    assert rep.trap is not None and (rep.trap.type, rep.trap.rp) == ("e", "ffffff003dd38830")
    assert rep.trap.name == "#pf Page fault" and rep.trap.addr == "ffffff049f4c6000"


def test_dump_progress_modern_form():
    text = (
        "panic[cpu1]/thread=fffffe0003c8bc20: forced crash dump initiated at user request\n\n"
        "fffffe0003c8bd60 genunix:kadmin+5f6 ()\n"
        "dumping to /dev/dsk/c2t0d0p0, offset 65536, content: kernel\n"
        "dumping:  0:01 30% done\rdumping:  0:02 100% done\n"
        "100% done: 47931 pages dumped, dump succeeded\nrebooting...\n"
    )
    rep = parse_illumos(text)
    assert (rep.dump_started, rep.dump_succeeded, rep.dump_percent) == (True, True, 100)
    assert rep.dump_device == "/dev/dsk/c2t0d0p0" and rep.frames == ["genunix:kadmin+5f6"]
    failed = parse_illumos(text.replace("dump succeeded", "dump failed: error 5"))
    assert failed.dump_succeeded is False
    cut = parse_illumos(text.split("dumping:")[0])
    assert (cut.dump_started, cut.dump_succeeded) == (True, None)
    nodump = parse_illumos(
        text.split("dumping to")[0] + "skipping system dump - no dump device configured\nrebooting...\n"
    )
    assert (nodump.dump_started, nodump.dump_succeeded) == (False, None)


def test_second_panic_does_not_lend_its_frames():
    text = (
        "panic[cpu0]/thread=ff00: first\n\nff00000000000010 unix:a+1 ()\n"
        "panic[cpu1]/thread=ff01: second\n\nff00000000000020 unix:b+2 ()\n"
    )
    rep = parse_illumos(text)
    assert (rep.panic_cpu, rep.message, rep.frames) == (0, "first", ["unix:a+1"])
    assert any("another panic" in n for n in rep.notes)


def test_no_panic_line_at_all():
    rep = parse_illumos(b"OmniOS r151054 Version omnios-r151054 64-bit\nomnios console login: \n")
    assert rep.contract() == dict(
        panic_cpu=None, thread=None, message=None, frames=[], dump_started=None, dump_succeeded=None
    )
    assert rep.login_seen


def test_hostile_input_is_bounded():
    junk = b"\xff\xfe" * 10 + b"A" * 100_000 + b"\n" + b"ffffffff00000000 unix:x+1 ()\n" * (MAX_FRAMES + 50)
    rep = parse_illumos(junk)
    assert len(rep.frames) == MAX_FRAMES
    assert all(len(line) <= 4096 for line in normalize_lines("x" * 100_000))
    parse_illumos(b"\x00" * 1000 + b"panic[cpu99999999]/thread=zz: x")  # no match, no exception


def test_escapes_and_cr():
    assert list(normalize_lines("a#012b#015c^Md")) == ["a", "b", "c", "d"]
