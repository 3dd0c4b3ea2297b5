"""progdump against the dump tools of the field, side by side on one captured snapshot (issue 13).

One real Linux guest (QEMU TCG) with the issue's memory mix is booted,
filled, panicked with sysrq and captured; then, on that one machine state:

* QEMU ``dump-guest-memory`` (``elf`` and ``kdump-zlib``) from the paused
  guest itself, timed around the QMP command plus an fsync of its output,
  CPU time from QEMU's own ``/proc/PID/stat`` (peak RSS: not separable from
  the guest's RAM, shown as ``-``);
* makedumpfile 1.7.2 (``-d 31 -c``, ``-d 31 -l``, ``-d 1 -l``, ``-d 1 -l
  --num-threads 2``) and progdump (``write`` both plans, ``recover``) as
  child processes on the snapshot saved as an ELF core by progdump's own
  ELF writer (``progdump.elfcore.save_elf_snapshot``: QEMU 7.2's own ELF puts its program
  headers at 0xc0, which makedumpfile 1.7.2 refuses; a copy in the standard
  layout is what makedumpfile needs, see docs/BENCHMARKS.md);
* wall time from process start to exit, plus an fsync of the output file
  (progdump's device flushes itself: its fsync is inside its wall time),
  CPU time (``wait4`` rusage), peak RSS (sampled VmHWM), output size;
* for progdump: each layer's durable time from the device opening (what it
  prints) and an upper bound from its process start (wall minus the time
  between the layer's commit and the writer's end);
* the resident writer (``python -m progdump.resident``, armed before the
  panic, handed the RAM file and registers): layer times from its go line;
* ratios against the fastest peer that keeps every non-zero page.

The memory mix, scaled from the issue's 2 GiB guest: page cache 60 % of RAM (50 % below 2 GiB)
(a third random bytes, a third text, a third zero pages), anonymous memory
1/8 of RAM. ``--mem-mib 512`` is the quick mode; the default is 2048.
Contenders take turns in every round; medians of ``--repeat`` rounds.
JSON in ``bench/results/peers-<MiB>m.json``.

Exit status non-zero only when something failed to run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / ".cache" / "bench"
MB = 1e6


@dataclass
class Run:
    name: str
    wall_s: float
    cpu_s: float
    hwm_kib: int
    out_bytes: int
    rc: int = 0
    walls: list[float] = field(default_factory=list)
    #: progdump write only: layer -> (durable s from device open, upper bound from process start)
    layers: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""


class _Hwm(threading.Thread):
    """Sample a child's VmHWM every 10 ms (ru_maxrss carries the parent's mark across exec)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.hwm, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.hwm = max(self.hwm, int(line.split()[1]))
            except (OSError, ValueError):
                pass
            self.stop.wait(0.01)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_child(name: str, argv: list[str], out: Path | None, log: Path) -> tuple[Run, str]:
    """Wall (start to exit, plus fsync of ``out``), CPU, peak RSS, output bytes (allocated blocks)."""
    with open(log, "wb") as f:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        hwm = _Hwm(p.pid)
        hwm.start()
        _, status, ru = os.wait4(p.pid, 0)
        if out is not None and out.exists():
            fsync_path(out)
        wall = time.perf_counter() - t0
        hwm.stop.set()
        hwm.join()
    p.returncode = rc = os.waitstatus_to_exitcode(status)
    size = out.stat().st_blocks * 512 if out is not None and out.exists() else 0
    text = log.read_text(errors="replace")
    return Run(name, wall, ru.ru_utime + ru.ru_stime, hwm.hwm, size, rc), text


def progdump_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "progdump", *args]


def byte_compile() -> None:
    """Compile progdump's modules to bytecode once, as ``pip install`` does for an installed package.

    Why: this environment sets PYTHONDONTWRITEBYTECODE=1 and runs progdump from a source tree, so
    without this every ``python -m progdump`` recompiles each module it imports (about 90 ms of a
    write's start measured here), a cost no installed progdump pays.
    """
    import compileall  # noqa: PLC0415

    compileall.compile_dir(str(ROOT / "progdump"), quiet=1)


def kernel_layer(layers: dict[str, list[float]]) -> list[float] | None:
    """The times of the layer holding the kernel pages makedumpfile -d 31 keeps (index 2 or 1 by plan)."""
    return next((v for k, v in layers.items() if k.split()[-1:] == ["kernel"] or k == "kernel"), None)


# ---------------------------------------------------------------------------
# the guest and QEMU's own dumps

