"""The reader never reports torn, stale, foreign or corrupt data as valid (FORMAT.md section 9)."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess

import pytest
from dumpkit import (
    BytesSource,
    ClassProducer,
    MemDevice,
    check_recovery,
    crash_states,
    make_snapshot,
    snapshot_pages,
    writer_records,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from progdump import format as F
from progdump import reader
from progdump.export import ExportError, recover
from progdump.writer import write_dump

DEV = 512 * 1024


def _dump(seed=1, pages=48, base=None, size=DEV, producer=True, **kw):
    snap = make_snapshot(pages, seed=seed, tag=b"S%d" % seed)
    dev = MemDevice(size, base=base)
    res = write_dump(snap, dev, producer=ClassProducer(snap) if producer else None, **kw)
    return snap, dev, res


def _layer_pages(dev: MemDevice, res) -> dict[int, set[int]]:
    """Pfns each layer wrote: the writer's PAGES/ZERO records, parsed independently of the reader."""
    out: dict[int, set[int]] = {}
    for r in writer_records(bytes(dev.image)):
        if r["type"] in (3, 4):
            out.setdefault(r["layer"], set()).update(range(r["aux0"], r["aux0"] + r["aux1"]))
    return out


@pytest.fixture(scope="module")
def small():
    snap, dev, res = _dump()
    return snap, dev, res, _layer_pages(dev, res)


def _used_end(dev: MemDevice) -> int:
    return max(o.offset + len(o.data) for o in dev.ops if o.kind == "W" and o.offset < dev.size - 4096)


def test_R_RD_2_truncation_at_every_sector(small):
    """A dump cut at every sector boundary: never a wrong page, a complete layer always whole,
    and a layer is complete exactly when its commit is inside the cut."""
    snap, dev, res, lp = small
    pages = snapshot_pages(snap)
    img = bytes(dev.image)
    end = _used_end(dev)
    commit_end = {}
    for rec in writer_records(img):  # the writer's COMMITs, not the reader's view of them
        if rec["type"] == 5:
            commit_end[rec["layer"]] = rec["offset"] + rec["span"]
    assert sorted(commit_end) == [lay.index for lay in res.layers if lay.committed]
    prev_complete = 0
    for cut in range(0, end + 512, 512):
        data = img[:cut] + bytes(len(img) - cut)
        sr = reader.scan(BytesSource(data))
        check_recovery(sr, pages, res.dump_id, lp)
        complete = [lay.index for lay in sr.layers if lay.status == "complete"]
        assert complete == [i for i, e in sorted(commit_end.items()) if e <= cut], cut
        assert len(complete) >= prev_complete
        prev_complete = len(complete)


def test_R_RD_4_torn_or_zeroed_sector_never_accepted(small):
    """Each sector of the log replaced by zeros, by random bytes, or by the same sector of another dump."""
    snap, dev, res, lp = small
    pages = snapshot_pages(snap)
    img = bytes(dev.image)
    _, dev2, _ = _dump(seed=99, dump_time_ns=1)  # an older dump's sectors (a newer one would rightly win)
    other = bytes(dev2.image)
    rng = random.Random(5)
    end = _used_end(dev)
    for sec in range(F.LOG_START, end, 512):
        for fill in (bytes(512), rng.randbytes(512), other[sec : sec + 512]):
            data = img[:sec] + fill + img[sec + 512 :]
            sr = reader.scan(BytesSource(data))
            check_recovery(sr, pages, res.dump_id, lp)


def test_random_bit_flips_never_accepted(small):
    snap, dev, res, lp = small
    pages = snapshot_pages(snap)
    img = bytearray(dev.image)
    end = _used_end(dev)
    rng = random.Random(11)
    for _ in range(300):
        data = bytearray(img)
        for _ in range(rng.choice([1, 1, 2, 8])):
            i = rng.randrange(0, end)
            data[i] ^= 1 << rng.randrange(8)
        sr = reader.scan(BytesSource(bytes(data)))
        check_recovery(sr, pages, res.dump_id, lp)


