"""The CLI contract of issue 2: write / recover / info, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from dumpkit import make_snapshot, snapshot_pages

from progdump.cli import main
from progdump.elfcore import load_elf_snapshot, save_elf_snapshot
from progdump.snapshot import PAGE_SIZE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def elf(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    snap = make_snapshot(96, seed=31)
    path = d / "snap.elf"
    save_elf_snapshot(snap, str(path))
    return path, snapshot_pages(snap)


def _dev(tmp_path, size=4 << 20):
    p = tmp_path / "dev.img"
    with open(p, "wb") as f:
        f.truncate(size)
    return p


def test_write_recover_info_round_trip(elf, tmp_path, capsys):
    snap_path, pages = elf
    dev = _dev(tmp_path)
    assert main(["write", str(snap_path), str(dev)]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if " durable at " in ln]
    assert [ln.split()[2] for ln in lines] == ["panic", "tasks", "kernel", "cache", "all"]
    assert all(ln.startswith(f"layer {i} ") for i, ln in enumerate(lines))
    outdir = tmp_path / "out"
    assert main(["recover", str(dev), str(outdir)]) == 0
    assert "recovered into" in capsys.readouterr().out
    m = json.loads((outdir / "manifest.json").read_text())
    assert isinstance(m["dump_id"], str) and len(m["dump_id"]) == 32 and m["format_version"] == 1
    assert [(lay["index"], lay["name"], lay["status"]) for lay in m["layers"]] == [
        (0, "panic", "complete"), (1, "tasks", "complete"), (2, "kernel", "complete"),
        (3, "cache", "complete"), (4, "all", "complete"),
    ]  # fmt: skip
    assert all(isinstance(lay["bytes"], int) and lay["bytes"] > 0 for lay in m["layers"])
    for name in ("panic.txt", "console.txt", "registers.json", "metadata.json", "elf-notes.bin"):
        assert (outdir / name).is_file(), name
    assert (outdir / "layers" / "0.json").is_file()
    with load_elf_snapshot(str(outdir / "vmcore")) as v:
        for pfn, data in pages.items():
            assert v.read_phys(pfn * PAGE_SIZE, PAGE_SIZE) == data
        assert v.vmcoreinfo_raw is not None
        assert v.cpus and v.cpus[0].regs["rip"] == 0xFFFFFFFF81000000 + 31
    assert main(["info", str(dev), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dump_id"] == m["dump_id"]
    assert main(["info", str(dev)]) == 0
    assert "complete" in capsys.readouterr().out


def test_monolithic_and_deadline(elf, tmp_path, capsys):
    snap_path, _ = elf
    dev = _dev(tmp_path)
    assert main(["write", str(snap_path), str(dev), "--plan", "monolithic", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["write", str(snap_path), str(dev), "--deadline", "0", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["stopped"] == "deadline" and not any(lay["committed"] for lay in r["layers"])
    out = tmp_path / "o"
    assert main(["recover", str(dev), str(out), "-q"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["dump_id"] == r["dump_id"] and all(lay["status"] == "missing" for lay in m["layers"])
    assert (out / "vmcore").is_file()


@pytest.mark.parametrize(
    "argv_tail,code",
    [
        (["--plan", "bogus"], 1),
        (["--device-model", "bogus"], 1),
        (["--trace", "/tmp/x.trace"], 1),
        (["--deadline", "-1"], 1),
    ],
)
def test_write_usage_errors_exit_1(elf, tmp_path, capsys, argv_tail, code):
    snap_path, _ = elf
    dev = _dev(tmp_path)
    assert main(["write", str(snap_path), str(dev), *argv_tail]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("progdump: ") or err[-1].startswith("usage")


def test_write_missing_device_small_device_bad_snapshot(elf, tmp_path, capsys):
    snap_path, _ = elf
    assert main(["write", str(snap_path), str(tmp_path / "nope.img")]) == 1
    assert main(["write", str(snap_path), str(_dev(tmp_path, 8192))]) == 1
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"not an elf" * 100)
    assert main(["write", str(bad), str(_dev(tmp_path))]) == 1
    errs = capsys.readouterr().err.strip().splitlines()
    assert len(errs) == 3 and all(e.startswith("progdump: ") for e in errs)


def test_write_device_too_small_for_whole_dump_exit_1(elf, tmp_path, capsys):
    snap_path, _ = elf
    dev = _dev(tmp_path, 64 * 1024)
    assert main(["write", str(snap_path), str(dev)]) == 1
    assert "too small" in capsys.readouterr().err
    assert main(["info", str(dev)]) == 0


def test_recover_exit_codes(tmp_path, capsys):
    zeros = _dev(tmp_path, 1 << 20)
    assert main(["recover", str(zeros), str(tmp_path / "o")]) == 2
    assert main(["info", str(zeros)]) == 2
    assert main(["recover", str(tmp_path / "missing.img"), str(tmp_path / "o")]) == 1
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["recover", str(zeros), str(f)]) == 1
    assert main([]) == 1
    assert main(["recover"]) == 1


def test_console_script_module_entry(elf, tmp_path):
    """``python -m progdump`` runs the same CLI (exit codes through the process)."""
    zeros = _dev(tmp_path, 1 << 20)
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run(
        [sys.executable, "-m", "progdump", "recover", str(zeros), str(tmp_path / "o")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "progdump.cli", "info", str(zeros)], env=env, capture_output=True, text=True
    )
    assert r.returncode == 2


def test_register_subcommand(capsys):
    from progdump import cli

    cli.register("hello", "say hello", lambda p: p.add_argument("who"), lambda a: print(f"hi {a.who}") or 0)
    try:
        assert main(["hello", "there"]) == 0
        assert capsys.readouterr().out == "hi there\n"
    finally:
        del cli.SUBCOMMANDS["hello"]


def test_progress_bar_only_on_a_terminal():
    import io

    from progdump.cli import _Bar

    class Tty(io.StringIO):
        def isatty(self):
            return True

    t = Tty()
    b = _Bar(t)
    b.update(50, 100, "layer 4 all")
    assert "50.0%" in t.getvalue() and "layer 4 all" in t.getvalue()
    b.clear()
    assert t.getvalue().endswith("\r")
    p = io.StringIO()
    b = _Bar(p)
    b.update(50, 100, "x")
    assert p.getvalue() == ""


def test_builtin_commands_load_no_plugins(elf, tmp_path, monkeypatch, capsys):
    """write/recover/info never load entry-point plugins (issue 13: start-up time); other words do."""
    from progdump import cli

    calls = []
    monkeypatch.setattr(cli, "_load_plugins", lambda: calls.append(1))
    snap_path, _ = elf
    dev = _dev(tmp_path)
    assert main(["-q", "write", str(snap_path), str(dev)]) == 0
    assert main(["info", str(dev)]) == 0
    assert main(["recover", str(dev), str(tmp_path / "out")]) == 0
    assert calls == []
    assert main(["no-such-command"]) == 1  # usage error: plugins were tried, they might have defined it
    assert calls == [1]
    capsys.readouterr()


def test_write_process_imports_no_harness(elf, tmp_path):
    """The ``write`` process never imports the harness or importlib.metadata (checked by the interpreter)."""
    snap_path, _ = elf
    dev = _dev(tmp_path)
    code = (
        "import sys; from progdump.cli import main; rc = main(['-q', 'write', sys.argv[1], sys.argv[2]]);"
        "bad = sorted(m for m in sys.modules if m.startswith('harness') or m == 'importlib.metadata');"
        "print(rc, bad)"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code, str(snap_path), str(dev)], env=env, capture_output=True, text=True)
    assert r.stdout.strip() == "0 []", r.stdout + r.stderr


def test_write_help_lists_every_plan(capsys):
    """``--plan`` help names every plan in the plan registry, not only two."""
    from progdump.layers.plan import PLANS

    assert main(["write", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert len(PLANS) >= 5
    for name in PLANS:
        assert name in out, name


def test_top_level_help_lists_plugin_commands(capsys):
    """The top-level help still loads entry-point plugins and lists their commands (replay, from pyproject.toml)."""
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "write" in out and "recover" in out
    from importlib.metadata import entry_points

    for ep in entry_points(group="progdump.cli"):
        assert ep.name in out, ep.name
