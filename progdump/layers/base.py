"""The seam between OS knowledge and the writer: producers and page classes.

A *producer* looks at a :class:`~progdump.snapshot.Snapshot` and says what
goes in each layer: named artifacts (``panic.txt``, ``registers.json``,
``tasks.txt``, ...) and which page frames. The writer knows nothing of any OS;
a producer knows nothing of the on-disk format.

Producers must never raise on a strange snapshot: an OS producer that cannot
make sense of something records a reason in :attr:`Producer.degraded` and
returns less (the generic producer is always the floor). Every producer's
output must be a pure function of the snapshot.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

from progdump.format import ARTIFACT_NAME_RE  # the format's rule (R-TYP-2), re-exported
from progdump.snapshot import Snapshot

__all__ = [
    "PageClass",
    "KernelKind",
    "KernelMap",
    "Artifact",
    "LayerContent",
    "PageClassMap",
    "Producer",
    "ARTIFACT_NAME_RE",
]

# Artifact names become file names on recovery: the reader re-checks this.


class PageClass(IntEnum):
    """What a page frame holds, in makedumpfile's terms (``-d`` bits)."""

    KERNEL = 0  # kernel data, page tables, slab, stacks: kept at -d 31
    CACHE = 1  # page cache / ZFS ARC (makedumpfile -d 2|4)
    USER = 2  # anonymous user memory (-d 8)
    FREE = 3  # free pages in the buddy allocator (-d 16)
    ZERO = 4  # known all-zero (-d 1); the writer also detects zeros itself
    UNKNOWN = 5  # not classified (treated as KERNEL by the plan: keep when unsure)


class KernelKind(IntEnum):
    """What a KERNEL page holds: a second byte per pfn, finer than :class:`PageClass`.

    Only meaningful where the page's class is KERNEL; producers that cannot
    tell leave OTHER. Slab pages carry their cache too (:class:`KernelMap`).
    """

    OTHER = 0  # kernel memory of no known kind (page allocator users, memblock, ...)
    SLAB = 1  # a slab page (its kmem cache in KernelMap.cache_ids)
    PAGE_TABLE = 2  # page-table pages
    STACK = 3  # a task's kernel stack
    VMALLOC = 4  # a vmalloc area's page (owner counts in KernelMap.vmalloc_owners)
    MODULE = 5  # module text and data
    IMAGE = 6  # the kernel image (text, data, bss)
    MEM_MAP = 7  # the struct page array itself
    PERCPU = 8  # per-CPU areas


@dataclass
class KernelMap:
    """Kernel pages by what they hold: a kind per pfn and, for slab pages, the cache.

    Spans the same pfns as the :class:`PageClassMap` it refines
    (``base_pfn``, one entry per pfn). ``cache_ids`` holds 2 bytes per pfn
    (little-endian uint16): 0 for no or an unknown cache, else an index
    into ``caches`` plus one. ``vmalloc_owners`` counts vmalloc'd pages by
    the function that asked for them, where the kernel records it.
    """

    base_pfn: int
    kinds: bytearray
    cache_ids: bytearray
    caches: list[str] = field(default_factory=list)
    vmalloc_owners: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def kind_counts(self, classes: PageClassMap) -> dict[str, int]:
        """Pages of each kind among the KERNEL pages of ``classes``."""
        import numpy as np  # noqa: PLC0415 (a KernelMap is only built where numpy is)

        kernel = np.frombuffer(bytes(classes.classes), dtype=np.uint8) == int(PageClass.KERNEL)
        kinds = np.frombuffer(bytes(self.kinds), dtype=np.uint8)
        n = min(len(kernel), len(kinds))
        counts = np.bincount(kinds[:n][kernel[:n]], minlength=len(KernelKind))
        return {k.name.lower(): int(counts[k]) for k in KernelKind}

    def cache_pages(self, classes: PageClassMap) -> dict[str, int]:
        """Slab pages per cache name among the KERNEL pages of ``classes`` (unknown caches as ``?``)."""
        import numpy as np  # noqa: PLC0415

        kernel = np.frombuffer(bytes(classes.classes), dtype=np.uint8) == int(PageClass.KERNEL)
        ids = np.frombuffer(bytes(self.cache_ids), dtype="<u2")
        slab = np.frombuffer(bytes(self.kinds), dtype=np.uint8) == int(KernelKind.SLAB)
        n = min(len(kernel), len(ids))
        counts = np.bincount(ids[:n][kernel[:n] & slab[:n]], minlength=len(self.caches) + 1)
        out = {"?": int(counts[0])} if counts[0] else {}
        for i, name in enumerate(self.caches):
            if counts[i + 1]:
                out[name] = out.get(name, 0) + int(counts[i + 1])
        return out


@dataclass
class Artifact:
    """A named blob stored in a layer and written to ``OUTDIR/<name>`` on recovery."""

    name: str
    data: bytes

    def __post_init__(self) -> None:
        if not ARTIFACT_NAME_RE.match(self.name):
            raise ValueError(f"bad artifact name {self.name!r}")


@dataclass
class LayerContent:
    """What a producer contributes to one layer.

    ``page_runs`` is a zero-argument callable returning an iterator of
    ``(first_pfn, npages)`` runs, produced lazily so memory stays bounded.
    Runs may repeat pages already written by an earlier layer; the writer
    skips those. ``notes`` are human-readable remarks stored with the layer
    (e.g. why something is missing).
    """

    artifacts: list[Artifact] = field(default_factory=list)
    page_runs: Callable[[], Iterator[tuple[int, int]]] = lambda: iter(())
    notes: list[str] = field(default_factory=list)


RUN_WINDOW = 1 << 20  # class bytes translated at once: a 1 MiB temporary whatever the guest's RAM


