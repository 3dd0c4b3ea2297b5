"""Scenario setups: what a scenario needs outside the guest, with a lifecycle.

Why a class and not a bare context manager: the scenario runner drives one
guest through many panics (an older dump, reference runs, killed trials), and
a setup such as an iSCSI target has work at each of those moments: start the
host side before QEMU starts (and add QEMU arguments), bring the guest side up
after every boot and reset, make the panic happen its own way, and always
clean up. Each moment is one method with a typed result; the runner calls
them in this order::

    setup = cls(scenario, workdir, log)
    try:
        ov = setup.start()                      # host side up; QEMU args / knobs
        session = GuestSession(..., **ov)       # boot
        for every boot and every reset:
            setup.after_boot(session)           # guest side up, before the workload
            ... workload ...
            setup.panic(session, trigger, rng)  # or session.panic(trigger) when it returns None
    finally:
        setup.close()                           # every exit path, Ctrl-C included; idempotent

A setup joins the registry with :func:`harness.setups.register_setup` in its
own module under ``harness/setups/``; a scenario names it with
``setup = "NAME"`` and passes settings in its ``[setup_params]`` table.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover - typing only (the runner imports QEMU lazily)
    from harness.controller import GuestSession, PanicResult

__all__ = ["SessionOverrides", "ScenarioSetup"]


@dataclass
class SessionOverrides:
    """What a setup changes about the guest session the runner starts.

    ``extra_args``: more QEMU arguments (appended after the profile's);
    ``knobs``: guest settings merged over the scenario's; ``dump_disk``: a
    different dump disk image (None: the runner's); ``notes``: lines for the
    report (what was started, where).
    """

    extra_args: list[str] = field(default_factory=list)
    knobs: dict[str, str] = field(default_factory=dict)
    dump_disk: Path | None = None
    notes: list[str] = field(default_factory=list)


class ScenarioSetup:
    """Base class: every hook does nothing; override what the scenario needs.

    ``params`` is the scenario's ``[setup_params]`` table (untrusted user
    input: validate it in ``__init__`` and raise
    :class:`harness.errors.SetupError` naming the key). ``log`` prints one
    progress line.
    """

    #: registry name, set by :func:`harness.setups.register_setup`
    name: ClassVar[str] = "?"
    #: triggers this setup performs itself in :meth:`panic` (beyond the guest profile's own)
    triggers: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, scenario: Any, workdir: Path, params: Mapping[str, Any], log: Callable[[str], None] = print
    ) -> None:
        self.scenario = scenario
        self.workdir = Path(workdir)
        self.params = dict(params)
        self.log = log

    def check(self) -> None:
        """Raise :class:`harness.errors.MissingTool` at once when a piece is missing (before anything starts)."""

    def start(self) -> SessionOverrides:
        """Bring the host side up (before QEMU starts); return what the session needs."""
        return SessionOverrides()

    def after_boot(self, session: GuestSession) -> None:
        """After every boot and every reset, before the workload: bring the guest side up."""

    def panic(self, session: GuestSession, trigger: str, rng: random.Random) -> PanicResult | None:
        """Make the guest panic the setup's own way; None: the runner calls ``session.panic(trigger)``."""
        return None

    def notes(self) -> list[str]:
        """Lines for the report about the last panic (what the setup did, when)."""
        return []

    def close(self) -> None:
        """Tear everything down. Called on every exit path; must be idempotent and never raise."""

    # context-manager sugar for tests and one-off use
    def __enter__(self) -> ScenarioSetup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
