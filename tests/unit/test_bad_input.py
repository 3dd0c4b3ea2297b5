"""Bad input to the CLI and the reader: refused with one clear line, never a hang or a traceback
(issue 10 part 4), and the one rule for dumps this reader cannot read (FORMAT.md R-VER-1..3).

Expected values come from the writer's own result (its dump id) and from hand-built bytes, never
from the reader under test."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import socket
import struct
import subprocess
import sys

import pytest
import xxhash

import progdump
from dumpkit import MemDevice, make_snapshot
from progdump import format as F
from progdump import reader
from progdump.errors import ProgdumpError
from progdump.writer import write_dump

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 60  # a hang is what these tests catch: far above the second these commands take


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "progdump", *args], capture_output=True, text=True, env=env,
                          timeout=TIMEOUT, cwd=ROOT)  # fmt: skip


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    snap = make_snapshot(32, seed=5)
    dev = MemDevice(2 << 20)
    res = write_dump(snap, dev, dump_time_ns=1_000)
    img = d / "dev.img"
    img.write_bytes(bytes(dev.image))
    elf = d / "snap.elf"
    snap.to_elf(str(elf))
    return img, elf, res


def _fifo(tmp_path):
    p = tmp_path / "fifo"
    os.mkfifo(p)
    return p


def test_fifo_as_device_is_refused_without_blocking(tmp_path, dumped):
    fifo = _fifo(tmp_path)
    for args in (("info", str(fifo)), ("recover", str(fifo), str(tmp_path / "o"))):
        p = _cli(*args)
        assert p.returncode == 1, p
        assert "FIFO" in p.stderr and "Traceback" not in p.stderr and p.stderr.count("\n") == 1, p.stderr


def test_fifo_as_snapshot_is_refused_without_blocking(tmp_path, dumped):
    img, _, _ = dumped
    dev = tmp_path / "dev.img"
    dev.write_bytes(img.read_bytes())
    p = _cli("write", str(_fifo(tmp_path)), str(dev))
    assert p.returncode == 1 and "not a regular file" in p.stderr and "Traceback" not in p.stderr, p


def test_socket_as_device_is_refused_without_traceback(tmp_path):
    path = tmp_path / "s.sock"
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(path))
        p = _cli("info", str(path))
    finally:
        s.close()
    assert p.returncode == 1 and "socket" in p.stderr, p
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr


def test_second_recover_into_the_same_outdir_is_refused(tmp_path, dumped):
    img, _, res = dumped
    out = tmp_path / "out"
    assert _cli("recover", "-q", str(img), str(out)).returncode == 0
    before = sorted(os.listdir(out))
    p = _cli("recover", "-q", str(img), str(out))
    assert p.returncode == 1 and "not empty" in p.stderr, p
    assert sorted(os.listdir(out)) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli("recover", "-q", str(img), str(empty)).returncode == 0  # an empty directory is fine
    assert (empty / "manifest.json").is_file()
    assert res.dump_id in (empty / "manifest.json").read_text()


# ---------------------------------------------------------------------------
# R-VER-1..3: one rule for a dump this reader cannot read


def _reseal_header(block: bytearray) -> bytes:
    block[4088:] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(block[:4088])))
    return bytes(block)


def _reseal_record(img: bytearray, off: int) -> None:
    img[off + 120 : off + 128] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(img[off : off + 120])))


# (offset, bytes) that put a header outside version 1: each one alone must refuse the dump
HEADER_EDITS = [
    (8, struct.pack("<H", 2)),  # version 2
    (10, struct.pack("<H", 8192)),  # header block size
    (12, struct.pack("<I", 1)),  # an incompatible feature flag
    (64, b"\x01"),  # reserved byte
    (60, struct.pack("<I", 3961)),  # info length above 3960
    (56, struct.pack("<I", 8192)),  # alignment above 4096 (R-HDR-4)
    (20, struct.pack("<H", 2)),  # copy 2
]


@pytest.mark.parametrize("off,data", HEADER_EDITS)
def test_R_VER_1_newest_dump_with_unsupported_header_is_refused_exit_1(tmp_path, dumped, off, data):
    img, _, res = dumped
    b = bytearray(img.read_bytes())
    blk = bytearray(b[:4096])
    blk[off : off + len(data)] = data
    b[:4096] = _reseal_header(blk)
    p = tmp_path / "d.img"
    p.write_bytes(bytes(b))
    sr = reader.scan(str(p))
    assert not sr.found and sr.unsupported.startswith(f"dump {res.dump_id} (header copy 0)"), sr.unsupported
    sr.close()
    cp = _cli("recover", str(p), str(tmp_path / "o"))
    assert cp.returncode == 1 and "upgrade progdump" in cp.stderr and not (tmp_path / "o").exists(), cp
    if off == 8:
        assert "format version 2" in cp.stderr


def test_R_VER_1_compatible_flag_is_ignored(tmp_path, dumped):
    img, _, res = dumped
    b = bytearray(img.read_bytes())
    blk = bytearray(b[:4096])
    blk[16:20] = struct.pack("<I", 0x80)
    b[:4096] = _reseal_header(blk)
    sr = reader.scan(reader_src(b))
    assert sr.found and sr.dump_id == res.dump_id and sr.headers == ["primary", "backup"]


def reader_src(b: bytes):
    from dumpkit import BytesSource

    return BytesSource(bytes(b))


def test_R_VER_2_records_alone_refuse_their_dump(dumped):
    """Both headers gone: a record of version 2 (or a reserved byte set) still refuses the dump."""
    img, _, res = dumped
    for field_off, data in ((8, struct.pack("<H", 2)), (81, b"\x01"), (104, b"\x01")):
        b = bytearray(img.read_bytes())
        b[:4096] = bytes(4096)
        b[-4096:] = bytes(4096)
        last = 4096  # the first record: LAYER_INFO of layer 0, at LOG_START (R-MAP-2)
        b[last + field_off : last + field_off + len(data)] = data
        _reseal_record(b, last)
        sr = reader.scan(reader_src(b))
        assert not sr.found and sr.unsupported.startswith(f"dump {res.dump_id} (record at 0x1000)"), sr.unsupported


def test_R_RD_3_an_older_unsupported_dump_does_not_hide_a_newer_one(dumped):
    """A version-2 header of an older dump (dump time 1 < the writer's 1000) is ignored with a warning."""
    img, _, res = dumped
    b = bytearray(img.read_bytes())
    old = bytearray(F.pack_header(F.DumpHeader(1, b"\xee" * 16, 1, len(b), 512, 1, 1, {})))
    old[8:10] = struct.pack("<H", 2)
    b[-4096:] = _reseal_header(old)
    sr = reader.scan(reader_src(b))
    assert sr.found and sr.dump_id == res.dump_id
    assert ("ee" * 16) in sr.other_dumps and any("cannot read" in w for w in sr.warnings)


# ---------------------------------------------------------------------------
# issue 8 item 3: one error root


def _progdump_modules():
    for m in pkgutil.walk_packages(progdump.__path__, "progdump."):
        if m.name != "progdump.__main__":  # runs the CLI when imported
            yield importlib.import_module(m.name)


def test_every_progdump_exception_class_has_the_one_root():
    own = []
    for mod in _progdump_modules():
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == mod.__name__:
                own.append(obj)
    assert len(own) >= 14  # the roots issue 8 counted, now subclasses
    # _Stop is the writer's control flow (a deadline reached), not an error
    orphans = [c.__qualname__ for c in own if not issubclass(c, ProgdumpError) and c.__name__ != "_Stop"]
    assert orphans == []


def test_cli_maps_errors_by_class_and_lets_bugs_through(monkeypatch, capsys):
    from progdump import cli

    class Odd(ProgdumpError):
        exit_status = 1

    def boom_error(a):
        raise Odd("the input is odd")

    def boom_bug(a):
        raise ZeroDivisionError("a bug")

    cli.register("t-error", "test", lambda p: None, boom_error)
    cli.register("t-bug", "test", lambda p: None, boom_bug)
    try:
        assert cli.main(["t-error"]) == 1
        assert capsys.readouterr().err == "progdump: the input is odd\n"
        with pytest.raises(ZeroDivisionError):  # a bug is not dressed up as a user error
            cli.main(["t-bug"])
    finally:
        del cli.SUBCOMMANDS["t-error"], cli.SUBCOMMANDS["t-bug"]
