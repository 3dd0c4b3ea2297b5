"""Write errors on the medium: the writer carries on past a bad region, recovery reports the hole (R-WR-7).

The bad regions here are in ``MemDevice`` (the test fake of dumpkit) and in
the real modelled device (``progdump.devmodel``) over a file, the one the
``dump-device-errors`` scenario uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from dumpkit import BytesSource, ClassProducer, MemDevice, check_recovery, crash_states, make_snapshot, snapshot_pages
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from progdump import reader
from progdump.device import FileDevice
from progdump.devmodel import DeviceModel, FaultRegion, ModelledDevice
from progdump.elfcore import save_elf_snapshot
from progdump.export import recover
from progdump.format import LANDING, MAX_HOLE
from progdump.writer import format_durable_line, write_dump

MIB = 1 << 20


def _layer_span(dev: MemDevice, res, index: int) -> tuple[int, int]:
    """Device extent [lo, hi) of one layer's writes, from the device's own op log."""
    marks = [n for n, _ in dev.marks]
    lo_op = marks[index - 1] if index else 0
    ws = [o for o in dev.ops[lo_op : marks[index]] if o.kind == "W" and o.offset >= 4096]
    return min(o.offset for o in ws), max(o.offset + len(o.data) for o in ws)


def _reference(snap, size: int) -> MemDevice:
    dev = MemDevice(size)
    res = write_dump(snap, dev, producer=ClassProducer(snap), threads=1)
    assert res.complete
    return dev


def test_R_WR_7_bad_region_in_a_page_layer_is_carried_past_and_reported():
    snap = make_snapshot(3000, seed=21, zero_frac=0.1)
    size = 64 * MIB
    ref = _reference(snap, size)
    lo, hi = _layer_span(ref, None, 2)  # the kernel layer's extent in an undisturbed run
    bad = (lo + (hi - lo) // 3 // 512 * 512, lo + (hi - lo) // 3 // 512 * 512 + 1 * MIB)

    dev = MemDevice(size)
    dev.bad = [bad]
    lines: list[str] = []
    res = write_dump(
        snap,
        dev,
        producer=ClassProducer(snap),
        threads=1,
        progress=lambda ev: lines.append(ev.message) if ev.kind == "write-error" else None,
    )
    assert res.stopped == "done", res.error
    assert dev.failed and res.failed_writes == len(dev.failed)
    kern = res.layers[2]
    assert kern.committed and kern.lost_records > 0 and kern.holes
    assert "with a hole" in format_durable_line(kern)
    assert lines and "failed" in lines[0]
    assert not res.complete  # a dump with a hole is not complete, even though every layer committed
    for lay in res.layers[:2] + res.layers[3:]:
        assert lay.committed and not lay.holes, lay

    sr = reader.scan(BytesSource(bytes(dev.image)))
    st = {lay.index: lay for lay in sr.layers}
    assert st[2].status == "partial"
    assert st[2].holes and st[2].holes[0]["offset"] == dev.failed[0][0]
    assert st[2].reasons[0].startswith("hole:")
    assert all(st[i].status == "complete" for i in (0, 1, 3, 4)), [(i, st[i].status, st[i].reasons) for i in st]
    # nothing is lost: the pages of the failed records were written again by the last layer
    got = check_recovery(sr, snapshot_pages(snap), res.dump_id)
    assert set(got) == set(snapshot_pages(snap))
    assert sr.end is not None and sr.end["failed_writes"] == len(dev.failed)
    assert res.pages_lost == 0


def test_R_WR_7_monolithic_hole_keeps_everything_else():
    snap = make_snapshot(2000, seed=22, zero_frac=0.1)
    dev = MemDevice(48 * MIB)
    dev.bad = [(1 * MIB + 512 * 1024, 2 * MIB)]
    res = write_dump(snap, dev, plan="monolithic", producer=ClassProducer(snap), threads=1)
    assert res.stopped == "done" and res.failed_writes >= 1 and res.layers[0].lost_records > 0
    sr = reader.scan(BytesSource(bytes(dev.image)))
    assert sr.layers[0].status == "partial" and sr.layers[0].holes
    got = check_recovery(sr, snapshot_pages(snap), res.dump_id)
    assert 0 < len(got) < len(snapshot_pages(snap))  # the one layer cannot retry: the hole's pages are gone
    assert res.pages_lost == len(snapshot_pages(snap)) - len(got)


def test_R_WR_7_bad_region_longer_than_max_hole_stops_the_dump():
    snap = make_snapshot(5000, seed=23, zero_frac=0.0)
    dev = MemDevice(64 * MIB)
    dev.bad = [(2 * MIB, 2 * MIB + MAX_HOLE + 4 * MIB)]
    res = write_dump(snap, dev, producer=ClassProducer(snap), threads=1)
    assert res.stopped == "error" and "in a row" in res.error
    sr = reader.scan(BytesSource(bytes(dev.image)))
    for lay, got in zip(res.layers, sr.layers):
        if lay.committed and not lay.lost_records:
            assert got.status == "complete"
    assert res.layers[0].committed
    check_recovery(sr, snapshot_pages(snap), res.dump_id)


def test_R_WR_7_header_copy_on_a_bad_sector_costs_nothing():
    snap = make_snapshot(64, seed=24)
    dev = MemDevice(4 * MIB)
    dev.bad = [(0, 4096)]
    res = write_dump(snap, dev, producer=ClassProducer(snap), threads=1)
    assert res.stopped == "done" and res.failed_writes == 1
    sr = reader.scan(BytesSource(bytes(dev.image)))
    assert sr.headers == ["backup"]
    assert all(lay.status == "complete" for lay in sr.layers)


def test_R_RD_2_older_end_inside_a_hole_does_not_end_the_walk():
    """An older, shorter dump's END shows through the new dump's bad region: the new dump's later layers are found."""
    old = make_snapshot(1200, seed=25, tag=b"O", zero_frac=0.0)
    new = make_snapshot(3000, seed=26, tag=b"N", zero_frac=0.0)
    size = 64 * MIB
    base_dev = MemDevice(size)
    old_res = write_dump(old, base_dev, producer=ClassProducer(old), threads=1)
    assert old_res.complete
    end_op = [o for o in base_dev.ops if o.kind == "W"][-1]  # the END record's write
    sr_old = reader.scan(BytesSource(bytes(base_dev.image)))
    assert sr_old.end is not None
    ref = _reference(new, size)
    lo, hi = _layer_span(ref, None, 2)
    assert lo < end_op.offset < hi, "test setup: the older END must lie inside the new kernel layer"

    dev = MemDevice(size, base=bytes(base_dev.image))
    dev.bad = [(end_op.offset - 512 * 1024, end_op.offset + 512 * 1024)]
    res = write_dump(new, dev, producer=ClassProducer(new), threads=1)
    assert res.stopped == "done" and res.layers[2].lost_records
    sr = reader.scan(BytesSource(bytes(dev.image)))
    assert sr.dump_id == res.dump_id
    assert [lay.status for lay in sr.layers] == ["complete", "complete", "partial", "complete", "complete"]
    got = check_recovery(sr, snapshot_pages(new), res.dump_id)
    assert set(got) == set(snapshot_pages(new))


