"""``progdump replay`` / ``progdump narrow`` as plugin subcommands of the progdump CLI.

progdump's CLI loads ``register_cli(register)`` from entry points of group
``progdump.cli`` (pyproject: ``replay = "harness.crashsim.cli:register_cli"``),
so ``progdump`` itself never imports the harness. The same commands run as
``python -m harness.crashsim replay|narrow|info``.
"""

from __future__ import annotations

from collections.abc import Callable


def register_cli(register: Callable[..., None]) -> None:
    from harness.crashsim.__main__ import add_state_args, guard_errors, run_info, run_narrow, run_replay

    register(
        "replay",
        "replay one crash state of a write trace exactly (trace, t, kind, seed)",
        lambda p: add_state_args(p, True),
        guard_errors(run_replay),
    )
    register(
        "narrow",
        "narrow a failing crash state to the write that breaks it",
        lambda p: add_state_args(p, False),
        guard_errors(run_narrow),
    )
    register("trace-info", "summarise a write trace", lambda p: p.add_argument("trace"), guard_errors(run_info))
