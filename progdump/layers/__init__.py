"""Layer plans and producers (generic, linux, illumos).

:func:`iter_layers` is what the writer calls: it yields each layer's spec and
content *when the writer asks for it*, so layer 0 is not delayed by the work
layer 2 needs (page classification).
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator

from progdump.layers.base import Artifact, KernelMap, LayerContent, PageClass, PageClassMap, Producer, ProducerLike
from progdump.layers.generic import GenericProducer, core_artifacts
from progdump.layers.plan import (
    BULK_MARK,
    DEFAULT_BULK,
    KERNEL_SPLIT_PARTS,
    PART_PAGE_CLASSES,
    PLANS,
    LayerSpec,
    get_plan,
    split_kernel,
)
from progdump.layers.registry import ProducerEntry, producers, register_producer
from progdump.snapshot import Snapshot

__all__ = [
    "LayerSpec",
    "PLANS",
    "get_plan",
    "select_producer",
    "preload_producers",
    "iter_layers",
    "build_layers",
    "ProducerEntry",
    "register_producer",
    "LazyProducer",
    "raw_panic_content",
]

log = logging.getLogger(__name__)


_OS_PACKAGES_LOADED: list[str] = []


def _import_os_packages() -> list[str]:
    """Import every OS package under ``progdump/layers/`` (each registers its producer); return failures."""
    import importlib  # noqa: PLC0415
    import pkgutil  # noqa: PLC0415

    failed = []
    if not _OS_PACKAGES_LOADED:
        _OS_PACKAGES_LOADED.append("done")
        for m in pkgutil.iter_modules(__path__):
            if not m.ispkg:
                continue  # base, plan, generic, registry: not OS packages
            try:
                importlib.import_module(f"{__name__}.{m.name}")
            except Exception as e:  # noqa: BLE001 - reported, never fatal
                _IMPORT_FAILURES.append(f"{__name__}.{m.name}: {type(e).__name__}: {e}")
    failed += _IMPORT_FAILURES
    return failed


_IMPORT_FAILURES: list[str] = []


def preload_producers() -> list[str]:
    """Import every OS producer's modules now; return the reasons any failed.

    In a real dump path the producer code is resident (it is part of the
    kernel or of a capture kernel loaded ahead of time), so the writer calls
    this *before* its clock starts: "layer 0 durable at" then measures the
    dump, not Python compiling modules (measured: 20-40 ms on a machine with
    PYTHONDONTWRITEBYTECODE set). A failed import is not an error here;
    :func:`select_producer` reports it when it matters.
    """
    import importlib  # noqa: PLC0415

    failed = list(_import_os_packages())
    for entry in producers():
        for mod in entry.preload:
            try:
                importlib.import_module(mod)
            except Exception as e:  # noqa: BLE001 - reported, never fatal
                failed.append(f"{mod}: {type(e).__name__}: {e}")
    return failed


def select_producer(snapshot: Snapshot) -> Producer:
    """The most knowledgeable registered producer that accepts this snapshot.

    Each OS package registers a producer with a test of what the snapshot
    carries (Linux: a VMCOREINFO note); anything a producer refuses falls
    back to the next and finally to the generic producer, with the reasons
    recorded in ``degraded`` (stored in layer notes, shown by ``progdump info``).
    """
    reasons: list[str] = [f"producer package unavailable: {f}" for f in _import_os_packages()]
    for entry in producers():
        why = entry.accepts(snapshot)
        if why is not None:
            reasons.append(f"{entry.name}: {why}")
            continue
        try:
            return entry.factory(snapshot)
        except Exception as e:  # the producer reads untrusted memory: any failure degrades
            reasons.append(f"{entry.name} producer refused the snapshot: {e}")
    p = GenericProducer(snapshot)
    p.degraded.extend(reasons)
    return p


class LazyProducer:
    """The producer, selected on first use.

    Why: a plan whose layer 0 is ``panic-raw`` needs no producer before that
    layer is durable, and choosing one (Linux: reading kallsyms) costs
    60-300 ms. Until then ``name`` is the registry entry that accepts the
    snapshot and ``degraded`` is empty; any other attribute selects it.
    """

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self._p: Producer | None = None
        self._degraded: list[str] = []  # noted before the producer was selected; handed to it then

    @property
    def name(self) -> str:
        if self._p is not None:
            return self._p.name
        _import_os_packages()
        return next((e.name for e in producers() if e.accepts(self.snapshot) is None), GenericProducer.name)

    @property
    def degraded(self) -> list[str]:
        return self._p.degraded if self._p is not None else self._degraded

    def get(self) -> Producer:
        if self._p is None:
            self._p = select_producer(self.snapshot)
            self._p.degraded[:0] = [d for d in self._degraded if d not in self._p.degraded]
        return self._p

    def panic(self) -> LayerContent:
        return self.get().panic()

    def tasks(self) -> LayerContent:
        return self.get().tasks()

    def kernel_map(self, classes: PageClassMap) -> KernelMap | None:
        return self.get().kernel_map(classes)

    def page_classes(self) -> PageClassMap | None:
        """Page classes without selecting the producer when its registry entry offers them raw
        (Linux: from VMCOREINFO, no kallsyms); else, or when that fails, through the producer."""
        if self._p is None:
            _import_os_packages()
            for entry in producers():
                if entry.raw_page_classes is None or entry.accepts(self.snapshot) is not None:
                    continue
                try:
                    pcm, notes = entry.raw_page_classes(self.snapshot)
                    self._degraded += [n for n in notes if not n.startswith("page classes from")]
                    return pcm
                except Exception as e:  # noqa: BLE001 - untrusted memory: the full producer tries next
                    self._degraded.append(f"{entry.name} raw page classes failed: {type(e).__name__}: {e}")
                break
        return self.get().page_classes()

    def __getattr__(self, attr: str):  # type: ignore[no-untyped-def]
        return getattr(self.get(), attr)


def raw_panic_content(snapshot: Snapshot) -> tuple[LayerContent, list[str]]:
    """Layer 0 as raw pages from the first registered producer that accepts the snapshot and offers it.

    Falls back to the generic producer's layer 0 (console-based panic.txt) with the reason.
    """
    _import_os_packages()
    reasons: list[str] = []
    for entry in producers():
        if entry.raw_panic is None or entry.accepts(snapshot) is not None:
            continue
        try:
            return entry.raw_panic(snapshot), []
        except Exception as e:  # untrusted memory: degrade, never abort
            reasons.append(f"{entry.name} raw layer 0 failed: {type(e).__name__}: {e}; generic used")
    return GenericProducer(snapshot).panic(), reasons


def _safe(producer: ProducerLike, what: str) -> tuple[LayerContent, list[str]]:
    """Call producer.panic()/tasks(); on failure fall back to the generic producer."""
    try:
        return getattr(producer, what)(), []
    except Exception as e:
        if isinstance(producer, GenericProducer):
            return LayerContent(notes=[f"{what}: generic producer failed: {e}"]), []
        reason = f"{producer.name} producer failed in {what}(): {type(e).__name__}: {e}; generic used"
        return getattr(GenericProducer(producer.snapshot), what)(), [reason]


def _chain_runs(runs: tuple[Callable[[], Iterable[tuple[int, int]]], ...]) -> Iterator[tuple[int, int]]:
    """One layer's page runs: each part's runs in turn, each computed when the writer gets to it."""
    return itertools.chain.from_iterable(r() for r in runs)


def iter_layers(
    snapshot: Snapshot, plan: str | tuple[LayerSpec, ...] = "progressive", producer: ProducerLike | None = None
) -> Iterator[tuple[LayerSpec, LayerContent]]:
    """Yield ``(spec, content)`` per layer of ``plan``, computing each on demand."""
    specs = get_plan(plan) if isinstance(plan, str) else plan
    prod: ProducerLike = (
        producer
        if producer is not None
        else (LazyProducer(snapshot) if specs and specs[0].parts[:1] == ("panic-raw",) else select_producer(snapshot))
    )
    classes: list[PageClassMap | None] = []  # computed once, lazily

    def page_classes() -> PageClassMap | None:
        if not classes:
            try:
                classes.append(prod.page_classes())
            except Exception as e:
                prod.degraded.append(f"{prod.name} page classification failed: {type(e).__name__}: {e}")
                classes.append(None)
        return classes[0]

    splits: dict[object, tuple[PageClassMap | None, list[str]]] = {}  # per bulk rule, computed once

    def kernel_split(rule) -> tuple[PageClassMap | None, list[str]]:  # type: ignore[no-untyped-def]
        """Class bytes with bulk pages marked, for ``kstruct``/``bulk``; None without a kernel map."""
        if rule not in splits:
            pcm = page_classes()
            kmap = None
            if pcm is not None:
                try:
                    kmap = prod.kernel_map(pcm)
                except Exception as e:
                    prod.degraded.append(f"{prod.name} kernel map failed: {type(e).__name__}: {e}")
            if pcm is None or kmap is None:
                splits[rule] = (None, [])
            else:
                try:
                    splits[rule] = split_kernel(kmap, pcm, rule)
                    splits[rule][1][:0] = kmap.notes
                except Exception as e:  # noqa: BLE001 - a bad map degrades to the plain kernel part
                    prod.degraded.append(f"kernel split failed: {type(e).__name__}: {e}")
                    splits[rule] = (None, [])
        return splits[rule]

    first = True
    reported: set[str] = set()  # each degradation is noted once, in the layer where it shows
    for spec in specs:
        artifacts: list[Artifact] = []
        notes: list[str] = []
        runs: list[Callable[[], Iterable[tuple[int, int]]]] = []
        if first:
            artifacts += core_artifacts(snapshot)
            notes.append(f"producer: {prod.name}")
            first = False
        for part in spec.parts:
            if part in ("panic", "tasks", "panic-raw"):
                content, extra = raw_panic_content(snapshot) if part == "panic-raw" else _safe(prod, part)
                artifacts += content.artifacts
                notes += content.notes + extra
                runs.append(content.page_runs)
            elif part == "all":
                runs.append(snapshot.pfn_runs)
            elif part in KERNEL_SPLIT_PARTS:
                pcm = page_classes()
                split, snotes = kernel_split(spec.bulk or DEFAULT_BULK)
                if pcm is None:
                    notes.append(f"{part}: no page classification ({prod.name} producer); pages go to the last layer")
                elif split is None:
                    if part == "kstruct":
                        notes.append(f"kstruct: no kernel map ({prod.name} producer): every kernel page")
                        wanted = PART_PAGE_CLASSES["kernel"]
                        runs.append(functools.partial(pcm.runs, wanted, snapshot))
                    else:
                        notes.append("bulk: no kernel map: nothing here (bulk pages are in kstruct)")
                else:
                    if part == "kstruct":
                        notes += snotes
                        vals = frozenset({int(PageClass.KERNEL), int(PageClass.UNKNOWN)})
                        runs.append(functools.partial(split.runs_of_values, vals, snapshot, True))
                    else:
                        runs.append(functools.partial(split.runs_of_values, frozenset({BULK_MARK}), snapshot, False))
            elif part in PART_PAGE_CLASSES:
                pcm = page_classes()
                if pcm is None:
                    notes.append(f"{part}: no page classification ({prod.name} producer); pages go to the last layer")
                else:
                    wanted = PART_PAGE_CLASSES[part]
                    runs.append(functools.partial(pcm.runs, wanted, snapshot))
            else:
                raise ValueError(f"unknown layer part {part!r}")
        for d in prod.degraded:
            if d not in reported:
                reported.add(d)
                notes.append(f"degraded: {d}")
        content = LayerContent(
            artifacts=artifacts,
            page_runs=functools.partial(_chain_runs, tuple(runs)),
            notes=notes,
        )
        yield spec, content


def build_layers(
    snapshot: Snapshot, plan: str | tuple[LayerSpec, ...] = "progressive", producer: Producer | None = None
) -> list[tuple[LayerSpec, LayerContent]]:
    """All layers at once (tests, ``progdump info``); the writer uses :func:`iter_layers`."""
    return list(iter_layers(snapshot, plan, producer))