def test_R_HDR_3_dump_found_without_headers(small):
    snap, dev, res, lp = small
    img = bytearray(dev.image)
    img[:4096] = bytes(4096)
    img[-4096:] = os.urandom(4096)
    sr = reader.scan(BytesSource(bytes(img)))
    assert sr.found and sr.dump_id == res.dump_id and sr.headers == []
    assert [lay.name for lay in sr.layers] == ["panic", "tasks", "kernel", "cache", "all"]
    assert all(lay.status == "complete" for lay in sr.layers)


def test_R_HDR_2_every_primary_header_field_flipped_dump_still_read(small):
    snap, dev, res, lp = small
    for off in range(0, 128, 2):
        img = bytearray(dev.image)
        img[off] ^= 0xFF
        sr = reader.scan(BytesSource(bytes(img)))
        assert sr.found and sr.dump_id == res.dump_id and sr.headers == ["backup"], off
        assert all(lay.status == "complete" for lay in sr.layers)


def test_R_ID_2_newer_partial_dump_over_older_complete_one():
    """An older complete dump under a newer interrupted one: the older's pages never appear as the newer's."""
    old_snap, old_dev, old_res = _dump(seed=1)
    base = bytes(old_dev.image)
    new_snap, new_dev, new_res = _dump(seed=2, base=base)
    new_pages = snapshot_pages(new_snap)
    old_pages = snapshot_pages(old_snap)
    assert all(new_pages[p] != old_pages[p] for p in new_pages if new_pages[p] != bytes(4096))
    lp = _layer_pages(new_dev, new_res)
    rng = random.Random(3)
    seen_new = seen_old = 0
    for cut, keep, tear, _ in crash_states(new_dev, rng, 250):
        data = new_dev.state(cut, keep, tear)
        sr = reader.scan(BytesSource(data))
        if sr.dump_id == old_res.dump_id:
            seen_old += 1
            check_recovery(sr, old_pages, old_res.dump_id)
        else:
            seen_new += 1
            check_recovery(sr, new_pages, new_res.dump_id, lp)
    assert seen_new > 0


@pytest.mark.parametrize("kind", ["zeros", "random", "ext4", "illumos", "tiny", "empty"])
def test_R_RD_7_foreign_devices_hold_no_dump(kind, tmp_path):
    path = tmp_path / "dev.img"
    size = 1 << 20
    if kind == "zeros":
        path.write_bytes(bytes(size))
    elif kind == "random":
        path.write_bytes(random.Random(1).randbytes(size))
    elif kind == "ext4":
        if shutil.which("mkfs.ext4") is None and not os.path.exists("/usr/sbin/mkfs.ext4"):
            pytest.skip("mkfs.ext4 not installed (Debian package e2fsprogs)")
        path.write_bytes(bytes(4 << 20))
        mkfs = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
        subprocess.run([mkfs, "-q", "-F", str(path)], check=True, capture_output=True)
    elif kind == "illumos":
        data = bytearray(size)
        # illumos dumphdr_t at offset 65536: dump_magic 0xdefec8ed, dump_version 10 (sys/dumphdr.h)
        struct.pack_into("<II", data, 65536, 0xDEFEC8ED, 10)
        data[65536 + 8 : 65536 + 8 + 32] = b"SunOS\0\0\0omnios\0".ljust(32, b"\0")
        path.write_bytes(bytes(data))
    elif kind == "tiny":
        path.write_bytes(b"\x89PDREC\r\n" * 100)
    else:
        path.write_bytes(b"")
    sr = reader.scan(str(path))
    assert not sr.found and sr.dump_id is None


def test_R_VER_1_newer_format_dump_is_reported_not_read(small):
    snap, dev, res, lp = small
    img = bytearray(bytes(4 << 20))
    # a header and a record of "version 2", checksums valid
    h = bytearray(F.pack_header(F.DumpHeader(1, b"\x01" * 16, 5, len(img), 512, 0, 1, {})))
    h[8:10] = struct.pack("<H", 2)
    h[4088:] = struct.pack("<Q", __import__("xxhash").xxh3_64_intdigest(bytes(h[:4088])))
    img[:4096] = h
    sr = reader.scan(BytesSource(bytes(img)))
    assert not sr.found and "version 2" in sr.unsupported


