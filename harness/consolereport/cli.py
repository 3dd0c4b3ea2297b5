"""``python -m harness report --guest omnios FILE``: a console log -> one JSON object.

Why its own parser: ``report`` reads a file and never starts QEMU, so it
takes none of the boot options. Exit 0 with the JSON on stdout; 1 with one
line on stderr when the file cannot be read; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from progdump.layers.illumos.console import MAX_INPUT, parse_illumos

__all__ = ["report_main", "PARSERS"]

PARSERS = {"omnios": parse_illumos, "illumos": parse_illumos}


def _read_tail(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - MAX_INPUT))
        return f.read(MAX_INPUT)


def report_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m harness report", description="Parse a recorded console log; print one JSON object."
    )
    ap.add_argument("--guest", required=True, choices=sorted(PARSERS))
    ap.add_argument("--full", action="store_true", help="also the trap, dump device and progress, notes")
    ap.add_argument("file", type=Path)
    args = ap.parse_args(argv)
    try:
        data = _read_tail(args.file)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        print(f"harness report: cannot read {args.file}: {reason}", file=sys.stderr)
        return 1
    rep = PARSERS[args.guest](data)
    print(json.dumps(rep.full() if args.full else rep.contract()))
    return 0
