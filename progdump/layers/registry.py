"""Registry of OS producers: which producer reads which snapshot.

Why a registry: the writer must not know any OS by name. Each OS package
under ``progdump/layers/`` (``linux/``, ``illumos/`` ...) calls
:func:`register_producer` when imported, saying how to recognise a snapshot
it understands (from what the snapshot carries: VMCOREINFO, an illumos
symbol manifest ...) and which of its modules a resident dump path would
have loaded. :func:`progdump.layers.select_producer` asks each in priority
order; the generic producer is always the floor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from progdump.layers.base import LayerContent, PageClassMap, Producer
from progdump.snapshot import Snapshot

__all__ = ["ProducerEntry", "register_producer", "unregister_producer", "producers"]


@dataclass(frozen=True)
class ProducerEntry:
    """``accepts(snapshot)`` returns None when the producer should be tried, else the reason not."""

    name: str
    accepts: Callable[[Snapshot], str | None]
    factory: Callable[[Snapshot], Producer]
    priority: int = 100  # lower is asked first
    preload: tuple[str, ...] = ()  # module names imported before a writer's clock starts
    #: layer 0 as raw pages (a plan's ``panic-raw`` part): fast, no decoding; text rendered at recovery
    raw_panic: Callable[[Snapshot], LayerContent] | None = None
    #: page classes without the full producer (no symbol tables): ``(map, notes)``; raises when it cannot
    raw_page_classes: Callable[[Snapshot], tuple[PageClassMap, list[str]]] | None = None


_REGISTRY: dict[str, ProducerEntry] = {}


def register_producer(entry: ProducerEntry) -> ProducerEntry:
    old = _REGISTRY.get(entry.name)
    if old is not None and old.factory is not entry.factory:
        raise ValueError(f"producer {entry.name!r} registered twice")
    _REGISTRY[entry.name] = entry
    return entry


def unregister_producer(name: str) -> None:
    """Remove a producer (tests that register a stand-in; a plugin being unloaded)."""
    _REGISTRY.pop(name, None)


def producers() -> list[ProducerEntry]:
    """Registered producers, in the order :func:`select_producer` asks them."""
    return sorted(_REGISTRY.values(), key=lambda e: (e.priority, e.name))
