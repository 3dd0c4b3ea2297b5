"""Write throughput and peak memory of ``progdump write`` / ``progdump recover``.

The figures issue 2 asks for, measured in one run on this machine:

* a 1 GiB snapshot (ELF core) that is half zero pages and half mixed data
  (blend and seed in bench/_snapgen.py; cached under .cache/bench/);
* baseline: the same snapshot file through ``zstd -1 -T0`` to a file, with
  an fsync of the output (progdump flushes its device too);
* ``progdump write SNAPSHOT DEVICE --device-model none`` to a fresh sparse
  file: wall time, MB/s of snapshot bytes (1 MB = 10^6 bytes) and of device
  bytes (blocks the device file gained), peak memory of the child;
* ``progdump recover DEVICE OUTDIR``: wall time, peak RSS, and a check that
  sampled pages of the recovered ``vmcore`` equal the snapshot's.

Each tool runs as a child process; its peak memory is sampled from
``/proc/PID/status`` (VmHWM and RssAnon; see MemSampler for why not
``ru_maxrss``). The snapshot file is read once before timing so every
contender starts with it in the page cache.

Usage: ``python3 bench/write_throughput.py [--size-mib 1024] [--plans progressive,monolithic]``.
Exit status is non-zero only when something failed to run (or the recovered
memory differs), never because a figure is slow.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _snapgen import DEFAULT_SEED, GEN_VERSION, make_bench_snapshot  # noqa: E402

CACHE = ROOT / ".cache" / "bench"
MB = 1e6


@dataclass
class Run:
    name: str
    argv: list[str]
    wall_s: float
    maxrss_kib: int
    rc: int
    out_bytes: int | None = None
    log_tail: str = ""
    peak_anon_kib: int = 0  # sampled RssAnon: memory of its own, without mapped file pages
    hwm_kib: int = 0  # sampled VmHWM: the child's own peak resident set
    walls: list[float] | None = None  # every round's wall time, when combined


class MemSampler(threading.Thread):
    """Poll /proc/PID/status every 20 ms: VmHWM (peak RSS) and the peak of RssAnon.

    Why not ``ru_maxrss`` from wait4: Linux carries the parent's high-water mark
    across fork+exec into the child's, so a child of a large parent reports the
    parent's size. VmHWM belongs to the child's own address space; sampling can
    only miss growth in the last 20 ms before exit.
    """

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.anon, self.hwm, self.stop = pid, 0, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            self.anon = max(self.anon, int(line.split()[1]))
                        elif line.startswith("VmHWM:"):
                            self.hwm = max(self.hwm, int(line.split()[1]))
            except (OSError, ValueError):
                pass
            self.stop.wait(0.02)


def run_measured(name: str, argv: list[str], logdir: Path, env: dict[str, str] | None = None) -> Run:
    """Run ``argv`` as a child; wall time and that child's peak RSS (wait4)."""
    log = logdir / f"{name.replace(' ', '_')}.log"
    with open(log, "wb") as f:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        sampler = MemSampler(p.pid)
        sampler.start()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
    rc = os.waitstatus_to_exitcode(status)
    p.returncode = rc  # reaped by wait4 above
    tail = log.read_text(errors="replace").strip().splitlines()[-8:]
    return Run(
        name, argv, wall, ru.ru_maxrss, rc, log_tail="\n".join(tail), peak_anon_kib=sampler.anon, hwm_kib=sampler.hwm
    )


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass


CLI_MODULE = "progdump.cli"


def progdump_argv(*args: str) -> list[str]:
    # The tree's own code, whatever is installed: progdump.cli.main, as the console script runs it.
    return [sys.executable, "-c", f"import sys; from {CLI_MODULE} import main; sys.exit(main())", *args]


def cli_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(CLI_MODULE) is not None
    except ImportError:
        return False


