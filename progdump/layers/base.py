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
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable, Iterator

from progdump.format import ARTIFACT_NAME_RE  # the format's rule (R-TYP-2), re-exported
from progdump.snapshot import Snapshot

__all__ = [
    "PageClass",
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
                marks = self.classes[lo:inside_hi].translate(table)
                for m in re.finditer(rb"\x01+", marks):
                    yield first + m.start(), m.end() - m.start()
            if hi > inside_hi and unknown_wanted:
                start = self.base_pfn + max(inside_hi, lo)
                yield start, self.base_pfn + hi - start

    def counts(self) -> dict[str, int]:
        return {c.name.lower(): self.classes.count(int(c)) for c in PageClass}


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
