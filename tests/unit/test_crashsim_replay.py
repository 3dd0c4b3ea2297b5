"""Replay judging and narrowing, driven by toy readers of a toy dump format.

These toy readers are fakes for this unit test only: they exercise the code
*around* the reader (state evaluation, committed-layer and false-accept
detection, narrowing). progdump's real reader is replayed in the scenario
runs and in tests/vm.
"""

from __future__ import annotations

import struct

import xxhash

from harness.crashsim.overlay import BaseImage
from harness.crashsim.replay import Outcome, ReplayContext, evaluate, failing, mark_layer, narrow
from harness.crashsim.states import enumerate_states
from harness.crashsim.trace import read_trace
from progdump.devmodel import DeviceModel, ModelledDevice
from tests.unit.test_devmodel import FakeClock, MemDevice

SIZE = 1 << 20
NLAYERS = 3
DATA0 = 16 * 512


def _toy_dump(dev, dump_id: bytes, fill: int) -> None:
    """Header at sector 0, commit slots at sectors 1..8, layer data from sector 16."""
    dev.write(0, (b"TOYDUMP!" + dump_id).ljust(512, b"\0"))
    dev.flush()
    off = DATA0
    for k in range(NLAYERS):
        start = off
        for j in range(4):
            dev.write(off, bytes([fill + k * 16 + j]) * 2048)
            off += 2048
        digest = xxhash.xxh64_intdigest(bytes(dev_view(dev, start, off - start)))
        dev.write(512 * (1 + k), (b"C" + dump_id + struct.pack("<QQQ", start, off - start, digest)).ljust(512, b"\0"))
        dev.flush()
        dev.mark(f"layer {k}")


def dev_view(dev, off, n):
    # the toy writer knows what it wrote: recompute from its own pattern
    return b"".join(bytes([dev._toy_pattern[o]]) * 2048 for o in range(off, off + n, 2048))


class ToyWriterDevice:
    """Wraps a device and remembers each 2 KiB block's fill byte (so the writer can checksum)."""

    def __init__(self, dev):
        self.dev = dev
        dev._toy_pattern = {}

    def __getattr__(self, k):
        return getattr(self.dev, k)

    def write(self, off, data):
        if len(data) == 2048:
            self.dev._toy_pattern[off] = data[0]
        self.dev.write(off, data)


def toy_reader(check: bool = True, lose: int | None = None):
    def read(src) -> Outcome:
        h = src.pread(0, 512)
        if h[:8] != b"TOYDUMP!":
            return Outcome(False, None, {})
        did = h[8:16]
        st = {}
        for k in range(NLAYERS):
            c = src.pread(512 * (1 + k), 512)
            if c[:1] != b"C" or c[1:9] != did:
                st[k] = "missing"
                continue
            start, n, digest = struct.unpack_from("<QQQ", c, 9)
            ok = xxhash.xxh64_intdigest(src.pread(start, n)) == digest
            st[k] = "complete" if (ok or not check) else "partial"
            if lose == k:
                st[k] = "missing"
        return Outcome(True, did.hex(), st)

    return read


def _setup(tmp_path):
    # the older dump, complete, on the base image
    old = MemDevice(SIZE)
    _toy_dump(ToyWriterDevice(old), b"OLDDUMP1", 0x80)
    (tmp_path / "base").write_bytes(bytes(old.buf))
    clk = FakeClock()
    inner = MemDevice(SIZE)
    inner.buf[:] = old.buf
    dev = ModelledDevice(
        inner, DeviceModel("t", 1e6, 1e-4, 0, 2e-3, 8192, 512), str(tmp_path / "tr"), now=clk.now, sleep=clk.sleep
    )
    _toy_dump(ToyWriterDevice(dev), b"NEWDUMP2", 0x10)
    dev.close()
    return read_trace(str(tmp_path / "tr")), BaseImage(str(tmp_path / "base"), SIZE)


def test_mark_labels():
    assert mark_layer("layer 3 cache") == 3 and mark_layer("commit:0") == 0 and mark_layer("x") is None


