"""Writer side of issue 13's target 3: from "go" to layer 0 durable, for a writer armed before the panic.

``python3 -m progdump.resident`` (see its docstring) is started and armed,
then handed the captured machine state the way the harness has it after a
panic: the guest-RAM file mapped read-only (here: the snapshot ELF's PT_LOAD
bytes, which is what a memory-backend file holds), the registers and
VMCOREINFO inline. The clock runs from the moment the writer read the go
line to the return of layer 0's commit flush (``go_to_layer_s``, the
writer's own monotonic clock). p50/p95 over ``--runs`` dumps per device
model and plan; a fresh process each run, a fresh device file each run.

The snapshot is bench/peers.py's captured Linux guest
(``.cache/bench/peers-<MiB>m.elf``; run that first, or pass ``--elf``).
The end-to-end figure from ``GUEST_PANICKED`` is the harness's
(``layer_durable_after_event_ms``), not this one.

Usage: ``python3 bench/resident_layer0.py [--runs 12] [--models none,nvme] [--plans progressive-raw,progressive]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = ROOT / ".cache" / "bench"
RESULTS = ROOT / "bench" / "results"


def go_message(elf: Path) -> dict:
    """The go line for the shared-RAM path: the ELF's own file bytes as the RAM file."""
    from progdump.elfcore import load_elf_snapshot  # noqa: PLC0415

    with load_elf_snapshot(elf) as s:
        ranges = [[r.phys_start, r.backing_offset, r.size] for r in s.ranges]
        vmci = (s.vmcoreinfo_raw or b"").rstrip(b"\0").decode("utf-8", "replace")
        cpus = [{"index": c.index, "regs": dict(c.regs)} for c in s.cpus]
        console = s.console_tail[-64 * 1024 :].decode("utf-8", "replace")
        meta = {k: v for k, v in s.metadata.items() if isinstance(v, (str, int, float))}
    return {
        "ram": str(elf),
        "ranges": ranges,
        "cpus": cpus,
        "vmcoreinfo": vmci,
        "console_tail": console,
        "metadata": meta,
    }


def one(go: dict, model: str, plan: str, work: Path, size: int, extra: tuple[str, ...] = ()) -> dict:
    dev = work / "dev.img"
    dev.unlink(missing_ok=True)
    with open(dev, "wb") as f:
        f.truncate(size)
    p = subprocess.Popen([sys.executable, "-m", "progdump.resident", str(dev), "--plan", plan, "--device-model", model, *extra],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)  # fmt: skip
    armed = json.loads(p.stdout.readline())  # type: ignore[union-attr]
    if not armed.get("armed"):
        raise RuntimeError(f"not armed: {armed}")
    time.sleep(0.2)  # armed and idle, as before a panic
    out, err = p.communicate(json.dumps(go).encode() + b"\n", timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"resident writer exited {p.returncode}: {err.decode()[-500:]}")
    fin = json.loads(out.decode().splitlines()[-1])
    dev.unlink(missing_ok=True)
    return {"arm_s": armed["arm_s"], "go_to_start_s": fin["go_to_start_s"], "go_to_layer_s": fin["go_to_layer_s"],
            "layer0_bytes": fin["result"]["layers"][0]["bytes"]}  # fmt: skip


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--elf", type=Path, default=None)
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--models", default="none,nvme")
    ap.add_argument("--plans", default="progressive-raw,progressive")
    ap.add_argument("--no-warm", action="store_true", help="arm without the warm-up dump (what it buys)")
    ap.add_argument("--json", type=Path, default=RESULTS / "resident_layer0.json")
    a = ap.parse_args()
    elf = a.elf or next(iter(sorted(CACHE.glob("peers-*m.elf"))), None)
    if elf is None or not elf.exists():
        print("no captured snapshot: run bench/peers.py first (or pass --elf)", file=sys.stderr)
        return 1
    go = go_message(elf)
    size = elf.stat().st_size * 5 // 4 + (64 << 20)
    work = Path(tempfile.mkdtemp(prefix="resident-", dir=CACHE))
    rows = []
    try:
        for model in a.models.split(","):
            for plan in a.plans.split(","):
                runs = [one(go, model, plan, work, size, ("--no-warm",) if a.no_warm else ()) for _ in range(a.runs)]
                l0 = [r["go_to_layer_s"]["0"] * 1e3 for r in runs]
                l2 = [r["go_to_layer_s"].get("2", float("nan")) * 1e3 for r in runs]
                row = {"model": model, "plan": plan, "warm": not a.no_warm, "n": len(runs), "layer0_p50_ms": statistics.median(l0),
                       "layer0_p95_ms": pct(l0, 0.95), "layer0_max_ms": max(l0), "layer2_p50_ms": statistics.median(l2),
                       "go_to_start_p50_ms": statistics.median(r["go_to_start_s"] * 1e3 for r in runs),
                       "arm_p50_s": statistics.median(r["arm_s"] for r in runs),
                       "layer0_bytes": runs[-1]["layer0_bytes"], "runs": runs}  # fmt: skip
                rows.append(row)
                print(f"{model:6} {plan:16} n={row['n']:3d}  layer 0 from go: p50 {row['layer0_p50_ms']:7.1f} ms  "
                      f"p95 {row['layer0_p95_ms']:7.1f} ms  max {row['layer0_max_ms']:7.1f}  layer 2 p50 "
                      f"{row['layer2_p50_ms']:7.1f} ms  (go->writer start {row['go_to_start_p50_ms']:.1f} ms; "
                      f"layer 0 {row['layer0_bytes'] / 1024:.0f} KiB; armed in {row['arm_p50_s']:.2f} s)", flush=True)  # fmt: skip
    finally:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"bench": "resident_layer0", "elf": str(elf), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                  "loadavg": os.getloadavg(), "rows": rows}, indent=1))  # fmt: skip
    print(f"figures saved to {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
