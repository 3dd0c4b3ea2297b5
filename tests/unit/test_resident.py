"""The resident (armed-before-panic) writer's protocol: arm, go, layers, result (progdump/resident.py).

A real child process each time (as the harness runs it); the memory it dumps
is a synthetic snapshot from dumpkit laid out in a plain file, as QEMU's
shared memory-backend file is. Expected pages come from that snapshot, the
recovered ones from ``progdump recover``, never from the writer's own report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from dumpkit import make_snapshot, snapshot_pages

from progdump.cli import main as cli_main
from progdump.elfcore import load_elf_snapshot, save_elf_snapshot
from progdump.resident import GoError, parse_go
from progdump.snapshot import PAGE_SIZE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _start(dev, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-m", "progdump.resident", str(dev), *extra], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)  # fmt: skip
    armed = json.loads(p.stdout.readline())
    return p, armed


def _dev(tmp_path, size=8 << 20):
    p = tmp_path / "dev.img"
    with open(p, "wb") as f:
        f.truncate(size)
    return p


def _ram_file(tmp_path, snap):
    """The snapshot's ranges one after another in a file, as a memory-backend file holds RAM."""
    path, ranges, off = tmp_path / "ram", [], 0
    with open(path, "wb") as f:
        for r in snap.ranges:
            f.write(bytes(r.buffer))
            ranges.append([r.phys_start, off, r.size])
            off += r.size
    return path, ranges


def test_ram_go_writes_a_dump_that_recovers(tmp_path):
    snap = make_snapshot(80, seed=7)
    pages = snapshot_pages(snap)
    ram, ranges = _ram_file(tmp_path, snap)
    dev = _dev(tmp_path)
    p, armed = _start(dev)
    assert armed["armed"] is True and armed["pid"] == p.pid
    go = {"ram": str(ram), "ranges": ranges, "cpus": [{"index": 0, "regs": {"rip": 0xFFFFFFFF81000007, "rsp": 4096}}],
          "vmcoreinfo": "OSRELEASE=6.1.0-test\nPAGESIZE=4096\n", "console_tail": "Kernel panic - not syncing: x\n",
          "metadata": {"os": "unknown"}}  # fmt: skip
    out, err = p.communicate(json.dumps(go).encode() + b"\n", timeout=60)
    assert p.returncode == 0, err
    lines = out.decode().splitlines()
    durable = [ln for ln in lines if " durable at " in ln]
    assert [ln.split()[1] for ln in durable] == ["0", "1", "2", "3", "4"]
    final = json.loads(lines[-1])
    assert final["done"] is True and final["stopped"] == "done"
    assert sorted(final["go_to_layer_s"]) == ["0", "1", "2", "3", "4"]
    assert 0 <= final["go_to_layer_s"]["0"] <= final["go_to_layer_s"]["4"]
    outdir = tmp_path / "out"
    assert cli_main(["recover", str(dev), str(outdir)]) == 0
    with load_elf_snapshot(str(outdir / "vmcore")) as v:
        for pfn, data in pages.items():
            assert v.read_phys(pfn * PAGE_SIZE, PAGE_SIZE) == data
        assert v.cpus[0].regs["rip"] == 0xFFFFFFFF81000007
        assert v.vmcoreinfo_raw.startswith(b"OSRELEASE=6.1.0-test")


def test_elf_go(tmp_path):
    snap = make_snapshot(40, seed=3)
    elf = tmp_path / "s.elf"
    save_elf_snapshot(snap, str(elf))
    dev = _dev(tmp_path)
    p, armed = _start(dev, "--plan", "monolithic")
    assert armed["armed"]
    out, err = p.communicate(json.dumps({"elf": str(elf)}).encode() + b"\n", timeout=60)
    assert p.returncode == 0, err
    final = json.loads(out.decode().splitlines()[-1])
    assert final["result"]["plan"] == "monolithic" and list(final["go_to_layer_s"]) == ["0"]


def test_eof_disarms_and_writes_nothing(tmp_path):
    dev = _dev(tmp_path, 1 << 20)
    p, armed = _start(dev)
    assert armed["armed"]
    out, _ = p.communicate(b"", timeout=30)
    assert p.returncode == 0 and out == b""
    assert not open(dev, "rb").read().strip(b"\0")


def test_bad_go_is_one_error_line(tmp_path):
    dev = _dev(tmp_path, 1 << 20)
    p, _ = _start(dev)
    out, err = p.communicate(b'{"ram": "/nonexistent", "ranges": [[0, 0, 4096]]}\n', timeout=30)
    assert p.returncode == 1 and b"Traceback" not in err
    msg = json.loads(out.decode().splitlines()[-1])
    assert msg["done"] is False and "/nonexistent" in msg["error"]


def test_arm_failure_is_reported(tmp_path):
    p, armed = _start(tmp_path / "missing.img")
    p.communicate(b"", timeout=30)
    assert p.returncode == 1 and armed["armed"] is False and "missing.img" in armed["error"]


@pytest.mark.parametrize(
    "line, words",
    [
        (b"not json", "not JSON"),
        (b"[1]", "JSON object"),
        (b"{}", "exactly one"),
        (b'{"elf": "a", "ram": "b"}', "exactly one"),
        (b'{"ram": "r"}', "ranges"),
        (b'{"ram": "r", "ranges": [[0, 0]]}', "ranges[0]"),
        (b'{"ram": "r", "ranges": [[0, -1, 4096]]}', "file_offset"),
        (b'{"ram": "r", "ranges": [[0, 0, 4096]], "cpus": [{"regs": {"rip": "x"}}]}', "rip"),
        (b'{"ram": "r", "ranges": [[0, 0, 4096]], "metadata": 3}', "metadata"),
        (b'{"elf": "' + b"a" * (1 << 20) + b'"}', "more than"),
    ],
)
def test_parse_go_rejects(line, words):
    with pytest.raises(GoError, match=None) as e:
        parse_go(line)
    assert words in str(e.value)


def test_the_collector_is_off_from_arming_to_layer_0_and_restored_after(tmp_path):
    """The resident writer disables the cyclic collector while it waits (a collection over everything
    imported cost ~27 ms once, more than layer 0's budget) and turns it back on; in-process too."""
    import gc
    import io

    from progdump.resident import main

    dev = tmp_path / "dev.img"
    dev.write_bytes(b"\0" * (1 << 20))

    class Probe(io.BytesIO):
        seen: list[bool] = []

        def readline(self, *a):  # type: ignore[override]
            self.seen.append(gc.isenabled())
            return b""  # EOF: disarm

    out = io.StringIO()
    inp = Probe()
    assert gc.isenabled()
    assert main([str(dev), "--plan", "progressive-raw", "--no-warm"], stdin=inp, stdout=out) == 0
    assert Probe.seen == [False]  # armed and waiting: no collection can start
    assert gc.isenabled() and gc.get_freeze_count() == 0
