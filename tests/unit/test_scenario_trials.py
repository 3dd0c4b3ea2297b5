"""Pure helpers of the real-trial runner: durable times, holes, image restore, argv."""

from __future__ import annotations

import os

from harness.crashsim.trace import read_trace
from harness.trial import durable_times, failed_offsets, restore_image, writer_argv
from progdump.device import DeviceError
from progdump.devmodel import DeviceModel, FaultRegion, ModelledDevice
from tests.unit.test_devmodel import FakeClock, MemDevice


def _trace(tmp_path, faults=()):
    clk = FakeClock()
    dev = ModelledDevice(
        MemDevice(1 << 20),
        DeviceModel("t", 1e6, 1e-4, 0, 5e-3, 1 << 16, 512, faults=tuple(faults)),
        str(tmp_path / "tr"),
        now=clk.now,
        sleep=clk.sleep,
    )
    off = 4096
    for k in range(3):
        for _ in range(4):
            try:
                dev.write(off, b"x" * 4096)
            except DeviceError:
                pass  # the writer carries on past a bad region
            off += 4096
        dev.write(512 * (1 + k), b"c" * 512)
        dev.flush()
        dev.mark(f"layer {k}")
    dev.close()
    return read_trace(str(tmp_path / "tr"))


def test_durable_times_are_the_flush_completions_after_each_commit(tmp_path):
    tr = _trace(tmp_path)
    d = durable_times(tr, ["a", "b", "c"])
    assert list(d) == ["a", "b", "c"]
    assert [round(v, 9) for v in d.values()] == [round(f.t_complete, 9) for f in tr.flushes]
    assert d["a"] < d["b"] < d["c"]
    # a one-layer plan's layer is keyed by its own name: no plan is special
    assert list(durable_times(tr, ["all"])) == ["all"]


def test_failed_offsets_are_the_traced_failed_writes(tmp_path):
    # region at 0.02 of 1 MiB = sector 40 (20 KiB): inside layer 1's writes (20..36 KiB)
    tr = _trace(tmp_path, faults=[FaultRegion(0.02, 4096)])
    assert tr.failed_writes and failed_offsets(tr) == {w.offset for w in tr.failed_writes}
    assert all(20 * 1024 <= o < 36 * 1024 for o in failed_offsets(tr))
    (tmp_path / "clean").mkdir()
    assert failed_offsets(_trace(tmp_path / "clean")) == set()


def test_restore_image_writes_only_what_differs(tmp_path):
    base = tmp_path / "b"
    dump = tmp_path / "d"
    data = os.urandom(3 << 20)
    base.write_bytes(data)
    changed = bytearray(data)
    changed[5 << 19] ^= 1
    dump.write_bytes(bytes(changed) + b"extra")
    n = restore_image(str(base), str(dump), chunk=1 << 20)
    assert n == 1 << 20 and dump.read_bytes() == data
    assert restore_image(str(base), str(dump)) == 0


def test_writer_argv_is_the_user_command():
    a = writer_argv("s.elf", "d.img", "progressive", "hdd", "t.trace")
    assert a[1:] == [
        "-m",
        "progdump",
        "write",
        "s.elf",
        "d.img",
        "--plan",
        "progressive",
        "--device-model",
        "hdd",
        "--trace",
        "t.trace",
    ]


def test_agreement_compares_real_statuses_with_the_replayed_model_state(tmp_path):
    from harness.crashsim.overlay import BaseImage
    from harness.trial import agreement

    tr = _trace(tmp_path)  # not a progdump dump: the reader finds nothing, real or replayed
    with BaseImage(None, 1 << 20) as bi:
        assert agreement(["missing"] * 3, tr, bi, ["a", "b", "c"], None, set())[0] == "agree"
        verdict, why = agreement(["complete", "missing", "missing"], tr, bi, ["a", "b", "c"], None, set())
    assert verdict == "disagree" and "real complete/missing/missing" in why


def test_open_after_event_is_the_realtime_gap_and_refuses_impossible_orders(tmp_path):
    from harness.trial import open_after_event_s

    tr = _trace(tmp_path)
    opened = int(tr.header["open_realtime_ns"])
    assert open_after_event_s(tr, opened - 1_500_000_000) == 1.5
    assert open_after_event_s(tr, opened + 1) is None  # the event after the open: a clock step, no figure
    assert open_after_event_s(tr, None) is None
    assert open_after_event_s(tr, "junk") is None
