"""End to end through the seam with the crash-state replayer: real modelled-device trace, every state judged.

The writer dumps through ``progdump.devmodel.ModelledDevice`` (volatile cache,
trace) over a device holding an older dump; ``harness.crashsim`` rebuilds
crash states from the trace (prefix, random subsets of unflushed writes,
torn sectors) and judges :func:`progdump.reader.scan` on each: no false
accept, no committed layer lost.
"""

from __future__ import annotations

import shutil

import pytest
from dumpkit import ClassProducer, make_snapshot

from progdump.device import FileDevice
from progdump.writer import write_dump

crashsim = pytest.importorskip(
    "harness.crashsim.replay", reason="harness.crashsim (crash-state replayer) not importable"
)


@pytest.mark.parametrize("model", ["nvme", "hdd"])
def test_replayed_crash_states_no_false_accept_no_committed_loss(tmp_path, model):
    from harness.crashsim.overlay import BaseImage
    from harness.crashsim.replay import ReplayContext, evaluate
    from harness.crashsim.states import enumerate_states
    from harness.crashsim.trace import read_trace
    from progdump.devmodel import ModelledDevice, load_models

    base = tmp_path / "base.img"
    with open(base, "wb") as f:
        f.truncate(4 << 20)
    old = make_snapshot(200, seed=51, tag=b"OLD")
    with FileDevice(str(base)) as d:
        write_dump(old, d, producer=ClassProducer(old))
    dev = tmp_path / "dev.img"
    shutil.copyfile(base, dev)
    snap = make_snapshot(200, seed=52, tag=b"NEW")
    trace = tmp_path / "t.trace"
    md = ModelledDevice(FileDevice(str(dev)), load_models()[model], str(trace))
    try:
        res = write_dump(snap, md, producer=ClassProducer(snap))
    finally:
        md.close()
    assert res.stopped == "done"
    tr = read_trace(str(trace))
    with BaseImage(str(base), 4 << 20) as bi:
        ctx = ReplayContext(tr, bi, [lay.name for lay in res.layers])
        ctx.prepare()
        assert ctx.dump_id == res.dump_id
        bad = []
        n = 0
        for _, st in enumerate_states(tr, 300, 1):
            r = evaluate(ctx, st)
            n += 1
            if r.false_accept or r.committed_lost:
                bad.append((st.kind, st.t, r.reasons[:2]))
        assert n >= 50 and not bad, bad[:5]
