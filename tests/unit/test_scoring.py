"""Scoring on hand-made recoveries, including planted false accepts it must catch.

The recoveries here are written by hand (manifest, artifact files, a small
ELF64 vmcore), not by progdump's reader: the point is to test the scorer
independently of the reader it judges.
"""

from __future__ import annotations

import json
import struct

import pytest

from harness.scoring import ScoringError, expected_layers, score_recovery, vmcore_loads
from progdump.snapshot import CpuState, MemoryRange, Snapshot

NPAGES = 32


def _snap() -> Snapshot:
    buf = bytearray(NPAGES * 4096)
    for i in range(NPAGES):
        if i % 4:  # every 4th page is zero
            buf[i * 4096 : (i + 1) * 4096] = bytes([i]) * 4096
    return Snapshot(
        ranges=[MemoryRange(0x100000, len(buf), memoryview(buf))],
        cpus=[CpuState(0, {"rip": 0xFFFFFFFF81000000, "rsp": 0x1000})],
        console_tail=b"Kernel panic - not syncing: sysrq triggered crash\nMARKER-LOG-LINE\n",
        metadata={"os": "linux", "hostname": "h"},
    )


def _write_vmcore(path, snap: Snapshot, pfns: list[int], corrupt: int | None = None) -> None:
    """A minimal ELF64 core: one PT_LOAD per contiguous pfn run."""
    runs: list[list[int]] = []
    for p in sorted(pfns):
        if runs and runs[-1][1] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, p + 1])
    phoff = 64
    data_off = phoff + 56 * len(runs)
    hdr = bytearray(b"\x7fELF" + bytes([2, 1, 1]) + bytes(9))
    hdr += struct.pack("<HHIQQQIHHHHHH", 4, 62, 1, 0, phoff, 0, 0, 64, 56, len(runs), 64, 0, 0)
    phdrs = bytearray()
    body = bytearray()
    for a, b in runs:
        n = (b - a) * 4096
        phdrs += struct.pack("<IIQQQQQQ", 1, 4, data_off + len(body), 0, a * 4096, n, n, 4096)
        chunk = bytearray(snap.read_phys(a * 4096, n))
        if corrupt is not None and a <= corrupt < b:
            chunk[(corrupt - a) * 4096] ^= 0xFF
        body += chunk
    with open(path, "wb") as f:
        f.write(hdr + phdrs + body)


def _recovery(tmp_path, snap, exp, statuses, *, drop_pages=(), corrupt_page=None, corrupt_artifact=None):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    layers = []
    pfns: list[int] = []
    for e, st in zip(exp, statuses):
        layers.append({"index": e.index, "name": e.name, "status": st, "bytes": 100})
        if st == "missing":
            continue
        for name, data in e.artifacts.items():
            if name == corrupt_artifact:
                data = data[:-1] + bytes([data[-1] ^ 1]) if data else b"x"
            (out / name).write_bytes(data)
        pfns += [int(p) for p in e.pfns if int(p) not in drop_pages]
    (out / "manifest.json").write_text(json.dumps({"dump_id": "d1", "format_version": 1, "layers": layers}))
    _write_vmcore(out / "vmcore", snap, pfns, corrupt_page)
    return out


@pytest.fixture()
def case():
    snap = _snap()
    exp = expected_layers(snap, "progressive")
    return snap, exp


def test_expected_layers_deduplicate_pages(case):
    snap, exp = case
    assert [e.name for e in exp] == ["panic", "tasks", "kernel", "cache", "all"]
    allp = [int(p) for e in exp for p in e.pfns]
    assert len(allp) == len(set(allp)) == NPAGES
    assert exp[0].artifacts  # the generic producer's layer-0 artifacts


def test_perfect_recovery_scores_every_layer(case, tmp_path):
    snap, exp = case
    out = _recovery(tmp_path, snap, exp, ["complete"] * 5)
    s = score_recovery(
        out,
        snap,
        exp,
        markers={
            "kmsg": "MARKER-LOG-LINE",
            "comm": "nope-not-there",
            "anon_unit": "\t" * 16,
            "cache_unit": "not-in-memory-xyz",
        },
    )
    assert not s.false_accept, s.reasons
    assert s.layers_recovered == 5 and all(ls.verified for ls in s.layers)
    assert s.layers[4].pages_recovered == s.layers[4].expected_pages == NPAGES
    assert s.dump_id == "d1" and s.found
    assert s.markers == {"kmsg": True, "comm": False, "anon_unit": True, "cache_unit": False}