MIX_SCRIPT = """\
set -e
mkdir -p /pdcache/mix; cd /pdcache/mix
dd if=/dev/urandom of=random bs=1048576 count={third} 2>/dev/null
: > text; while [ $(stat -c %s text) -lt $(( {third} * 1048576 )) ]; do cat /proc/kallsyms >> text; done
dd if=/dev/zero of=zero bs=1048576 count={third} 2>/dev/null
cat random text zero > /dev/null
"""


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def capture(mem_mib: int, work: Path, repeat: int, elf: Path) -> tuple[dict, list[Run]]:
    """Boot, fill, panic, capture; time QEMU's dumps on the paused guest; save the snapshot ELF."""
    from harness.controller import GuestSession  # noqa: PLC0415
    from progdump.elfcore import save_elf_snapshot  # noqa: PLC0415

    third = max(8, int(mem_mib * (0.6 if mem_mib >= 2048 else 0.5) / 3))
    anon = max(16, mem_mib // 8)
    qruns: dict[str, list[Run]] = {}
    info: dict = {"mem_mib": mem_mib, "page_cache_mib": 3 * third, "anon_mib": anon}
    with GuestSession("linux", mem_mib=mem_mib, workdir=work / "guest") as s:
        s.boot()
        t = time.perf_counter()
        s.workload("anon", anon, timeout=600)  # first: its source file needs room in tmpfs for a moment
        s.run(MIX_SCRIPT.format(third=third), timeout=1200, check=True)
        info["fill_s"] = round(time.perf_counter() - t, 1)
        s.panic("sysrq")
        snap = s.capture()
        try:
            t = time.perf_counter()
            save_elf_snapshot(snap, elf)
            info["to_elf_s"] = round(time.perf_counter() - t, 2)
        finally:
            snap.close()
        m = s.m
        qpid = m.proc.pid  # type: ignore[union-attr]
        for _ in range(repeat):
            for fmt in ("elf", "kdump-zlib"):
                out = work / f"qemu-{fmt}.out"
                out.unlink(missing_ok=True)
                c0 = _proc_cpu(qpid)
                t0 = time.perf_counter()
                s.call(m.execute("dump-guest-memory", {"paging": False, "protocol": f"file:{out}", "format": fmt},
                                 timeout=600))  # fmt: skip
                fsync_path(out)
                wall = time.perf_counter() - t0
                r = Run(f"qemu dump-guest-memory {fmt}", wall, _proc_cpu(qpid) - c0, 0, out.stat().st_blocks * 512,
                        note="from the paused guest; CPU of the QEMU process")  # fmt: skip
                qruns.setdefault(r.name, []).append(r)
                os.chmod(out, 0o600)
                out.unlink()
    return info, [combine(rs) for rs in qruns.values()]


# ---------------------------------------------------------------------------
# tools on the snapshot ELF

MDF = {
    "makedumpfile -d 31 -c": ["-d", "31", "-c"],
    "makedumpfile -d 31 -l": ["-d", "31", "-l"],
    "makedumpfile -d 1 -l": ["-d", "1", "-l"],
    "makedumpfile -d 1 -l --num-threads 2": ["-d", "1", "-l", "--num-threads", "2"],
}

_LAYER = re.compile(r"^layer (\d+) (\S+) durable at ([\d.]+) (ms|s),", re.M)


def run_makedumpfile(name: str, flags: list[str], elf: Path, work: Path) -> Run:
    out = work / "mdf.out"
    out.unlink(missing_ok=True)
    r, text = run_child(name, ["makedumpfile", *flags, str(elf), str(out)], out, work / "mdf.log")
    if r.rc != 0:
        r.note = text.strip().splitlines()[-1:][0] if text.strip() else ""
    out.unlink(missing_ok=True)
    return r


def run_progdump(plan: str, elf: Path, work: Path, dev_size: int) -> tuple[Run, Run | None]:
    dev = work / f"dev-{plan}.img"
    dev.unlink(missing_ok=True)
    with open(dev, "wb") as f:
        f.truncate(dev_size)
    w, text = run_child(f"progdump write --plan {plan}",
                        progdump_argv("write", str(elf), str(dev), "--plan", plan, "--device-model", "none", "--json"),
                        None, work / "pd-write.log")  # fmt: skip
    w.out_bytes = dev.stat().st_blocks * 512
    if w.rc != 0:
        w.note = text[-300:]
        return w, None
    try:
        res = json.loads(text[text.index("{\n") :])
        elapsed = float(res["elapsed_s"])
        for lay in res["layers"]:
            if lay["durable_s"] is not None:
                d = float(lay["durable_s"])
                w.layers[f"{lay['index']} {lay['name']}"] = [d, w.wall_s - (elapsed - d)]
    except (ValueError, KeyError) as e:
        w.note = f"unreadable --json output: {e}"
    outdir = work / f"rec-{plan}"
    shutil.rmtree(outdir, ignore_errors=True)
    rec, text = run_child(f"progdump recover ({plan})", progdump_argv("recover", str(dev), str(outdir)), None,
                          work / "pd-rec.log")  # fmt: skip
    vm = outdir / "vmcore"
    if vm.exists():
        fsync_path(vm)
        rec.out_bytes = vm.stat().st_blocks * 512
    elif rec.rc == 0:
        rec.rc, rec.note = 1, "no vmcore recovered"
    shutil.rmtree(outdir, ignore_errors=True)
    dev.unlink(missing_ok=True)
    return w, rec


PLANS = ("progressive", "progressive-raw", "raw-kernel", "monolithic")
RESIDENT_PLANS = ("progressive-raw", "raw-kernel")
RESIDENT = "progdump resident (armed) {plan}"


def run_resident(go: dict, elf: Path, work: Path, dev_size: int, plan: str) -> Run:
    """The writer armed before the panic (progdump.resident), timed from its go line to the last layer."""
    from resident_layer0 import one  # noqa: PLC0415

    r = one(go, "none", plan, work, dev_size)
    layers = {k: [v, v] for k, v in sorted(r["go_to_layer_s"].items())}
    last = max(v for v, _ in layers.values())
    return Run(
        RESIDENT.format(plan=plan),
        last,
        0.0,
        0,
        0,
        layers={f"{k}": v for k, v in layers.items()},
        note="wall and layer times from the go line (registers + RAM file handed over); CPU/RSS not sampled",
    )


def combine(rs: list[Run]) -> Run:
    walls = sorted(r.wall_s for r in rs)
    last = rs[-1]
    layers = {k: [statistics.median(r.layers[k][i] for r in rs if k in r.layers) for i in (0, 1)]
              for k in last.layers}  # fmt: skip
    return Run(last.name, statistics.median(walls), statistics.median(r.cpu_s for r in rs), max(r.hwm_kib for r in rs),
               last.out_bytes, max((r.rc for r in rs), key=abs), walls, layers, last.note)  # fmt: skip


def print_table(runs: list[Run], mem: int) -> None:
    hdr = f"{'':44} {'wall s':>7} {'CPU s':>6} {'RSS MiB':>8} {'out MB':>8} {'rc':>3}"
    print(hdr)
    print("-" * len(hdr))
    for r in runs:
        rss = f"{r.hwm_kib / 1024:8.1f}" if r.hwm_kib else f"{'-':>8}"
        print(f"{r.name:44} {r.wall_s:7.2f} {r.cpu_s:6.2f} {rss} {r.out_bytes / MB:8.1f} {r.rc:3d}")
        for k, (d_open, d_start) in r.layers.items():
            if r.name.startswith("progdump resident"):
                print(f"    layer {k:14} durable {d_open * 1e3:8.1f} ms from go")
            else:
                print(
                    f"    layer {k:14} durable {d_open * 1e3:8.1f} ms from device open,"
                    f" <= {d_start * 1e3:8.1f} ms from start"
                )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mem-mib", type=int, default=2048, help="guest RAM (default 2048; 512 is the quick mode)")
    ap.add_argument("--quick", action="store_true", help="same as --mem-mib 512")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--reuse", action="store_true", help="reuse a cached snapshot ELF (QEMU rows from its sidecar)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--skip", action="append", default=[], metavar="TEXT",
                    help="leave out contenders whose name contains TEXT ('num-threads': 50 s at 2 GiB)")  # fmt: skip
    a = ap.parse_args()
    mem = 512 if a.quick else a.mem_mib
    for tool in ("makedumpfile", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: make setup installs it", file=sys.stderr)
            return 1
    CACHE.mkdir(parents=True, exist_ok=True)
    elf = CACHE / f"peers-{mem}m.elf"
    side = elf.with_suffix(".json")
    work = Path(tempfile.mkdtemp(prefix="peers-", dir=CACHE))
    failures: list[str] = []
    try:
        if a.reuse and elf.exists() and side.exists():
            cached = json.loads(side.read_text())
            info, qemu = cached["info"], [Run(**r) for r in cached["qemu"]]
            print(f"reusing {elf} (captured {cached['when']})")
        else:
            t = time.perf_counter()
            info, qemu = capture(mem, work, a.repeat, elf)
            print(f"guest {mem} MiB captured and QEMU's dumps timed in {time.perf_counter() - t:.0f} s: {info}")
            side.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "info": info,
                                        "qemu": [asdict(r) for r in qemu]}))  # fmt: skip
        byte_compile()
        with open(elf, "rb", buffering=0) as f:  # warm: every tool starts with the snapshot cached
            while f.read(8 << 20):
                pass
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from resident_layer0 import go_message  # noqa: PLC0415

        go = go_message(elf)
        rounds: dict[str, list[Run]] = {}
        dev_size = mem * (1 << 20) * 5 // 4 + (64 << 20)
        for _ in range(a.repeat):
            for name, flags in MDF.items():
                if any(t in name for t in a.skip):
                    continue
                rounds.setdefault(name, []).append(run_makedumpfile(name, flags, elf, work))
            for plan in PLANS:
                w, rec = run_progdump(plan, elf, work, dev_size)
                rounds.setdefault(w.name, []).append(w)
                if rec is not None:
                    rounds.setdefault(rec.name, []).append(rec)
            for plan in RESIDENT_PLANS:
                r = run_resident(go, elf, work, dev_size, plan)
                rounds.setdefault(r.name, []).append(r)
        runs = qemu + [combine(rs) for rs in rounds.values()]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in runs:
        if r.rc != 0:
            failures.append(f"{r.name} exited {r.rc}: {r.note}")
    print(f"\n{mem} MiB guest, snapshot {elf.stat().st_size / MB:.0f} MB ELF; medians of {a.repeat}; "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")  # fmt: skip
    print_table(runs, mem)
    by = {r.name: r for r in runs}
    ratios: dict[str, float] = {}
    mono = by.get("progdump write --plan monolithic")
    full_peers = [r for r in runs if r.rc == 0 and (r.name.startswith("makedumpfile -d 1") or "qemu" in r.name)]
    best = min(full_peers, key=lambda r: r.wall_s) if full_peers else None
    m31 = by.get("makedumpfile -d 31 -l")
    print()
    for plan in PLANS[:3]:
        prog = by.get(f"progdump write --plan {plan}")
        if prog is None or prog.rc != 0:
            continue
        if best:
            ratios[f"{plan}: fastest full peer wall / progdump wall"] = best.wall_s / prog.wall_s
            ratios[f"{plan}: progdump size / fastest full peer size"] = prog.out_bytes / best.out_bytes
            print(f"target 1 ({plan}): {best.wall_s / prog.wall_s:.2f}x the speed of {best.name} "
                  f"({best.wall_s:.2f} s vs {prog.wall_s:.2f} s; >= 1.5x wanted), "
                  f"size {prog.out_bytes / best.out_bytes:.2f} of it (<= 1 wanted)")  # fmt: skip
        if mono:
            ratios[f"{plan}: progressive / monolithic wall"] = prog.wall_s / mono.wall_s
            print(f"target 4 ({plan}): / monolithic wall {prog.wall_s / mono.wall_s:.3f} (<= 1.05 wanted)")
        l2 = kernel_layer(prog.layers)
        if l2 and m31:
            ratios[f"{plan}: kernel layer from process start / makedumpfile -d 31 -l wall"] = l2[1] / m31.wall_s
            print(f"target 2 ({plan}): kernel layer durable <= {l2[1] * 1e3:.0f} ms from process start; "
                  f"makedumpfile -d 31 -l {m31.wall_s * 1e3:.0f} ms "
                  f"(<= 1.0x wanted: {l2[1] / m31.wall_s:.2f}x)")  # fmt: skip
    for plan, kidx in (("progressive-raw", "2"), ("raw-kernel", "1")):
        res = by.get(RESIDENT.format(plan=plan))
        if res and m31 and kidx in res.layers:
            k = res.layers[kidx][0]
            ratios[f"armed {plan}: makedumpfile -d 31 -l wall / kernel layer from go"] = m31.wall_s / k
            print(f"target 2 (armed writer, {plan}): kernel layer durable {k * 1e3:.0f} ms after go: "
                  f"{m31.wall_s / k:.2f}x sooner than makedumpfile -d 31 -l completes (>= 1.5x wanted); "
                  f"layer 0 {res.layers['0'][0] * 1e3:.1f} ms after go")  # fmt: skip
    result = {
        "bench": "peers",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "loadavg": os.getloadavg(),
        },  # fmt: skip
        "guest": info,
        "repeat": a.repeat,
        "runs": [asdict(r) for r in runs],
        "ratios": ratios,
        "failures": failures,
    }
    out = a.json or RESULTS / f"peers-{mem}m.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"figures saved to {out}")
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
