"""How `progdump write` scales with the number of PT_LOADs (issue 10 part 4).

QEMU ``dump-guest-memory`` with ``paging: true`` writes one PT_LOAD per page;
writing such a snapshot was quadratic (Snapshot.release_phys scanned every
range from the start for each chunk). Usage:
``python3 bench/ptload_scale.py [N ...]`` (default 4000 20000): builds an
ELF core of N one-page PT_LOADs and times ``progdump write`` of it to a
200 MiB sparse file. A speed figure, not a test.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from progdump.elfcore import ElfCoreWriter  # noqa: E402


def main(argv: list[str]) -> int:
    counts = [int(a) for a in argv] or [4000, 20000]
    with tempfile.TemporaryDirectory(prefix="ptload-") as d:
        for n in counts:
            core, dev = os.path.join(d, f"c{n}.elf"), os.path.join(d, "dev.img")
            rnd = random.Random(1)
            with ElfCoreWriter(core, [], [(i * 4096, 4096, 4096) for i in range(n)]) as w:
                for _ in range(n):
                    w.write(rnd.randbytes(64) * 64)
            with open(dev, "wb") as f:
                f.truncate(200 << 20)
            t = time.monotonic()
            p = subprocess.run(
                [sys.executable, "-m", "progdump", "write", "-q", core, dev], cwd=ROOT, capture_output=True, text=True
            )
            print(f"{n} PT_LOADs: write {time.monotonic() - t:.2f} s (exit {p.returncode})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