def test_R_WR_7_after_a_failed_write_the_log_restarts_on_a_landing():
    """Nothing is written behind a failed write in its epoch; the next write starts on a LANDING
    boundary past it, at most MAX_HOLE past the last good write: where a reader probes."""
    snap = make_snapshot(6000, seed=35, zero_frac=0.1)
    dev = MemDevice(96 * MIB)
    dev.bad = [(2 * MIB, 3 * MIB), (9 * MIB, 9 * MIB + 4096)]
    res = write_dump(snap, dev, producer=ClassProducer(snap), threads=1)
    assert res.stopped == "done" and len(dev.failed) >= 2
    ws = [o for o in dev.ops if o.kind in ("W", "X") and 4096 <= o.offset < dev.size - 4096]
    good_end = 4096
    for prev, nxt in zip(ws, ws[1:]):
        if prev.kind == "W":
            good_end = prev.offset + len(prev.data)
        if prev.kind == "X" and nxt.kind in ("W", "X"):
            assert nxt.offset % LANDING == 0 and nxt.offset > prev.offset, (hex(prev.offset), hex(nxt.offset))
            assert nxt.offset - good_end <= MAX_HOLE


def _fast_failing_model(at: float, length: int) -> DeviceModel:
    return DeviceModel("fast-failing", 4e9, 1e-6, 0.0, 1e-4, 8 * MIB, 512, "test", 1e-3, (FaultRegion(at, length),))