def test_R_RD_1_hostile_lengths_bounded():
    """A checksum-valid record claiming a huge payload near the device end is not followed out of bounds."""
    img = bytearray(64 * 1024)
    hdr = F.pack_record_header(
        F.RecordType.PAGES, 0, b"\x05" * 16, 1, 0, 4096, 3 << 20, 4 << 20, 0, 1024, 1, b"\0" * 16
    )
    img[4096 : 4096 + 128] = hdr
    sr = reader.scan(BytesSource(bytes(img)))
    assert not sr.found


class _CountingSource(BytesSource):
    def __init__(self, data):
        super().__init__(data)
        self.bytes_read = 0
        self.calls = 0

    def pread(self, offset, length):
        self.calls += 1
        self.bytes_read += length
        return super().pread(offset, length)


def test_scan_reads_little_on_a_small_dump_on_a_large_device():
    """The crash-state replayer scans thousands of overlays: a small complete dump on a 64 MiB device
    must not cost a read of the whole device."""
    snap = make_snapshot(16, seed=21)
    dev = MemDevice(64 << 20)
    write_dump(snap, dev)
    src = _CountingSource(bytes(dev.image))
    sr = reader.scan(src)
    assert sr.found and all(lay.status == "complete" for lay in sr.layers)
    assert src.bytes_read < 1 << 20, src.bytes_read


# -- property tests (hypothesis) ----------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    pages=st.integers(1, 40),
    zero_frac=st.floats(0, 1),
    plan=st.sampled_from(["progressive", "monolithic"]),
    crash_seed=st.integers(0, 2**32),
    old=st.booleans(),
)
def test_property_no_false_accept(seed, pages, zero_frac, plan, crash_seed, old):
    """Recovery never reports a page whose content differs from what was written, and never marks a
    layer complete unless all its content is present and verified (R-COM-3, R-RD-4)."""
    snap = make_snapshot(pages, seed=seed, zero_frac=zero_frac, tag=b"N")
    base = None
    old_id = None
    if old:
        osnap = make_snapshot(pages, seed=seed + 1, zero_frac=zero_frac, tag=b"O")
        odev = MemDevice(256 * 1024)
        old_id = write_dump(osnap, odev, plan=plan).dump_id
        base = bytes(odev.image)
    dev = MemDevice(256 * 1024, base=base)
    res = write_dump(snap, dev, plan=plan, producer=ClassProducer(snap))
    lp = _layer_pages(dev, res)
    pages_map = snapshot_pages(snap)
    rng = random.Random(crash_seed)
    for cut, keep, tear, _ in crash_states(dev, rng, 4):
        data = dev.state(cut, keep, tear)
        sr = reader.scan(BytesSource(data))
        if old and sr.found and sr.dump_id == old_id:
            continue  # the older dump, whole and by its own id: allowed, it is not mixed in
        check_recovery(sr, pages_map, res.dump_id, lp)
        # committed layers (commit flushed before the cut) are never lost
        flushed = max((i for i in range(cut) if dev.ops[i].kind == "F"), default=-1)
        for opi, label in dev.marks:
            if opi - 1 <= flushed:
                idx = int(label.split()[1])
                assert sr.found and sr.layers[idx].status == "complete", (label, cut)