def test_correct_reader_has_no_failures_and_recovers_more_over_time(tmp_path):
    tr, bi = _setup(tmp_path)
    ctx = ReplayContext(tr, bi, ["a", "b", "c"], reader=toy_reader())
    ctx.prepare()
    assert ctx.dump_id == b"NEWDUMP2".hex() and b"OLDDUMP1".hex() in ctx.older_ids
    results = [evaluate(ctx, st) for _, st in enumerate_states(tr, 300, seed=1)]
    assert not any(failing(r) for r in results)
    assert any(r.older_dump_returned for r in results)  # before the new header: the older dump
    assert {r.layers_recovered for r in results} == {0, 1, 2, 3}
    assert any(r.committed == 3 and r.layers_recovered == 3 for r in results)


def test_reader_trusting_commits_is_caught_and_narrowed_to_a_data_write(tmp_path):
    tr, bi = _setup(tmp_path)
    ctx = ReplayContext(tr, bi, ["a", "b", "c"], reader=toy_reader(check=False))
    ctx.prepare()
    bad = [(st, r) for _, st in enumerate_states(tr, 400, seed=2) if (r := evaluate(ctx, st)).false_accept]
    assert bad, "a reader that skips checksums must produce false accepts in some crash state"
    st, r = bad[0]
    assert r.suspect and any("not as written" in x for x in r.reasons)
    n = narrow(ctx, st)
    assert n["culprit"] is not None and n["failure"]
    # the write that breaks it: a commit record that persisted without its data (a slot
    # sector), and the layer it belongs to is named
    w = tr.by_seq[n["culprit"]]
    assert 512 <= w.offset < 512 * (1 + NLAYERS) and n["layer"] == (w.offset // 512) - 1


def test_reader_losing_a_committed_layer_is_caught(tmp_path):
    tr, bi = _setup(tmp_path)
    ctx = ReplayContext(tr, bi, ["a", "b", "c"], reader=toy_reader(lose=1))
    ctx.prepare()
    res = [evaluate(ctx, st) for _, st in enumerate_states(tr, 200, seed=3)]
    lost = [r for r in res if r.committed_lost]
    assert lost and all(r.committed >= 2 for r in lost)
    n = narrow(ctx, lost[0].state)
    assert n["culprit"] is None and "flushed prefix alone fails" in n["note"]


def test_a_verifier_clears_or_confirms_suspects(tmp_path):
    tr, bi = _setup(tmp_path)
    calls = []

    def verify(ov):
        calls.append(1)
        return False, []

    ctx = ReplayContext(tr, bi, ["a", "b", "c"], reader=toy_reader(check=False), verify=verify)
    ctx.prepare()
    res = [evaluate(ctx, st) for _, st in enumerate_states(tr, 300, seed=2)]
    sus = [r for r in res if r.suspect]
    assert sus and calls and all(not r.false_accept and r.verified == "full" for r in sus)


def test_layers_the_plan_does_not_have_are_a_false_accept(tmp_path):
    """The bug a real run found: an older dump's later layers reported under the new dump's id."""
    tr, bi = _setup(tmp_path)
    good = toy_reader()

    def mixing(src):
        o = good(src)
        if o.found:
            o.statuses[NLAYERS] = "complete"  # a layer index beyond this dump's plan
        return o

    ctx = ReplayContext(tr, bi, ["a", "b", "c"], reader=mixing)
    ctx.prepare()
    res = [evaluate(ctx, st) for _, st in enumerate_states(tr, 50, seed=4)]
    fa = [r for r in res if r.false_accept]
    assert fa and all("does not have" in " ".join(r.reasons) for r in fa)


def test_each_distinct_outcome_is_fully_verified_once(tmp_path):
    tr, bi = _setup(tmp_path)
    seen = []
    ctx = ReplayContext(
        tr, bi, ["a", "b", "c"], reader=toy_reader(), verify=lambda ov: (seen.append(1), (False, []))[1]
    )
    ctx.prepare()
    res = [evaluate(ctx, st) for _, st in enumerate_states(tr, 200, seed=5)]
    outcomes = {tuple(r.statuses) for r in res if not r.older_dump_returned}
    assert len(seen) >= len(outcomes) and sum(r.verified == "full" for r in res) == len(seen)
    assert len(seen) < len(res)
    assert not any(r.verified == "full" for r in res if r.older_dump_returned)  # the older dump is not this snapshot
