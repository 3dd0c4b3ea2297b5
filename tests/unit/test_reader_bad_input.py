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
from dumpkit import MemDevice, make_snapshot

import progdump
from progdump import format as F
from progdump import reader
from progdump.elfcore import save_elf_snapshot
from progdump.errors import ProgdumpError
from progdump.export import recover
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
    save_elf_snapshot(snap, str(elf))
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


def test_R_EXP_4_second_recover_into_the_same_outdir_is_refused(tmp_path, dumped):
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
def test_R_VER_1_R_HDR_4_newest_dump_with_unsupported_header_is_refused_exit_1(tmp_path, dumped, off, data):
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


def test_R_VER_2_R_VER_3_records_alone_refuse_their_dump(dumped):
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
        for obj in vars(mod).values():
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


# ---------------------------------------------------------------------------
# rules settled in the 2026-12-05 note; expectations by hand from FORMAT.md


def _hand_record(
    img: bytearray,
    off: int,
    rtype: int,
    layer: int,
    seq: int,
    payload: bytes,
    did: bytes = b"\x42" * 16,
    aux0: int = 0,
    aux1: int = 0,
) -> int:
    h = F.pack_record_header(
        rtype, layer, did, 7, seq, off, len(payload), len(payload), aux0, aux1, 0, F.payload_checksum(payload)
    )
    img[off : off + 128] = h
    img[off + 128 : off + 128 + len(payload)] = payload
    return off + F.record_span(len(payload))


def test_R_HDR_4_header_copy_at_the_wrong_place_names_no_dump(dumped):
    img, _, res = dumped
    b = bytearray(img.read_bytes())
    b[:4096] = b[-4096:]  # the backup (copy 1) at offset 0
    sr = reader.scan(reader_src(b))
    assert sr.found and sr.dump_id == res.dump_id and sr.headers == ["backup"]
    assert any("says it is copy 1" in w for w in sr.warnings)


def test_R_JSON_1_R_JSON_2_payload_shapes():
    import json

    with pytest.raises(F.FormatError, match="not a JSON object"):
        F.parse_commit(F.pack_commit(F.CommitInfo(0, 1, bytes(16), 0, 0.0, {}))[:64] + b"[1]")
    img = bytearray(256 * 1024)
    off = _hand_record(img, 4096, F.RecordType.LAYER_INFO, 0, 0, b"[]")  # not an object: invalid record
    _hand_record(img, off, F.RecordType.LAYER_INFO, 1, 1, json.dumps({"name": 5, "notes": ["a", 3]}).encode())
    sr = reader.scan(reader_src(img))
    assert sr.found and [lay.status for lay in sr.layers] == ["missing", "partial"]
    assert sr.layers[1].name == "layer1" and sr.layers[1].notes == ["a"]  # wrong types are absent


def test_R_LIM_2_R_RD_8_R_PAG_3_R_PAG_4_hand_built_records():
    img = bytearray(256 * 1024)
    off = _hand_record(img, 4096, F.RecordType.LAYER_INFO, 64, 0, b"{}")  # layer 64: not reported
    off = _hand_record(img, off, F.RecordType.LAYER_INFO, 0, 1, b"{}")
    off = _hand_record(img, off, F.RecordType.LAYER_INFO, 0, 1, b'{"x":1}')  # seq 1 again, other header
    off = _hand_record(img, off, F.RecordType.ZERO, 1, 2, b"", aux0=0, aux1=1 << 32)  # count above 2^32-1
    off = _hand_record(img, off, F.RecordType.ZERO, 2, 3, b"", aux0=(1 << 40) - 1, aux1=2)  # past 2^40
    _hand_record(img, off, F.RecordType.ZERO, 3, 4, b"", aux0=5, aux1=3)  # fine
    sr = reader.scan(reader_src(img))
    assert sr.found and len(sr.layers) == 4
    assert any("appears twice" in w for w in sr.warnings) and sr.layers[0].status == "missing"  # R-RD-8
    assert [lay.pages for lay in sr.layers] == [0, 0, 0, 3]


def test_R_MAP_3_too_small_device():
    sr = reader.scan(reader_src(bytes(16 * 1024 - 1)))
    assert not sr.found and "too small" in sr.error


def test_R_TYP_6_R_EXP_3_end_layer_and_layer_files(tmp_path, dumped):
    import json

    from dumpkit import writer_records

    img, _, res = dumped
    ends = [r for r in writer_records(img.read_bytes()) if r["type"] == F.RecordType.END]
    assert len(ends) == 1 and ends[0]["layer"] == 0
    out = tmp_path / "o"
    recover(str(img), str(out)).close()
    m = json.loads((out / "manifest.json").read_text())
    for lay in m["layers"]:
        assert json.loads((out / "layers" / f"{lay['index']}.json").read_text()) == lay


def test_a_fifo_swapped_in_after_the_writers_stat_neither_blocks_nor_is_written(tmp_path, monkeypatch):
    """The race the writer's first check cannot see: the path passes ``stat`` as a
    regular file and is a FIFO by the time it is opened. ``stat`` is faked here
    (this test's only fake) to stand for the moment before the swap; the open
    must not wait for a reader and must refuse what it got."""
    import stat as stat_mod

    from progdump import device as device_mod

    fifo = _fifo(tmp_path)
    real_stat = os.stat
    as_file = os.stat_result((stat_mod.S_IFREG | 0o600,) + tuple(real_stat(fifo))[1:])
    monkeypatch.setattr(
        device_mod._os, "stat", lambda p, *a, **k: as_file if os.fspath(p) == str(fifo) else real_stat(p)
    )
    outcome: list[BaseException | None] = []

    def open_it() -> None:
        try:
            device_mod.FileDevice(str(fifo)).close()
            outcome.append(None)
        except BaseException as e:  # handed to the test's thread
            outcome.append(e)

    import threading

    t = threading.Thread(target=open_it, daemon=True)
    t.start()
    t.join(10)
    if not outcome:  # a blocked writer-side open waits for a reader: give it one (never blocks itself)
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        t.join(5)
        os.close(fd)
    assert outcome, "opening a FIFO blocked"
    assert isinstance(outcome[0], device_mod.DeviceError), outcome
    assert "not a regular file or block device" in str(outcome[0])