def _forge(img: bytearray, off: int, rtype, payload: bytes, dump_id=b"\x07" * 16, seq=0, layer=0, t=10**19):
    """Write a record with valid checksums (a forger's or a buggy writer's) at ``off``."""
    hdr = F.pack_record_header(
        rtype, layer, dump_id, t, seq, off, len(payload), len(payload), 0, 0, 0, F.payload_checksum(payload)
    )
    img[off : off + 128] = hdr
    img[off + 128 : off + 128 + len(payload)] = payload
    return off + F.record_span(len(payload))


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 100000,
        b'{"name": 5, "notes": {"a": 1}, "plan": "x"}',
        b'{"plan": [1, null, "ok"], "notes": [[1]]}',
        b"\xff\xfe",
        b"{}",
    ],
)
def test_R_RD_7_hostile_json_payloads_never_raise(payload, tmp_path):
    """Checksum-valid but absurd LAYER_INFO / END / COMMIT payloads: the reader reports, never raises."""
    img = bytearray(256 * 1024)
    off = _forge(img, 4096, F.RecordType.LAYER_INFO, payload)
    off = _forge(img, off, F.RecordType.COMMIT, payload[:200], seq=1)
    _forge(img, off, F.RecordType.END, payload, seq=2)
    sr = reader.scan(BytesSource(bytes(img)))
    assert sr.found
    assert all(lay.status != "complete" for lay in sr.layers)
    p = tmp_path / "dev.img"
    p.write_bytes(bytes(img))
    from progdump.cli import main

    assert main(["recover", str(p), str(tmp_path / "o"), "-q"]) == 0
    assert main(["info", str(p)]) == 0


def test_R_EXP_1_no_path_from_the_device(tmp_path):
    """Artifact names that are paths or reserved names are never written; links in OUTDIR are not followed."""
    img = bytearray(256 * 1024)
    off = 4096
    seq = 0
    for name in (b"../../escape", b"manifest.json", b"vmcore", b"ok.txt", b"/etc/passwd"):
        payload = name.ljust(64, b"\0") + b"DATA"
        hdr = F.pack_record_header(F.RecordType.ARTIFACT, 0, b"\x09" * 16, 5, seq, off, len(payload), len(payload), 0, 4, 0,
                                   F.payload_checksum(payload))  # fmt: skip
        img[off : off + 128] = hdr
        img[off + 128 : off + 128 + len(payload)] = payload
        off += F.record_span(len(payload))
        seq += 1
    dev = tmp_path / "dev.img"
    dev.write_bytes(bytes(img))
    planted = tmp_path / "planted"
    planted.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("untouched")
    os.symlink(outside, planted / "ok.txt")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", planted / "layers")
    with pytest.raises(ExportError, match="not empty"):  # a non-empty OUTDIR is refused, links and all
        recover(str(dev), str(planted))
    assert outside.read_text() == "untouched" and not list((tmp_path / "elsewhere").iterdir())
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    with pytest.raises(ExportError, match="symbolic link"):  # OUTDIR itself as a link is refused too
        recover(str(dev), str(tmp_path / "link"))
    out = tmp_path / "out"
    sr = recover(str(dev), str(out))
    assert sr.found
    assert (out / "ok.txt").read_bytes() == b"DATA" and not (out / "ok.txt").is_symlink()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert not (tmp_path / "escape").exists()
    assert (out / "manifest.json").read_text().startswith("{")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["layers", "manifest.json", "ok.txt", "vmcore"]


def test_R_PAG_1_checksum_valid_page_record_with_bad_zero_map_rejected_at_export(tmp_path):
    """A PAGES record whose map disagrees with its length (buggy or forged writer): its layer is not
    complete, its pages are not in the vmcore, recovery still succeeds."""
    snap, dev, res = _dump(seed=41, pages=16, producer=False)
    img = bytearray(dev.image)
    sr = reader.scan(BytesSource(bytes(img)))
    recs = [r for r in sr._recs if r.h.rtype == F.RecordType.PAGES]
    assert recs
    h = recs[0].h
    # forge: same record, map claiming one more zero page than the data says, checksums redone
    raw = reader._payload(BytesSource(bytes(img)), h)
    bad = bytearray(raw)
    bad[0] ^= 1 if not (bad[0] & 1) else 2
    import zstandard

    payload = zstandard.ZstdCompressor(level=19).compress(bytes(bad))
    hdr = F.pack_record_header(h.rtype, h.layer, h.dump_id, h.dump_time_ns, h.seq, h.offset, len(payload), len(bad),
                               h.aux0, h.aux1, F.Compression.ZSTD, F.payload_checksum(payload))  # fmt: skip
    if F.record_span(len(payload)) > h.span:
        pytest.skip("forged record would not fit in place")
    img[h.offset : h.offset + 128] = hdr
    img[h.offset + 128 : h.offset + 128 + len(payload)] = payload
    p = tmp_path / "dev.img"
    p.write_bytes(bytes(img))
    out = tmp_path / "o"
    sr = recover(str(p), str(out))
    lay = sr.layers[h.layer]
    assert lay.status == "partial" and any("record" in r for r in lay.reasons)
    from progdump.elfcore import load_elf_snapshot

    with load_elf_snapshot(out / "vmcore") as v:
        assert not v.has_phys(h.aux0 * 4096, 4096)


