"""Run every benchmark in bench/ (each ``bench/*.py`` but this file and ``_*.py`` helpers).

Each benchmark prints its own table with a baseline measured in the same run.
This runner prints a one-line summary per benchmark and exits non-zero only
when a benchmark failed to run (its exit status), never for a slow figure.

Usage: ``python3 bench/run.py [NAME ...]`` (names without ``.py``; default all).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def benches(names: list[str]) -> list[Path]:
    found = sorted(p for p in HERE.glob("*.py") if p.name != "run.py" and not p.name.startswith("_"))
    if names:
        by_name = {p.stem: p for p in found}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise SystemExit(f"unknown benchmark(s): {', '.join(unknown)}; have: {', '.join(by_name)}")
        return [by_name[n] for n in names]
    return found


def main(argv: list[str]) -> int:
    results = []
    for path in benches(argv):
        print(f"==== {path.stem}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(path)], cwd=HERE.parent)
        results.append((path.stem, rc, time.perf_counter() - t0))
    print("==== summary")
    for name, rc, secs in results:
        print(f"{name:30} {'ok' if rc == 0 else f'FAILED (exit {rc})':>16} {secs:8.1f} s")
    return 0 if all(rc == 0 for _, rc, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
