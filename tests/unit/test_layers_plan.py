"""Plans, generic producer and producer selection (no OS knowledge needed)."""

from __future__ import annotations

import pytest

from progdump.layers import build_layers, get_plan, select_producer
from progdump.layers.base import Artifact, LayerContent, PageClass, PageClassMap, Producer
from progdump.layers.generic import GenericProducer, decode_notes, encode_notes, find_panic_message
from progdump.snapshot import CpuState, MemoryRange, Note, Snapshot


def _snap(npages: int = 16, phys: int = 0, vmcoreinfo: bytes | None = None) -> Snapshot:
    buf = bytearray(npages * 4096)
    notes = [Note("VMCOREINFO", 0, vmcoreinfo)] if vmcoreinfo is not None else []
    return Snapshot(
        ranges=[MemoryRange(phys, len(buf), memoryview(buf))],
        cpus=[CpuState(0, {"rip": 0xFFFFFFFF81000000, "rsp": 0x1000, "cr3": 0x2000})],
        notes=notes,
        console_tail=b"boot\nKernel panic - not syncing: sysrq triggered crash\nmore\n",
        metadata={"os": "linux", "hostname": "h"},
    )


def test_plans_progressive_order_and_monolithic_single_layer():
    names = [s.name for s in get_plan("progressive")]
    assert names == ["panic", "tasks", "kernel", "cache", "all"]
    mono = get_plan("monolithic")
    assert len(mono) == 1 and set(mono[0].parts) == {"panic", "tasks", "kernel", "cache", "all"}
    with pytest.raises(ValueError, match="unknown plan"):
        get_plan("nope")


def test_generic_layers_put_all_memory_last_and_core_artifacts_first():
    s = _snap()
    layers = build_layers(s, "progressive")
    first = {a.name for a in layers[0][1].artifacts}
    assert {"registers.json", "console.txt", "metadata.json", "elf-notes.bin", "panic.txt"} <= first
    assert b"sysrq triggered crash" in next(a.data for a in layers[0][1].artifacts if a.name == "panic.txt")
    assert [list(c.page_runs()) for _, c in layers] == [[], [], [], [], [(0, 16)]]
    assert any("no page classification" in n for n in layers[2][1].notes)


def test_notes_roundtrip_and_truncated_input_does_not_raise():
    notes = [Note("VMCOREINFO", 0, b"OSRELEASE=6.1\n"), Note("CORE", 1, b"x" * 7)]
    raw = encode_notes(notes)
    assert decode_notes(raw) == notes
    for cut in range(len(raw)):
        decode_notes(raw[:cut])  # never raises


def test_find_panic_message_takes_last_known_form():
    assert find_panic_message(b"panic[cpu0]/thread=fffffe0: BAD TRAP\n") == "BAD TRAP"
    assert find_panic_message(b"nothing here") is None


class _Classifying(Producer):
    name = "fake"  # a fake producer, for testing the plan around it

    def panic(self):
        return LayerContent([Artifact("panic.txt", b"fake")])

    def tasks(self):
        raise RuntimeError("boom")

    def page_classes(self):
        m = PageClassMap(0, 16, PageClass.USER)
        m.set_run(2, 3, PageClass.KERNEL)
        m.set_run(8, 2, PageClass.CACHE)
        return m


def test_page_class_parts_and_failure_fallback():
    s = _snap()
    layers = build_layers(s, "progressive", _Classifying(s))
    runs = [list(c.page_runs()) for _, c in layers]
    assert runs[2] == [(2, 3)] and runs[3] == [(8, 2)] and runs[4] == [(0, 16)]
    assert any("fake producer failed in tasks()" in n for n in layers[1][1].notes)


def test_raw_kernel_plan_decodes_nothing_and_puts_kernel_pages_second():
    """``raw-kernel`` (issue 13): no panic/tasks decoding in any layer; kernel pages in layer 1."""
    specs = get_plan("raw-kernel")
    assert [s.name for s in specs] == ["panic", "kernel", "cache", "all"]
    assert not {"panic", "tasks"} & {p for s in specs for p in s.parts}
    s = _snap()
    p = _Classifying(s)
    layers = build_layers(s, "raw-kernel", p)
    runs = [list(c.page_runs()) for _, c in layers]
    assert runs[1] == [(2, 3)] and runs[2] == [(8, 2)] and runs[3] == [(0, 16)]
    names = {a.name for _, c in layers for a in c.artifacts}
    assert "tasks.txt" not in names and "panic.txt" in names  # generic layer 0: no VMCOREINFO here