def test_R_LIM_1_R_RD_6_decompression_bounded_by_raw_length():
    """A checksum-valid zstd payload that inflates past its raw length is a corrupt record."""
    import zstandard

    img = bytearray(256 * 1024)
    payload = zstandard.ZstdCompressor().compress(b"a".ljust(64, b"\0") + bytes(3 << 20))
    hdr = F.pack_record_header(F.RecordType.ARTIFACT, 0, b"\x0a" * 16, 5, 0, 4096, len(payload), 200, 0, 136, 1,
                               F.payload_checksum(payload))  # fmt: skip
    img[4096 : 4096 + 128] = hdr
    img[4096 + 128 : 4096 + 128 + len(payload)] = payload
    sr = reader.scan(BytesSource(bytes(img)))
    assert sr.found and sr.artifact_names() == {} and all(lay.status == "missing" for lay in sr.layers)


def test_R_RD_5_partial_layer_keeps_complete_artifacts(small):
    """Layer 1's records landed but not its commit: it is partial, and its whole artifact is exported."""
    snap, dev, res, lp = small
    marks = [i for i, label in dev.marks]
    # state: everything up to layer 0's durable mark, then layer 1's records (no commit, no flush)
    commit1 = marks[1]
    ops_before_commit = commit1 - 3  # the write holding layer 1's commit, its flush, the mark follow
    img = dev.state(ops_before_commit, keep=set(range(ops_before_commit)))
    sr = reader.scan(BytesSource(img))
    assert sr.layers[0].status == "complete" and sr.layers[1].status == "partial"
    assert sr.read_artifact("tasks.txt") == b"pid 1 init\n" * 50


def test_R_EXP_2_vmcore_covers_exactly_the_recovered_pages(small, tmp_path):
    """Partial dump: recovered pages read back exactly, zero pages as zero, missing pages in no PT_LOAD."""
    from progdump.elfcore import load_elf_snapshot

    snap, dev, res, lp = small
    pages = snapshot_pages(snap)
    marks = [i for i, label in dev.marks]
    img = dev.state(marks[2] + 1)  # layers 0-2 durable, later layers' unflushed writes lost
    p = tmp_path / "dev.img"
    p.write_bytes(img)
    out = tmp_path / "o"
    sr = recover(str(p), str(out))
    assert [lay.status for lay in sr.layers][:3] == ["complete"] * 3
    with load_elf_snapshot(out / "vmcore") as v:
        for pfn, data in pages.items():
            if pfn in lp[2]:
                assert v.read_phys(pfn * 4096, 4096) == data
            else:
                assert not v.has_phys(pfn * 4096, 4096), f"page {pfn:#x} not recovered but covered"
        assert any(pages[p] == bytes(4096) for p in lp[2]), "test needs a zero page in layer 2"


def test_R_REC_1_scan_of_a_4k_aligned_dump_reads_little():
    """Records padded to 4 KiB (a 4096-byte-sector device): the walk finds each next record directly."""
    snap = make_snapshot(64, seed=23)
    dev = MemDevice(8 << 20, sector_size=4096)
    write_dump(snap, dev, producer=ClassProducer(snap))
    src = _CountingSource(bytes(dev.image))
    sr = reader.scan(src)
    assert sr.found and all(lay.status == "complete" for lay in sr.layers)
    used = sum(len(o.data) for o in dev.ops if o.kind == "W")
    assert src.bytes_read < 2 * used, (src.bytes_read, used)