def test_partial_last_layer_is_honest_not_false(case, tmp_path):
    snap, exp = case
    dropped = {int(p) for p in exp[4].pfns[: NPAGES // 2] if int(p) % 4}
    out = _recovery(tmp_path, snap, exp, ["complete"] * 4 + ["partial"], drop_pages=dropped)
    s = score_recovery(out, snap, exp)
    assert not s.false_accept and s.layers_recovered == 4
    assert s.layers[4].status == "partial" and s.layers[4].pages_recovered == NPAGES - len(dropped)


def test_planted_stale_page_is_a_false_accept(case, tmp_path):
    """The case scoring exists for: a page from an older dump returned as this one's."""
    snap, exp = case
    victim = int(exp[4].pfns[5])
    out = _recovery(tmp_path, snap, exp, ["complete"] * 4 + ["partial"], corrupt_page=victim)
    s = score_recovery(out, snap, exp)
    assert s.false_accept
    assert any("differ from the snapshot" in r for r in s.reasons)
    assert s.layers[4].bad_pages == 1 and not s.layers[4].verified


def test_planted_wrong_artifact_is_a_false_accept(case, tmp_path):
    snap, exp = case
    name = sorted(exp[0].artifacts)[0]
    out = _recovery(tmp_path, snap, exp, ["complete"] + ["missing"] * 4, corrupt_artifact=name)
    s = score_recovery(out, snap, exp)
    assert s.false_accept and s.layers_recovered == 0
    assert name in s.layers[0].artifacts_bad


def test_complete_claim_with_missing_pages_is_a_false_accept(case, tmp_path):
    snap, exp = case
    victim = next(int(p) for p in exp[4].pfns if int(p) % 4)
    out = _recovery(tmp_path, snap, exp, ["complete"] * 5, drop_pages={victim})
    s = score_recovery(out, snap, exp)
    assert s.false_accept and any("claimed complete" in r for r in s.reasons)
    assert s.layers_recovered == 4


def test_nothing_found(case):
    snap, exp = case
    s = score_recovery(None, snap, exp)
    assert not s.found and not s.false_accept and s.layers_recovered == 0


def test_bad_vmcore_and_manifest_are_clear_errors(case, tmp_path):
    snap, exp = case
    (tmp_path / "v").write_bytes(b"garbage" * 20)
    with pytest.raises(ScoringError, match="not a little-endian ELF64"):
        vmcore_loads(str(tmp_path / "v"))
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_text("[1, 2")
    with pytest.raises(ScoringError, match="not JSON"):
        score_recovery(out, snap, exp)


def test_an_artifact_the_manifest_says_another_layer_made_is_not_compared_as_this_layers(case, tmp_path):
    """progressive-raw: with layer 1 lost, recovery renders panic.txt from layer 0's pages (manifest
    ``artifacts: {"panic.txt": 0}``); it is not layer 1's panic.txt and must not count as a wrong one.
    Claimed complete, layer 1 without its own file is still a false accept. (The generic producer's
    layer 0 has a panic.txt of its own, so the test's layer-1 file is ``decoded.txt``.)"""
    import dataclasses

    snap, exp = case
    exp = [dataclasses.replace(e, artifacts=dict(e.artifacts)) for e in exp]
    exp[1].artifacts["decoded.txt"] = b"layer 1's decoded panic text\n"
    out = _recovery(tmp_path, snap, exp, ["complete"] + ["missing"] * 4)
    (out / "decoded.txt").write_bytes(b"rendered at recovery from layer 0's raw pages\n")
    man = json.loads((out / "manifest.json").read_text())
    man["artifacts"] = {n: 0 for n in exp[0].artifacts} | {"decoded.txt": 0}
    (out / "manifest.json").write_text(json.dumps(man))
    s = score_recovery(out, snap, exp)
    assert not s.false_accept, s.reasons
    assert s.layers_recovered == 1 and "decoded.txt" in s.layers[1].artifacts_missing
    # the same file claimed as layer 1's (no origin, or origin 1) is compared, and is wrong
    man["artifacts"]["decoded.txt"] = 1
    (out / "manifest.json").write_text(json.dumps(man))
    assert score_recovery(out, snap, exp).false_accept
    man["layers"][1]["status"] = "complete"
    man["artifacts"]["decoded.txt"] = 0
    (out / "manifest.json").write_text(json.dumps(man))
    s = score_recovery(out, snap, exp)
    assert s.false_accept and any("artifacts missing" in r for r in s.reasons)