def test_select_producer_falls_back_with_reason():
    p = select_producer(_snap())
    assert isinstance(p, GenericProducer) and any("VMCOREINFO" in d for d in p.degraded)
    p = select_producer(_snap(vmcoreinfo=b"garbage"))
    # whatever the linux producer's state, a garbage VMCOREINFO must not yield a crash
    assert p.name in ("generic", "linux")


def test_preload_producers_imports_the_linux_producer():
    import sys

    from progdump.layers import preload_producers

    assert preload_producers() == []
    assert "progdump.layers.linux.tasks" in sys.modules


def test_a_registered_producer_is_chosen_by_what_the_snapshot_carries():
    # a test-only producer: it proves the registry's seam, not any OS decoding
    from progdump.layers import ProducerEntry, register_producer
    from progdump.layers.generic import GenericProducer as _Base
    from progdump.layers.registry import unregister_producer

    class _Tagged(_Base):
        name = "unit-tagged"

    register_producer(
        ProducerEntry(
            name="unit-tagged",
            factory=_Tagged,
            priority=1,
            accepts=lambda s: None if s.metadata.get("os") == "unit-os" else "not unit-os",
        )
    )
    try:
        snap = _snap()
        snap.metadata["os"] = "unit-os"
        assert select_producer(snap).name == "unit-tagged"
        snap.metadata["os"] = "other"
        p = select_producer(snap)
        assert p.name == "generic" and any(d == "unit-tagged: not unit-os" for d in p.degraded)
    finally:
        unregister_producer("unit-tagged")


def test_lazy_producer_takes_raw_page_classes_without_selecting_the_producer():
    """LazyProducer.page_classes uses a registry entry's raw classifier; the producer stays unselected.

    A test-only producer entry (fake classifier and factory): it proves the seam, not Linux decoding.
    """
    from progdump.layers import LazyProducer, ProducerEntry, register_producer
    from progdump.layers.registry import unregister_producer

    made = []

    def factory(s):
        made.append(1)
        return _Classifying(s)

    def raw(s):
        m = PageClassMap(0, 16, PageClass.USER)
        m.set_run(5, 2, PageClass.KERNEL)
        return m, ["page classes from the fake raw path", "1 page odd"]

    def failing(s):
        raise ValueError("no mem_section here")

    for rawfn, expect_made, expect_kernel in ((raw, [], [(5, 2)]), (failing, [1], [(2, 3)])):
        made.clear()
        register_producer(
            ProducerEntry(name="unit-raw", factory=factory, priority=1, accepts=lambda s: None, raw_page_classes=rawfn)
        )
        try:
            s = _snap()
            lp = LazyProducer(s)
            layers = build_layers(s, "raw-kernel", lp)  # type: ignore[arg-type]
            assert list(layers[1][1].page_runs()) == expect_kernel
            assert made == expect_made
            notes = " ".join(n for _, c in layers for n in c.notes)
            if rawfn is raw:
                assert "1 page odd" in notes and "fake raw path" not in notes
            else:
                assert "unit-raw raw page classes failed: ValueError: no mem_section here" in notes
        finally:
            unregister_producer("unit-raw")


def test_class_runs_are_the_same_across_window_boundaries(monkeypatch):
    """PageClassMap.runs scans in windows; runs crossing a window's end come out whole.

    Expected runs from a plain per-page loop over the class bytes (independent of the regex code).
    """
    import random

    from progdump.layers import base

    rng = random.Random(13)
    n = 1000
    s = _snap(npages=n)
    m = PageClassMap(0, n, PageClass.USER)
    for _ in range(60):
        m.set_run(rng.randrange(n), rng.randrange(1, 40), rng.choice([PageClass.KERNEL, PageClass.CACHE]))
    wanted = frozenset({PageClass.KERNEL})
    expected, i = [], 0
    while i < n:
        if m.classes[i] == int(PageClass.KERNEL):
            j = i
            while j < n and m.classes[j] == int(PageClass.KERNEL):
                j += 1
            expected.append((i, j - i))
            i = j
        else:
            i += 1
    for window in (1, 7, 64, 1 << 20):
        monkeypatch.setattr(base, "RUN_WINDOW", window)
        assert list(m.runs(wanted, s)) == expected, window
        assert list(m.runs_of_values(frozenset({int(PageClass.KERNEL)}), s, False)) == expected, window