def test_R_RD_7_forged_records_with_valid_checksums_never_crash(small, tmp_path):
    """Structure-aware fuzzing: header fields rewritten to edge values with checksums redone (what a
    buggy writer could produce). Scan and recovery must report, never raise."""
    import xxhash

    snap, dev, res, lp = small
    img0 = bytes(dev.image)
    recs = reader.scan(BytesSource(img0))._recs
    rng = random.Random(77)
    fields = [(12, 2), (14, 2), (40, 8), (56, 4), (60, 4), (64, 8), (72, 8), (80, 1)]
    edges = [0, 1, 2, 3, 7, 255, 256, 1023, 1024, 1025, 2**16 - 1, 2**31, 2**32 - 1, 2**52, 2**63, 2**64 - 1]
    for it in range(150):
        img = bytearray(img0)
        for _ in range(rng.choice([1, 2, 3])):
            r = rng.choice(recs)
            off, size = rng.choice(fields)
            v = rng.choice(edges) % (1 << (8 * size))
            hdr = bytearray(img[r.h.offset : r.h.offset + 128])
            hdr[off : off + size] = v.to_bytes(size, "little")
            hdr[120:128] = xxhash.xxh3_64_intdigest(bytes(hdr[:120])).to_bytes(8, "little")
            img[r.h.offset : r.h.offset + 128] = hdr
        p = tmp_path / f"f{it % 3}.img"
        p.write_bytes(bytes(img))
        sr = recover(str(p), str(tmp_path / f"o{it}"))
        # R-VER-1..3: a forged field outside version 1's domain makes the dump unsupported (refused,
        # named); anything else is read. Either way it is the writer's dump, never another.
        if sr.found:
            assert sr.dump_id == res.dump_id
        else:
            assert sr.unsupported.startswith(f"dump {res.dump_id} ("), sr.unsupported
        sr.close()


def test_R_EXP_2_zero_memory_costs_no_vmcore_bytes(tmp_path):
    """Known-zero pages are holes of the sparse vmcore: they read as zero and take no disk blocks.
    (p_filesz = p_memsz everywhere: makedumpfile 1.7.2 crashes on PT_LOADs without file bytes.)"""
    from progdump.elfcore import load_elf_snapshot

    snap = make_snapshot(4096, seed=61, zero_frac=1.0)
    dev = MemDevice(1 << 20)
    write_dump(snap, dev)
    p = tmp_path / "dev.img"
    p.write_bytes(bytes(dev.image))
    out = tmp_path / "o"
    recover(str(p), str(out))
    vm = out / "vmcore"
    assert vm.stat().st_blocks * 512 < 256 * 1024  # 16 MiB of zero memory described
    from elftools.elf.elffile import ELFFile

    with open(vm, "rb") as f:
        loads = [seg for seg in ELFFile(f).iter_segments() if seg["p_type"] == "PT_LOAD"]
        assert loads and all(seg["p_filesz"] == seg["p_memsz"] for seg in loads)
    with load_elf_snapshot(vm) as v:
        assert v.total_bytes == 4096 * 4096
        assert v.read_phys(0, 4096) == bytes(4096) and v.read_phys((1 << 32) + 4096 * 100, 4096) == bytes(4096)


def test_R_LIM_1_only_the_first_frame_counts_and_bytes_after_it_are_ignored():
    """The rule as FORMAT.md states it, on payloads built here by hand (not by our writer)."""
    import zstandard

    from progdump.format import Compression

    def h(raw_len):  # the two header fields the decoder reads
        return type("H", (), {"compression": Compression.ZSTD, "raw_len": raw_len})()

    a = zstandard.ZstdCompressor().compress(b"a" * 5000)
    b = zstandard.ZstdCompressor().compress(b"b" * 5000)
    assert reader._decompress(a + b"\x00garbage", h(5000)) == b"a" * 5000  # bytes after the frame: ignored
    assert reader._decompress(a + b, h(10000)) is None  # a second frame is not read: 5000 bytes != raw
    assert reader._decompress(a, h(4999)) is None  # more than raw: invalid
