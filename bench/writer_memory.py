"""Writer and reader peak memory against guest RAM, on real Linux snapshots (issue 13, target 5).

For each snapshot ELF given (``bench/peers.py`` leaves them in ``.cache/bench/peers-<MiB>m.elf``),
run ``progdump write`` (each ``--plan``) and ``progdump recover`` as child processes and sample
their ``/proc/PID/status`` every 5 ms: ``VmHWM`` (the kernel's own peak of resident memory,
snapshot pages mapped while they are read included), and the largest ``RssAnon`` and
``RssFile`` seen (the process's own memory, and file pages it has mapped). Flat in guest RAM is
what target 5 asks; the table shows each figure per guest size and the change per GiB of guest.

Usage: ``python3 bench/writer_memory.py [--plans progressive,raw-kernel] ELF [ELF ...]``
Exit status non-zero only when a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


class _Peaks(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.stop = pid, threading.Event()
        self.peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        key = line.split(":", 1)[0]
                        if key in self.peak:
                            self.peak[key] = max(self.peak[key], int(line.split()[1]))
            except (OSError, ValueError, IndexError):
                pass
            self.stop.wait(0.005)


def measure(argv: list[str]) -> tuple[int, dict[str, float], float]:
    t = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    s = _Peaks(p.pid)
    s.start()
    _, err = p.communicate()
    s.stop.set()
    s.join()
    if p.returncode != 0:
        print(err.decode(errors="replace")[-400:], file=sys.stderr)
    return p.returncode, {k: v / 1024 for k, v in s.peak.items()}, time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("elfs", nargs="+", type=Path)
    ap.add_argument("--plans", default="progressive,raw-kernel")
    ap.add_argument("--json", type=Path, default=RESULTS / "writer-memory.json")
    a = ap.parse_args()
    import compileall  # noqa: PLC0415 (as an installed package has its bytecode; see bench/peers.py)

    compileall.compile_dir(str(ROOT / "progdump"), quiet=1)
    rows, failed = [], 0
    work = Path(tempfile.mkdtemp(prefix="wmem-", dir=ROOT / ".cache"))
    try:
        for elf in a.elfs:
            size = elf.stat().st_size
            dev = work / "dev.img"
            for plan in a.plans.split(","):
                with open(dev, "wb") as f:
                    f.truncate(size * 5 // 4 + (64 << 20))
                rc, peak, wall = measure([sys.executable, "-m", "progdump", "write", str(elf), str(dev), "-q",
                                          "--plan", plan])  # fmt: skip
                rows.append({"snapshot_mb": size / 1e6, "what": f"write --plan {plan}", "rc": rc, "wall_s": wall,
                             **peak})  # fmt: skip
                failed += rc != 0
                out = work / "rec"
                shutil.rmtree(out, ignore_errors=True)
                rc, peak, wall = measure([sys.executable, "-m", "progdump", "recover", str(dev), str(out), "-q"])
                rows.append({"snapshot_mb": size / 1e6, "what": f"recover ({plan})", "rc": rc, "wall_s": wall,
                             **peak})  # fmt: skip
                failed += rc != 0
                shutil.rmtree(out, ignore_errors=True)
                dev.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'snapshot MB':>11} {'':28} {'VmHWM MiB':>9} {'RssAnon':>8} {'RssFile':>8} {'wall s':>7} rc")
    for r in rows:
        print(f"{r['snapshot_mb']:11.0f} {r['what']:28} {r['VmHWM']:9.1f} {r['RssAnon']:8.1f} {r['RssFile']:8.1f}"
              f" {r['wall_s']:7.2f} {r['rc']}")  # fmt: skip
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                  "loadavg": os.getloadavg(), "rows": rows}, indent=1))  # fmt: skip
    print(f"figures saved to {a.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
