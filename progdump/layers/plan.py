"""Layer plans as data.

A plan is an ordered list of :class:`LayerSpec`. Each layer is made of
*parts*; a part is either a producer's artifact set (``panic``, ``tasks``) or
a page set (``kernel``, ``cache``, ``all``). The writer commits layers in
order, so a plan is also a promise about what survives first.

``progressive`` follows DESIGN.md (panic, tasks, kernel, cache, all);
``progressive-raw`` is progressive with layer 0 as raw pages (``panic-raw``:
the printk ring, stacks, page tables; text rendered at recovery) and the
decoded panic text moved to layer 1 (issue 13). ``raw-kernel`` decodes nothing
while writing: raw layer 0, then the kernel pages, cache, the rest; recovery
renders the panic text from the pages (issue 13's "dump raw, render at recovery").
``monolithic`` is today's behaviour: one layer with everything, committed
only at the end. It is the baseline every figure is compared against.
``triage`` is the two-step compromise: everything an engineer reads first
(panic, log, every task's stack) in one layer, then all memory in one.
The harness treats every plan alike (tables, curves and replay are keyed by
plan and layer), so a new plan is one entry here.

``fileserver`` splits kernel memory by what it holds (a producer's
:class:`~progdump.layers.base.KernelMap`): ``kstruct`` is every kernel page
except the *bulk* slab caches (the data a file server caches in kernel
memory: ZFS's ARC), ``bulk`` is those caches' pages. Which caches are bulk
is data in the plan (:class:`BulkRule`): name patterns, and when no cache
matches them, any cache above a share of kernel memory. Without a kernel map
(another producer, or the map failed) ``kstruct`` is the whole ``kernel``
part and ``bulk`` is empty, with a note.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from progdump.layers.base import KernelKind, KernelMap, PageClass, PageClassMap

__all__ = [
    "LayerSpec",
    "BulkRule",
    "PLANS",
    "PART_PAGE_CLASSES",
    "KERNEL_SPLIT_PARTS",
    "get_plan",
    "ZFS_BULK_CACHES",
    "bulk_caches",
    "split_kernel",
]


@dataclass(frozen=True)
class BulkRule:
    """Which slab caches hold bulk data (the ``bulk`` part), not structures (``kstruct``).

    ``patterns`` are shell patterns (fnmatch, case-sensitive) on the cache
    name. When no cache with pages matches any of them, every cache holding
    more than ``min_share`` of the kernel's pages is bulk instead (the one
    giant cache of a workload the patterns do not know).
    """

    patterns: tuple[str, ...]
    min_share: float = 0.10

    def describe(self) -> str:
        pats = ", ".join(self.patterns) or "(none)"
        return f"bulk caches: {pats}; else any cache above {self.min_share:.0%} of kernel pages"


#: ZFS's data caches: the ARC's data and metadata record buffers (illumos and
#: OpenZFS kmem caches) and OpenZFS-on-Linux's scatter ABD chunks.
ZFS_BULK_CACHES = ("zio_data_buf_*", "zio_buf_*", "abd_chunk_cache")


@dataclass(frozen=True)
class LayerSpec:
    index: int
    name: str
    #: zstd level for this layer's records: small early layers can afford
    #: more; bulk memory layers use level 1 so the device, not the CPU, paces.
    zstd_level: int
    parts: tuple[str, ...]
    #: for the ``kstruct``/``bulk`` parts: which caches are bulk (None: the default ZFS rule)
    bulk: BulkRule | None = None


#: page classes each page part selects; ``all`` means every page not yet written.
PART_PAGE_CLASSES: dict[str, frozenset[PageClass]] = {
    "kernel": frozenset({PageClass.KERNEL, PageClass.UNKNOWN}),
    "cache": frozenset({PageClass.CACHE}),
    "all": frozenset(PageClass),
}

#: parts that split the KERNEL pages with a producer's kernel map
KERNEL_SPLIT_PARTS = ("kstruct", "bulk")
DEFAULT_BULK = BulkRule(ZFS_BULK_CACHES)

PLANS: dict[str, tuple[LayerSpec, ...]] = {
    "progressive": (
        LayerSpec(0, "panic", 3, ("panic",)),
        LayerSpec(1, "tasks", 3, ("tasks",)),
        LayerSpec(2, "kernel", 1, ("kernel",)),
        LayerSpec(3, "cache", 1, ("cache",)),
        LayerSpec(4, "all", 1, ("all",)),
    ),
    # issue 13: layer 0 is the raw pages the panic text is made of (durable in milliseconds, rendered
    # at recovery); the decoded panic.txt/dmesg.txt follow with the tasks in layer 1.
    "progressive-raw": (
        LayerSpec(0, "panic", 3, ("panic-raw",)),
        LayerSpec(1, "tasks", 3, ("panic", "tasks")),
        LayerSpec(2, "kernel", 1, ("kernel",)),
        LayerSpec(3, "cache", 1, ("cache",)),
        LayerSpec(4, "all", 1, ("all",)),
    ),
    # issue 13, "dump raw, render at recovery" carried one step further: nothing is decoded while
    # the machine waits. Layer 0 is raw (as in progressive-raw), then the kernel pages makedumpfile's
    # -d 31 keeps, cache, the rest. The decoded panic.txt/dmesg.txt are rendered by `progdump
    # recover` from the raw pages; tasks.txt is not written (the kernel layer opens in drgn/crash).
    "raw-kernel": (
        LayerSpec(0, "panic", 3, ("panic-raw",)),
        LayerSpec(1, "kernel", 1, ("kernel",)),
        LayerSpec(2, "cache", 1, ("cache",)),
        LayerSpec(3, "all", 1, ("all",)),
    ),
    "monolithic": (LayerSpec(0, "all", 1, ("panic", "tasks", "kernel", "cache", "all")),),
    "triage": (
        LayerSpec(0, "triage", 3, ("panic", "tasks")),
        LayerSpec(1, "memory", 1, ("kernel", "cache", "all")),
    ),
    "fileserver": (
        LayerSpec(0, "panic", 3, ("panic",)),
        LayerSpec(1, "tasks", 3, ("tasks",)),
        LayerSpec(2, "kstruct", 1, ("kstruct",), DEFAULT_BULK),
        LayerSpec(3, "cache", 1, ("cache",)),
        LayerSpec(4, "bulk", 1, ("bulk",), DEFAULT_BULK),
        LayerSpec(5, "all", 1, ("all",)),
    ),
}

#: byte value marking bulk pages in a copy of the class bytes (outside the PageClass range)
BULK_MARK = 0xB0


def bulk_caches(kmap: KernelMap, classes: PageClassMap, rule: BulkRule) -> tuple[set[int], str]:
    """Cache ids (1-based, as in ``kmap.cache_ids``) that are bulk under ``rule``, and why."""
    pages = kmap.cache_pages(classes)
    kernel = max(classes.classes.count(int(PageClass.KERNEL)), 1)
    named = {n for n in pages if n != "?" and any(fnmatch.fnmatchcase(n, p) for p in rule.patterns)}
    why = "matched " + ", ".join(rule.patterns)
    if not named:
        named = {n for n, c in pages.items() if n != "?" and c > rule.min_share * kernel}
        pats = ", ".join(rule.patterns) or "(no patterns)"
        why = f"no cache matched {pats}; caches above {rule.min_share:.0%} of {kernel} kernel pages"
    ids = {i + 1 for i, n in enumerate(kmap.caches) if n in named}
    listed = ", ".join(f"{n} ({pages[n]} pages)" for n in sorted(named, key=lambda n: -pages[n]))
    return ids, f"bulk caches ({why}): {listed or 'none'}"


def split_kernel(kmap: KernelMap, classes: PageClassMap, rule: BulkRule) -> tuple[PageClassMap, list[str]]:
    """A copy of ``classes`` whose bulk slab pages carry :data:`BULK_MARK`, and notes.

    ``kstruct`` then selects KERNEL and UNKNOWN from the copy (as ``kernel``
    does from the original), ``bulk`` selects BULK_MARK.
    """
    import numpy as np  # noqa: PLC0415 (a KernelMap exists only where numpy does)

    ids, why = bulk_caches(kmap, classes, rule)
    cls = np.frombuffer(bytes(classes.classes), dtype=np.uint8).copy()
    n = min(len(cls), len(kmap.kinds))
    kinds = np.frombuffer(bytes(kmap.kinds), dtype=np.uint8)[:n]
    cid = np.frombuffer(bytes(kmap.cache_ids), dtype="<u2")[:n]
    isbulk = np.zeros(max(len(kmap.caches) + 1, 1), dtype=bool)
    for i in ids:
        if 0 < i < len(isbulk):
            isbulk[i] = True
    sel = (cls[:n] == int(PageClass.KERNEL)) & (kinds == int(KernelKind.SLAB)) & isbulk[cid]
    cls[:n][sel] = BULK_MARK
    out = PageClassMap(classes.base_pfn, 0)
    out.classes = bytearray(cls.tobytes())
    counts = kmap.kind_counts(classes)
    kept = {k: v for k, v in counts.items() if v}
    notes = [
        why,
        f"{int(sel.sum())} bulk pages; kernel pages by kind: " + ", ".join(f"{k} {v}" for k, v in kept.items()),
    ]
    if kmap.vmalloc_owners:
        notes.append(
            "vmalloc pages by owner: " + ", ".join(f"{k} {v}" for k, v in list(kmap.vmalloc_owners.items())[:12])
        )
    return out, notes


def get_plan(name: str) -> tuple[LayerSpec, ...]:
    try:
        return PLANS[name]
    except KeyError:
        raise ValueError(f"unknown plan {name!r} (known: {', '.join(sorted(PLANS))})") from None