def check_vmcore(snapshot: Path, vmcore: Path, samples: int, seed: int) -> str:
    """Compare sampled pages of the recovered vmcore with the snapshot; '' when equal."""
    from progdump.elfcore import load_elf_snapshot
    from progdump.snapshot import PAGE_SIZE

    with load_elf_snapshot(snapshot) as s, load_elf_snapshot(vmcore) as v:
        pfns = [pfn for first, n in s.pfn_runs() for pfn in (first, first + n - 1)]
        rng = random.Random(seed)
        runs = list(s.pfn_runs())
        for _ in range(samples):
            first, n = rng.choice(runs)
            pfns.append(first + rng.randrange(n))
        missing = 0
        for pfn in pfns:
            addr = pfn * PAGE_SIZE
            if not v.has_phys(addr, PAGE_SIZE):
                missing += 1
                continue
            if v.read_phys(addr, PAGE_SIZE) != s.read_phys(addr, PAGE_SIZE):
                return f"page {pfn:#x} differs between snapshot and recovered vmcore"
        if missing:
            return f"{missing} of {len(pfns)} sampled pages missing from a complete recovery"
    return ""


def measure_zstd(work: Path, snap: Path, failures: list[str]) -> Run | None:
    """Baseline: zstd -1 -T0 over the same snapshot bytes, output fsynced."""
    zstd = shutil.which("zstd")
    if zstd is None:
        failures.append("zstd not found (Debian package zstd)")
        return None
    out = work / "snapshot.zst"
    r = run_measured("zstd -1 -T0", [zstd, "-1", "-T0", "-q", "-f", str(snap), "-o", str(out)], work)
    t1 = time.perf_counter()
    if r.rc == 0:
        fsync_path(out)
        r.wall_s += time.perf_counter() - t1
        r.out_bytes = out.stat().st_size
        out.unlink()
    else:
        failures.append(f"zstd exited {r.rc}: {r.log_tail}")
    return r


