"""The root of every error progdump raises on purpose.

Why one root: a caller (the CLI, the harness, a test) can tell "progdump
refused this input or this device, and says why" (:class:`ProgdumpError`,
one line for the user) from a bug (anything else, which must surface with
its traceback). Each module keeps its own subclass, named for what failed
(``DeviceError``, ``SnapshotError``, ``FormatError``, ``ReaderError`` ...);
the class says which exit status the CLI gives it, so the CLI never lists
exception types by hand.

This module imports nothing from progdump, so any module can use it.
"""

from __future__ import annotations

__all__ = ["ProgdumpError", "EXIT_OK", "EXIT_ERROR", "EXIT_NO_DUMP"]

#: exit statuses of the ``progdump`` command (README, progdump/cli.py)
EXIT_OK, EXIT_ERROR, EXIT_NO_DUMP = 0, 1, 2


class ProgdumpError(Exception):
    """Something progdump cannot do with the input it was given; the message says what and why.

    ``exit_status`` is what the command line exits with when this reaches it
    (1 for every error today: usage, I/O, unreadable or unsupported input).
    """

    exit_status: int = EXIT_ERROR
