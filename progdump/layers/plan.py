"""Layer plans as data.

A plan is an ordered list of :class:`LayerSpec`. Each layer is made of
*parts*; a part is either a producer's artifact set (``panic``, ``tasks``) or
a page set (``kernel``, ``cache``, ``all``). The writer commits layers in
order, so a plan is also a promise about what survives first.

``progressive`` follows DESIGN.md (panic, tasks, kernel, cache, all);
``progressive-raw`` is progressive with layer 0 as raw pages (``panic-raw``:
the printk ring, stacks, page tables; text rendered at recovery) and the
decoded panic text moved to layer 1 (issue 13).
``monolithic`` is today's behaviour: one layer with everything, committed
only at the end. It is the baseline every figure is compared against.
``triage`` is the two-step compromise: everything an engineer reads first
(panic, log, every task's stack) in one layer, then all memory in one.
The harness treats every plan alike (tables, curves and replay are keyed by
plan and layer), so a new plan is one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

from progdump.layers.base import PageClass

__all__ = ["LayerSpec", "PLANS", "PART_PAGE_CLASSES", "get_plan"]


@dataclass(frozen=True)
class LayerSpec:
    index: int
    name: str
    #: zstd level for this layer's records: small early layers can afford
    #: more; bulk memory layers use level 1 so the device, not the CPU, paces.
    zstd_level: int
    parts: tuple[str, ...]


#: page classes each page part selects; ``all`` means every page not yet written.
PART_PAGE_CLASSES: dict[str, frozenset[PageClass]] = {
    "kernel": frozenset({PageClass.KERNEL, PageClass.UNKNOWN}),
    "cache": frozenset({PageClass.CACHE}),
    "all": frozenset(PageClass),
}

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
    "monolithic": (LayerSpec(0, "all", 1, ("panic", "tasks", "kernel", "cache", "all")),),
    "triage": (
        LayerSpec(0, "triage", 3, ("panic", "tasks")),
        LayerSpec(1, "memory", 1, ("kernel", "cache", "all")),
    ),
}


def get_plan(name: str) -> tuple[LayerSpec, ...]:
    try:
        return PLANS[name]
    except KeyError:
        raise ValueError(f"unknown plan {name!r} (known: {', '.join(sorted(PLANS))})") from None
