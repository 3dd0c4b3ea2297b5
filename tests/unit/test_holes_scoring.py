"""Scoring of layers with a write error (R-WR-7): excused only with the hole reported; expect_holes checked."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dumpkit import BytesSource, ClassProducer, MemDevice, make_snapshot  # noqa: E402

from harness.crashsim.replay import hole_excused, read_outcome  # noqa: E402
from harness.scenario import Scenario, holes_problem  # noqa: E402
from progdump.writer import write_dump  # noqa: E402

MIB = 1 << 20


def test_partial_layer_is_excused_only_with_a_failed_write_and_a_reported_hole():
    failed = {0x2000, 0x180000}  # offsets of the trace's FAILED writes
    assert hole_excused(2, "partial", failed, {2: [0x180000]})
    assert not hole_excused(2, "partial", failed, {})  # silent partial: lost
    assert not hole_excused(2, "partial", failed, {2: [0x180000, 0x300000]})  # a hole the trace never had
    assert not hole_excused(2, "missing", failed, {2: [0x180000]})  # a hole does not excuse a missing layer
    assert not hole_excused(1, "partial", failed, {2: [0x180000]})  # a hole in layer 2 does not excuse layer 1


def test_outcome_carries_the_reported_holes():
    snap = make_snapshot(3000, seed=41, zero_frac=0.1)
    dev = MemDevice(64 * MIB)
    dev.bad = [(1 * MIB, 1 * MIB + 256 * 1024)]
    res = write_dump(snap, dev, producer=ClassProducer(snap), threads=1)
    holey = [lay.index for lay in res.layers if lay.lost_records]
    assert holey
    out = read_outcome(BytesSource(bytes(dev.image)))
    assert out.found and sorted(out.holes) == holey
    assert {o for offs in out.holes.values() for o in offs} <= {off for off, _ in dev.failed}
    assert all(out.statuses[k] == "partial" for k in holey)


def _sc(expect: bool) -> Scenario:
    return Scenario(
        "x", "d", "linux", 512, "sysrq", ["nvme-failing"], ["progressive"], 1, False, [], 0, 0, expect_holes=expect
    )


def test_expect_holes_fails_a_run_without_a_reported_hole():
    none = {"holes": {"nvme-failing/progressive": {"failed_writes": 0, "reported": {}}}}
    silent = {"holes": {"nvme-failing/progressive": {"failed_writes": 3, "reported": {}}}}
    good = {"holes": {"nvme-failing/progressive": {"failed_writes": 3, "reported": {"2": 1}}}}
    assert "no write failed" in holes_problem(_sc(True), none)
    assert "no recovery reported" in holes_problem(_sc(True), silent)
    assert holes_problem(_sc(True), good) == ""
    assert holes_problem(_sc(False), none) == ""