def measure_plan(
    work: Path, snap: Path, size: int, plan: str, failures: list[str], check_samples: int, seed: int, keep: bool
) -> list[Run]:
    """progdump write to a fresh sparse device file, then progdump recover; optionally check the vmcore."""
    dev = work / f"device-{plan}.img"
    dev.unlink(missing_ok=True)
    with open(dev, "wb") as f:
        f.truncate(size + size // 4 + (64 << 20))  # sparse; roomy for any plan
    blocks0 = dev.stat().st_blocks
    w = run_measured(
        f"progdump write ({plan})",
        progdump_argv("write", str(snap), str(dev), "--plan", plan, "--device-model", "none"),
        work,
    )
    w.out_bytes = (dev.stat().st_blocks - blocks0) * 512
    if w.rc != 0:
        failures.append(f"progdump write --plan {plan} exited {w.rc}:\n{w.log_tail}")
        return [w]
    outdir = work / f"recovered-{plan}"
    shutil.rmtree(outdir, ignore_errors=True)
    rec = run_measured(f"progdump recover ({plan})", progdump_argv("recover", str(dev), str(outdir)), work)
    try:
        if rec.rc != 0:
            failures.append(f"progdump recover exited {rec.rc}:\n{rec.log_tail}")
            return [w, rec]
        vmcore = outdir / "vmcore"
        if not vmcore.exists():
            failures.append(f"recover ({plan}): no vmcore in {outdir}")
            return [w, rec]
        rec.out_bytes = vmcore.stat().st_blocks * 512
        if check_samples:
            err = check_vmcore(snap, vmcore, check_samples, seed)
            if err:
                failures.append(f"recover ({plan}): {err}")
        return [w, rec]
    finally:
        if not keep:
            dev.unlink(missing_ok=True)
            shutil.rmtree(outdir, ignore_errors=True)


def combine(rs: list[Run]) -> Run:
    """Median wall time; peak memory and exit status the worst of the rounds."""
    walls = sorted(r.wall_s for r in rs)
    last = rs[-1]
    return Run(
        last.name, last.argv, statistics.median(walls), max(r.maxrss_kib for r in rs),
        max((r.rc for r in rs), key=abs), last.out_bytes, last.log_tail,
        max(r.peak_anon_kib for r in rs), max(r.hwm_kib for r in rs), walls,
    )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="snapshot size (default 1024)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--plans", default="progressive", help="comma-separated plans to time (default progressive)")
    ap.add_argument("--samples", type=int, default=2000, help="vmcore pages compared after recover")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the median wall time is shown (default 3)")
    ap.add_argument("--keep", action="store_true", help="keep the last round's device and recovery directory")
    ap.add_argument("--json", type=Path, default=CACHE / "write_throughput.json", help="where to save figures")
    ap.add_argument("--cli-module", default=CLI_MODULE, help=argparse.SUPPRESS)  # to test this bench itself
    a = ap.parse_args()
    globals()["CLI_MODULE"] = a.cli_module

    size = a.size_mib << 20
    CACHE.mkdir(parents=True, exist_ok=True)
    snap = CACHE / f"snapshot-{a.size_mib}m-s{a.seed}-v{GEN_VERSION}.elf"
    t0 = time.perf_counter()
    desc = make_bench_snapshot(snap, size, a.seed)
    gen_s = time.perf_counter() - t0
    print(f"snapshot: {snap} ({size / MB:.0f} MB of guest memory, pages {desc['pages']}; ready in {gen_s:.1f} s)")
    warm(snap)

    work = Path(tempfile.mkdtemp(prefix="write-throughput-", dir=CACHE))
    plans = [p for p in a.plans.split(",") if p]
    have_cli = cli_available()
    if not have_cli:
        print(f"{CLI_MODULE} is not in the tree yet: progdump write/recover rows skipped")
    rounds: dict[str, list[Run]] = {}
    failures: list[str] = []
    load_before = os.getloadavg()
    try:
        # Contenders take turns in every round, so background load falls on all alike.
        for i in range(a.repeat):
            last = i == a.repeat - 1
            r = measure_zstd(work, snap, failures)
            if r:
                rounds.setdefault(r.name, []).append(r)
            for plan in plans if have_cli else []:
                for r in measure_plan(work, snap, size, plan, failures, check_samples=a.samples if last else 0,
                                      seed=a.seed, keep=a.keep and last):  # fmt: skip
                    rounds.setdefault(r.name, []).append(r)
            if failures:
                break
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    runs = [combine(rs) for rs in rounds.values()]
    print(f"median of {a.repeat} round(s); load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
          f"({os.cpu_count()} CPUs)")  # fmt: skip

    print_table(runs, size)
    zs = next((r for r in runs if r.name.startswith("zstd") and r.rc == 0), None)
    ratios = {}
    for r in runs:
        if r.name.startswith("progdump write") and r.rc == 0 and zs:
            ratios[r.name] = (size / r.wall_s) / (size / zs.wall_s)
            print(f"{r.name} / zstd -1 -T0 throughput: {ratios[r.name]:.2f}x")
    result = {
        "bench": "write_throughput",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },  # fmt: skip
        "repeat": a.repeat,
        "snapshot": {k: desc[k] for k in ("size", "seed", "gen_version", "blend", "pages", "zero_fraction")},
        "runs": [asdict(r) | {"snapshot_MBps": size / MB / r.wall_s} for r in runs],
        "ratios_vs_zstd": ratios,
        "failures": failures,
    }
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=1))
    print(f"figures saved to {a.json}")
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


def print_table(runs: list[Run], size: int) -> None:
    hdr = (
        f"{'':32} {'wall s':>8} {'snap MB/s':>10} {'out MB':>9} {'out MB/s':>9} {'peak RSS MiB':>13} "
        f"{'anon MiB':>9} {'rc':>3}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in runs:
        out = f"{r.out_bytes / MB:9.1f}" if r.out_bytes is not None else f"{'-':>9}"
        outr = f"{r.out_bytes / MB / r.wall_s:9.1f}" if r.out_bytes is not None and r.wall_s else f"{'-':>9}"
        print(
            f"{r.name:32} {r.wall_s:8.2f} {size / MB / r.wall_s:10.1f} {out} {outr} "
            f"{r.hwm_kib / 1024:13.1f} {r.peak_anon_kib / 1024:9.1f} {r.rc:3d}"
        )
    print("snap MB/s: snapshot bytes / wall; out: compressed file (zstd), device bytes written (write),")
    print("vmcore file blocks (recover); 1 MB = 10^6 bytes. peak RSS: the child's VmHWM (includes mapped")
    print("snapshot pages); anon: peak RssAnon (its own memory); both sampled from /proc every 20 ms.")


if __name__ == "__main__":
    sys.exit(main())
