"""The fileserver plan's kernel split (kstruct before bulk caches), on hand-made maps.

The producers here are fakes standing in for the Linux producer (the VM test
tests/vm/test_fileserver_layers.py checks the real one on a real panic);
every expected page set is written out by hand.
"""

from __future__ import annotations

import random

from progdump.layers import build_layers, get_plan
from progdump.layers.base import KernelKind, KernelMap, LayerContent, PageClass, PageClassMap, Producer
from progdump.layers.plan import BulkRule, bulk_caches
from progdump.snapshot import CpuState, MemoryRange, Snapshot

K, C, U, F, X = PageClass.KERNEL, PageClass.CACHE, PageClass.USER, PageClass.FREE, PageClass.UNKNOWN


def _snap(npages: int, phys_pfn: int = 0) -> Snapshot:
    buf = bytearray(npages * 4096)
    return Snapshot(
        ranges=[MemoryRange(phys_pfn * 4096, len(buf), memoryview(buf))],
        cpus=[CpuState(0, {"rip": 0})],
        notes=[],
        console_tail=b"",
        metadata={},
    )


def _kmap(base: int, slab_caches: list[int], names: list[str]) -> KernelMap:
    """slab_caches[i]: cache id of pfn base+i (0: not slab)."""
    kinds = bytearray(int(KernelKind.SLAB) if c else int(KernelKind.OTHER) for c in slab_caches)
    ids = b"".join(c.to_bytes(2, "little") for c in slab_caches)
    return KernelMap(base, kinds, bytearray(ids), names)


class FakeProducer(Producer):
    """Stands in for an OS producer: fixed classes and kernel map."""

    name = "fake"

    def __init__(self, snapshot: Snapshot, classes: list[PageClass], base: int, kmap: KernelMap | None) -> None:
        super().__init__(snapshot)
        self.pcm = PageClassMap(base, len(classes))
        for i, c in enumerate(classes):
            self.pcm.set_run(base + i, 1, c)
        self.kmap = kmap

    def panic(self) -> LayerContent:
        return LayerContent()

    def tasks(self) -> LayerContent:
        return LayerContent()

    def page_classes(self) -> PageClassMap:
        return self.pcm

    def kernel_map(self, classes: PageClassMap) -> KernelMap | None:
        return self.kmap


def pages(content: LayerContent) -> set[int]:
    return {p for f, n in content.page_runs() for p in range(f, f + n)}


def test_bulk_rule_patterns_then_big_caches() -> None:
    pcm = PageClassMap(0, 100, K)
    # cache 1 "big_cache": 60 pages, cache 2 "small_cache": 5 pages, the rest not slab
    km = _kmap(0, [1] * 60 + [2] * 5 + [0] * 35, ["big_cache", "small_cache"])
    got, why = bulk_caches(km, pcm, BulkRule(("zio_*",), 0.10))
    assert got == {1} and "no cache matched" in why and "big_cache (60 pages)" in why
    assert bulk_caches(km, pcm, BulkRule(("small_*",), 0.10))[0] == {2}
    assert bulk_caches(km, pcm, BulkRule((), 0.70))[0] == set()  # nothing above 70 %


def test_fileserver_layers_split_kernel_pages() -> None:
    # snapshot pfns 2..13; the map covers pfns 4..13 (2, 3: outside the map, UNKNOWN)
    snap = _snap(12, phys_pfn=2)
    classes = [K, K, K, K, C, U, F, K, X, K]  # pfns 4..13
    caches = [1, 1, 2, 0, 0, 0, 0, 3, 0, 1]  # 1: zio_data_buf_131072, 2: dnode_t, 3: abd_chunk_cache
    km = _kmap(4, caches, ["zio_data_buf_131072", "dnode_t", "abd_chunk_cache"])
    layers = {s.name: c for s, c in build_layers(snap, "fileserver", FakeProducer(snap, classes, 4, km))}
    assert [s.name for s in get_plan("fileserver")] == ["panic", "tasks", "kstruct", "cache", "bulk", "all"]
    assert pages(layers["kstruct"]) == {2, 3, 6, 7, 12}
    assert pages(layers["bulk"]) == {4, 5, 11, 13}
    assert pages(layers["cache"]) == {8}
    assert pages(layers["all"]) == set(range(2, 14))
    assert any(n.startswith("bulk caches (matched") and "dnode_t" not in n for n in layers["kstruct"].notes)
    # the progressive plan's kernel layer is exactly kstruct + bulk
    prog = {s.name: c for s, c in build_layers(snap, "progressive", FakeProducer(snap, classes, 4, km))}
    assert pages(prog["kernel"]) == {2, 3, 4, 5, 6, 7, 11, 12, 13}


def test_without_kernel_map_kstruct_is_the_kernel_part() -> None:
    snap = _snap(6)
    classes = [K, C, K, U, X, F]
    layers = {s.name: c for s, c in build_layers(snap, "fileserver", FakeProducer(snap, classes, 0, None))}
    assert pages(layers["kstruct"]) == {0, 2, 4} and pages(layers["bulk"]) == set()
    assert any("no kernel map" in n for n in layers["kstruct"].notes)


def test_runs_of_values_agrees_with_runs() -> None:
    """The generic selector against the original class selector on random maps (peer code, not a copy)."""
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 64)
        base = rng.randint(0, 8)
        snap = _snap(rng.randint(1, 80), phys_pfn=rng.randint(0, 8))
        pcm = PageClassMap(base, 0)
        pcm.classes = bytearray(rng.choice([0, 1, 2, 3, 5]) for _ in range(n))
        for wanted in ({K, X}, {C}, {F, U}):
            a = {p for f, k in pcm.runs(frozenset(wanted), snap) for p in range(f, f + k)}
            b = {
                p
                for f, k in pcm.runs_of_values(frozenset(int(w) for w in wanted), snap, X in wanted)
                for p in range(f, f + k)
            }
            assert a == b