def test_R_WR_7_modelled_device_bad_region_trace_and_recovery(tmp_path):
    """The real modelled device over a file: failed writes are traced FAILED, recovery reports the hole."""
    from harness.crashsim.trace import read_trace

    snap = make_snapshot(3000, seed=27, zero_frac=0.1)
    img = tmp_path / "dump.img"
    with open(img, "wb") as f:
        f.truncate(64 * MIB)
    trace = tmp_path / "t.trace"
    dev = ModelledDevice(FileDevice(str(img)), _fast_failing_model(0.04, 1 * MIB), str(trace))
    res = write_dump(snap, dev, producer=ClassProducer(snap), threads=1)
    dev.close()
    assert res.stopped == "done" and res.failed_writes >= 1
    tr = read_trace(str(trace))
    assert len(tr.failed_writes) == res.failed_writes
    tr.close()
    out = tmp_path / "out"
    sr = recover(str(img), out)
    holey = [lay for lay in sr.layers if lay.holes]
    assert holey and all(lay.status == "partial" for lay in holey)
    manifest = json.loads((out / "manifest.json").read_text())
    assert any(lay["holes"] for lay in manifest["layers"])
    assert all(lay["status"] == "complete" for lay in manifest["layers"] if not lay["holes"])


def test_R_WR_7_cli_write_carries_on_and_info_shows_the_hole(tmp_path):
    snap = make_snapshot(3000, seed=28, zero_frac=0.1)
    core = tmp_path / "core.elf"
    save_elf_snapshot(snap, str(core))
    img = tmp_path / "dump.img"
    with open(img, "wb") as f:
        f.truncate(64 * MIB)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    p = subprocess.run(
        [sys.executable, "-m", "progdump", "write", str(core), str(img), "--device-model", "nvme-failing"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert "carrying on past it" in p.stderr and "layers with a hole" in p.stderr
    # the generic producer (no page classes) puts all memory in the last layer: nothing can retry it
    assert "of their pages are in no layer" in p.stderr
    q = subprocess.run(
        [sys.executable, "-m", "progdump", "info", str(img)], capture_output=True, text=True, env=env, timeout=120
    )
    assert q.returncode == 0 and "hole:" in q.stdout, q.stdout


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def _holey_over_older(shift: int):
    """A new dump over an older one, a bad region ending ``shift`` bytes before the end of the new kernel layer."""
    old = make_snapshot(6000, seed=31, tag=b"O", zero_frac=0.3)  # other record sizes: spans straddle
    new = make_snapshot(4000, seed=32, tag=b"N", zero_frac=0.0)
    size = 64 * MIB
    base_dev = MemDevice(size)
    assert write_dump(old, base_dev, producer=ClassProducer(old), threads=1).complete
    lo, hi = _layer_span(_reference(new, size), None, 2)
    start = max(lo, hi - shift - 700 * 1024) // 512 * 512
    dev = MemDevice(size, base=bytes(base_dev.image))
    dev.bad = [(start, start + 700 * 1024)]
    res = write_dump(new, dev, producer=ClassProducer(new), threads=1)
    assert res.stopped == "done" and res.layers[2].lost_records
    return new, res, bytes(dev.image)


def test_R_RD_2_records_under_an_older_records_span_are_found(monkeypatch):
    """Across the hole the walk follows the older dump's records; one of them can span the start of
    the new dump's next records. The reader probes the landings past each run: every layer but the
    holey one is complete. Without the probes at least one of these layouts loses a committed layer
    (the test can fail)."""
    cases = [_holey_over_older(shift) for shift in range(0, 1 << 20, 64 * 1024)]
    for new, res, img in cases:
        sr = reader.scan(BytesSource(img))
        assert [lay.status for lay in sr.layers] == ["complete", "complete", "partial", "complete", "complete"]
        assert set(check_recovery(sr, snapshot_pages(new), res.dump_id)) == set(snapshot_pages(new))
    monkeypatch.setattr(reader._Scanner, "probe_landings", lambda self, end: None)
    without = [[lay.status for lay in reader.scan(BytesSource(img)).layers] for _, _, img in cases]
    assert any(st != ["complete", "complete", "partial", "complete", "complete"] for st in without), without


def test_R_COM_2_a_failed_commit_is_written_again_with_the_same_sequence_number():
    snap = make_snapshot(3000, seed=33, zero_frac=0.1)
    size = 64 * MIB
    ref = _reference(snap, size)
    n_op = ref.marks[1][0]  # layer 1's mark: its commit write is the last write before it
    commit_op = [o for o in ref.ops[:n_op] if o.kind == "W"][-1]
    assert len(commit_op.data) == 512
    dev = MemDevice(size)
    dev.bad = [(commit_op.offset, commit_op.offset + 4096)]
    res = write_dump(snap, dev, producer=ClassProducer(snap), threads=1)
    assert res.stopped == "done" and dev.failed == [(commit_op.offset, 512)]
    assert res.layers[1].committed and not res.layers[1].lost_records  # nothing of the layer was lost
    sr = reader.scan(BytesSource(bytes(dev.image)))
    assert [lay.status for lay in sr.layers] == ["complete"] * 5
    commits = [r for r in sr._recs if r.h.rtype == 5 and r.h.layer == 1]
    assert len(commits) == 1 and commits[0].h.offset >= commit_op.offset + 256 * 1024
    assert set(check_recovery(sr, snapshot_pages(snap), res.dump_id)) == set(snapshot_pages(snap))


def test_file_device_eio_is_a_media_error(tmp_path, monkeypatch):
    """FileDevice maps EIO from pwrite to MediaError, other errnos to DeviceError.

    A fake ``os.pwrite`` (no real medium fails on demand here) stands in for the kernel's answer.
    """
    import errno

    from progdump import device as devmod
    from progdump.device import DeviceError, MediaError

    img = tmp_path / "d.img"
    with open(img, "wb") as f:
        f.truncate(1 * MIB)
    dev = FileDevice(str(img), direct=False)
    for code, cls in ((errno.EIO, MediaError), (errno.EBADF, DeviceError)):

        def fail(fd, data, off, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(devmod._os, "pwrite", fail)
        with pytest.raises(DeviceError) as ei:
            dev.write(8192, b"x" * 512)
        assert type(ei.value) is cls
        if cls is MediaError:
            assert (ei.value.offset, ei.value.length) == (8192, 512)
    monkeypatch.undo()
    dev.close()


def test_R_WR_7_a_commit_refused_past_every_retry_lands_after_a_later_layer():
    snap = make_snapshot(12000, seed=34, zero_frac=0.5)  # mostly compressible: writes of ~1 MiB
    size = 96 * MIB
    ref = _reference(snap, size)
    n_op = ref.marks[2][0]
    commit_op = [o for o in ref.ops[:n_op] if o.kind == "W"][-1]  # layer 2's COMMIT
    dev = MemDevice(size)
    dev.bad = [(commit_op.offset - 256 * 1024, commit_op.offset + 3 * MIB + 512 * 1024)]  # past the 3rd try's landing
    order: list[int] = []
    res = write_dump(
        snap,
        dev,
        producer=ClassProducer(snap),
        threads=1,
        progress=lambda ev: order.append(ev.layer.index) if ev.kind == "layer-durable" else None,
    )
    assert res.stopped == "done", res.error
    assert all(lay.committed for lay in res.layers)
    assert order.index(2) > order.index(3), order  # layer 2's commit landed after layer 3's
    sr = reader.scan(BytesSource(bytes(dev.image)))
    st = [lay.status for lay in sr.layers]
    assert st[2] == "partial" and sr.layers[2].holes, st  # its hole reported by the late commit
    assert all(st[i] == "complete" for i in (0, 1, 4)), st
    assert set(check_recovery(sr, snapshot_pages(snap), res.dump_id)) == set(snapshot_pages(snap))


# -- property: bad regions and crash states together (hypothesis) -------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    pages=st.integers(50, 900),
    zero_frac=st.floats(0, 0.6),
    plan=st.sampled_from(["progressive", "monolithic"]),
    bad_at=st.integers(8, 4000),  # in 512-byte sectors
    bad_len=st.integers(1, 3000),
    old=st.booleans(),
    crash_seed=st.integers(0, 2**32),
)
def test_property_bad_region_no_false_accept_no_committed_loss(
    seed, pages, zero_frac, plan, bad_at, bad_len, old, crash_seed
):
    """With a bad region anywhere and any crash state: no recovered page differs from the snapshot, no layer
    is complete without all its pages, and every layer committed without a hole before the cut is complete."""
    import random

    size = 8 * MIB
    snap = make_snapshot(pages, seed=seed, zero_frac=zero_frac, tag=b"N")
    base = None
    if old:
        osnap = make_snapshot(pages, seed=seed + 1, zero_frac=zero_frac, tag=b"O")
        odev = MemDevice(size)
        write_dump(osnap, odev, plan=plan, producer=ClassProducer(osnap), threads=1)
        base = bytes(odev.image)
    dev = MemDevice(size, base=base)
    dev.bad = [(bad_at * 512, (bad_at + bad_len) * 512)]
    res = write_dump(snap, dev, plan=plan, producer=ClassProducer(snap), threads=1)
    pages_map = snapshot_pages(snap)
    full = reader.scan(BytesSource(bytes(dev.image)))
    # Ground truth is the writer's own result: what it committed, and what it lost to the hole.
    if res.stopped == "done":
        assert full.dump_id == res.dump_id
        for lay, stt in zip(res.layers, full.layers, strict=True):
            if lay.committed and not lay.lost_records:
                assert stt.status == "complete", (lay.index, stt.reasons)
            elif lay.committed:  # committed with a hole (R-WR-7): the commit cannot verify
                assert stt.status == "partial" and stt.holes, (lay.index, stt.status)
            else:
                assert stt.status != "complete", lay.index
    if full.found and full.dump_id != res.dump_id:
        # the writer stopped before its dump reached the device: only the older dump shows, by its own id
        assert old and res.stopped != "done" and full.dump_id != res.dump_id
    else:
        check_recovery(full, pages_map, res.dump_id)
    holey = {lay.index for lay in res.layers if lay.lost_records}
    rng = random.Random(crash_seed)
    for cut, keep, tear, last_flush in crash_states(dev, rng, 3):
        sr = reader.scan(BytesSource(dev.state(cut, keep, tear)))
        if sr.found and sr.dump_id != res.dump_id:
            assert old, "a dump id that was never written"
            continue  # the older dump, by its own id: not mixed in
        check_recovery(sr, pages_map, res.dump_id)
        for opi, label in dev.marks:
            idx = int(label.split()[1])
            if opi - 1 <= last_flush and idx not in holey:
                assert sr.found and sr.layers[idx].status == "complete", (label, cut, [lay.status for lay in sr.layers])