def _marked_runs(classes: bytearray, lo: int, hi: int, table: bytes) -> Iterator[tuple[int, int]]:
    """``[start, end)`` runs in ``classes[lo:hi]`` of bytes that ``table`` maps to 1.

    In windows of :data:`RUN_WINDOW` (``bytes.translate`` and a regex, in C), a run that crosses
    a window's end joined with its continuation, so a large guest needs no whole-map copies.
    """
    start = end = -1
    for w in range(lo, hi, RUN_WINDOW):
        marks = classes[w : min(w + RUN_WINDOW, hi)].translate(table)
        for m in re.finditer(rb"\x01+", marks):
            a, b = w + m.start(), w + m.end()
            if a == end:
                end = b
                continue
            if end > start:
                yield start, end
            start, end = a, b
    if end > start:
        yield start, end


class PageClassMap:
    """Class of every page frame in the snapshot: one byte per pfn.

    Memory is bounded: 1 byte per 4 KiB page (1 MiB per 4 GiB of RAM).
    Pfns outside ``[base_pfn, base_pfn + len)`` are UNKNOWN.
    """

    def __init__(self, base_pfn: int, npages: int, default: PageClass = PageClass.UNKNOWN) -> None:
        self.base_pfn = base_pfn
        self.classes = bytearray([int(default)]) * npages

    def set_run(self, pfn: int, npages: int, cls: PageClass) -> None:
        lo = max(pfn - self.base_pfn, 0)
        hi = min(pfn - self.base_pfn + npages, len(self.classes))
        if hi > lo:
            self.classes[lo:hi] = bytes([int(cls)]) * (hi - lo)

    def get(self, pfn: int) -> PageClass:
        i = pfn - self.base_pfn
        if 0 <= i < len(self.classes):
            return PageClass(self.classes[i])
        return PageClass.UNKNOWN

    def runs(self, wanted: frozenset[PageClass], snapshot: Snapshot) -> Iterator[tuple[int, int]]:
        """Runs of pfns present in ``snapshot`` whose class is in ``wanted``.

        Uses ``bytes.translate`` and a regex over the class bytes, so a 4 GiB
        guest (1 Mi pages) is scanned in C, not in a Python loop per page.
        """
        table = bytes(1 if c < len(PageClass) and PageClass(c) in wanted else 0 for c in range(256))
        unknown_wanted = PageClass.UNKNOWN in wanted
        for first, n in snapshot.pfn_runs():
            lo = first - self.base_pfn
            hi = lo + n
            # parts of the run outside the map are UNKNOWN
            if lo < 0:
                outside = min(n, -lo)
                if unknown_wanted:
                    yield first, outside
                first += outside
                n -= outside
                lo = 0
            if n <= 0:
                continue
            inside_hi = min(hi, len(self.classes))
            if inside_hi > lo:
                for a, b in _marked_runs(self.classes, lo, inside_hi, table):
                    yield first + a - lo, b - a
            if hi > inside_hi and unknown_wanted:
                start = self.base_pfn + max(inside_hi, lo)
                yield start, self.base_pfn + hi - start

    def counts(self) -> dict[str, int]:
        return {c.name.lower(): self.classes.count(int(c)) for c in PageClass}

    def runs_of_values(self, values: frozenset[int], snapshot: Snapshot, outside: bool) -> Iterator[tuple[int, int]]:
        """Runs of present pfns whose byte is in ``values``; pfns outside the map when ``outside``.

        A plan's finer selections rewrite a copy of the class bytes (values
        above the PageClass range mark their own sets) and select with this.
        """
        table = bytes(1 if c in values else 0 for c in range(256))
        for first, n in snapshot.pfn_runs():
            lo, hi = first - self.base_pfn, first - self.base_pfn + n
            if lo < 0:
                cut = min(n, -lo)
                if outside:
                    yield first, cut
                lo = 0
            inside_hi = min(hi, len(self.classes))
            if inside_hi > lo:
                for a, b in _marked_runs(self.classes, lo, inside_hi, table):
                    yield self.base_pfn + a, b - a
            if hi > inside_hi and outside:
                start = max(inside_hi, lo)
                yield self.base_pfn + start, hi - start


class ProducerLike(Protocol):
    """What the writer and :func:`progdump.layers.iter_layers` ask of a producer.

    A :class:`Producer`, or ``progdump.layers.LazyProducer`` standing in for
    one until a layer needs it (a raw layer 0 needs none).
    """

    snapshot: Snapshot

    @property
    def name(self) -> str: ...

    @property
    def degraded(self) -> list[str]: ...

    def panic(self) -> LayerContent: ...

    def tasks(self) -> LayerContent: ...

    def page_classes(self) -> PageClassMap | None: ...

    def kernel_map(self, classes: PageClassMap) -> KernelMap | None: ...


class Producer(ABC):
    """Base of all producers. Subclasses: generic (any OS), linux, illumos."""

    #: short name stored in the dump (``generic``, ``linux``, ``illumos``)
    name: str = "abstract"

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        #: reasons this producer gave less than its best (stored in layer notes)
        self.degraded: list[str] = []

    @abstractmethod
    def panic(self) -> LayerContent:
        """Layer 0: panic string, registers, backtrace, log, console tail, identity."""

    @abstractmethod
    def tasks(self) -> LayerContent:
        """Layer 1: every thread's stack and backtrace, process table, modules."""

    def page_classes(self) -> PageClassMap | None:
        """Class of every page, or None when this producer cannot tell."""
        return None

    def kernel_map(self, classes: PageClassMap) -> KernelMap | None:
        """What each KERNEL page of ``classes`` holds, or None when this producer cannot tell.

        Asked only by plans that split kernel memory (``fileserver``), so the
        other plans pay nothing for it.
        """
        return None
