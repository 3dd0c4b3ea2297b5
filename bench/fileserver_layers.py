"""Fileserver layers: how much sooner a debugger-ready dump exists.

Real QEMU (TCG), real Linux stand-in guest with ``pdarc`` (a ZFS ARC
stand-in: slab caches named like ZFS's, filled to ``--fill`` of RAM with
incompressible records, as a compressed ARC holds them), plus page cache
(RAM/10) and user memory (RAM/32); sysrq panic; captured. Then, on that same
snapshot, the real writer (``write_dump``) paced by each device model
(progdump/device-models.toml; real time, sleeps included) writes it with the
``fileserver``, ``progressive`` and ``monolithic`` plans, ``--repeat`` times
each. Printed per plan and device: each layer's pages, device bytes and the
time it became durable (median, min-max over the repeats), then the summary:
when a dump a debugger can open exists (fileserver: ``kstruct``; progressive:
``kernel``; monolithic: its only layer).

Usage::

    python3 bench/fileserver_layers.py [--sizes 512,4096] [--models hdd,nvme,slow] [--repeat 3]
        [--snapshot-dir DIR]   # keep / reuse captured snapshots (fileserver-<MiB>.elf)
        [--deadline slow=120]  # cut long writes; layers not durable by then are projected from their bytes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from progdump.devmodel import open_device  # noqa: E402
from progdump.elfcore import load_elf_snapshot, save_elf_snapshot  # noqa: E402
from progdump.snapshot import Snapshot  # noqa: E402
from progdump.writer import write_dump  # noqa: E402

PLANS = ("fileserver", "progressive", "monolithic")
READY = {"fileserver": "kstruct", "progressive": "kernel", "monolithic": "all"}


def capture(mib: int, fill: float, path: Path) -> None:
    from harness.controller import GuestSession
    from harness.guests import get_profile

    extra = get_profile("linux").manifest.get("extra_modules", {}).get("pdarc") or {}
    if not extra.get("path"):
        raise SystemExit(f"guest image has no pdarc module ({extra.get('note')}): python3 guest-images/linux/build.py")
    with tempfile.TemporaryDirectory(prefix="pd-fs-") as d:
        with GuestSession("linux", mem_mib=mib, dump_disk=Path(d) / "dump.img", workdir=Path(d)) as s:
            t0 = time.monotonic()
            s.boot()
            t1 = time.monotonic()
            arc = s.run(
                f"insmod {extra['path']} && echo 'fill {round(fill * 100)}' > /proc/pdarc && head -1 /proc/pdarc",
                timeout=3600,
                check=True,
            ).text.strip()
            t2 = time.monotonic()
            s.workload("pagecache", mib // 10, timeout=3600)
            s.workload("anon", mib // 32, timeout=3600)
            s.panic("sysrq")
            snap = s.capture()
            save_elf_snapshot(snap, path)
            snap.close()
            print(f"{mib} MiB guest: boot {t1 - t0:.1f} s, ARC fill {t2 - t1:.1f} s ({arc}), captured to {path}")


def write_once(
    snap: Snapshot, plan: str, model: str, work: Path, deadline: float | None = None
) -> list[tuple[str, int, int, float | None]]:
    img = work / "dev.img"
    with open(img, "wb") as f:
        f.truncate(snap.total_bytes + (snap.total_bytes >> 2) + (64 << 20))
    dev = open_device(str(img), model)
    try:
        res = write_dump(snap, dev, plan=plan, deadline=deadline)
    finally:
        dev.close()
        img.unlink()
    if res.stopped not in ("done", "deadline"):
        raise SystemExit(f"{plan} on {model}: writer stopped ({res.stopped}: {res.error})")
    return [(lay.name, lay.pages, lay.bytes, lay.durable_s) for lay in res.layers]


def fmt(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def run(snap_path: Path, mib: int, models: list[str], repeat: int, deadlines: dict[str, float]) -> None:
    snap = load_elf_snapshot(str(snap_path))
    # warm: the first pass over a fresh ELF's pages costs page faults that would land in one writer's times
    for r in snap.ranges:
        bytes(r.buffer[::4096])
    print(
        f"\n== fileserver-panic, {mib} MiB guest ({snap.total_bytes >> 20} MiB in the snapshot), "
        f"{repeat} writes per plan and device =="
    )
    ready: dict[tuple[str, str], list[float]] = {}
    ready_bytes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="pd-fsbench-", dir=str(snap_path.parent)) as d:
        for model in models:
            for plan in PLANS:
                runs = [write_once(snap, plan, model, Path(d), deadlines.get(model)) for _ in range(repeat)]
                cut = f" (writer deadline {deadlines[model]:.0f} s)" if model in deadlines else ""
                print(f"\n{model:5s} {plan}{cut}:")
                print(f"  {'layer':10s} {'pages':>8s} {'device MiB':>11s}  durable at s (median, min-max)")
                for i, (name, pages, nbytes, _) in enumerate(runs[0]):
                    times = [r[i][3] for r in runs if r[i][3] is not None]
                    print(f"  {name:10s} {pages:8d} {nbytes / 2**20:11.1f}  {fmt(times) if times else '-'}")
                    if name == READY[plan]:
                        ready[(model, plan)] = times
                        if len(times) == len(runs):
                            ready_bytes.setdefault(plan, sum(r[3] is not None and r[2] or 0 for r in runs[0][: i + 1]))
    snap.close()
    print(
        f"\ndebugger-ready dump durable at (s, median of {repeat}): fileserver kstruct / progressive kernel / "
        "monolithic; how much sooner"
    )
    from progdump.devmodel import load_models

    for model in models:
        got = {x: ready[(model, x)] for x in PLANS}
        if all(len(v) == repeat for v in got.values()):
            f, p, m = (statistics.median(got[x]) for x in PLANS)
            print(
                f"  {model:5s} {f:8.2f} / {p:8.2f} / {m:8.2f}   {p / f:5.1f}x sooner than progressive, "
                f"{m / f:5.1f}x sooner than monolithic"
            )
            continue
        bw = load_models()[model].bandwidth
        cells = []
        for x in PLANS:
            if len(got[x]) == repeat:
                cells.append(f"{statistics.median(got[x]):.2f}")
            else:  # not durable before the deadline: what its bytes need at the model's bandwidth
                b = ready_bytes.get(x)
                cells.append(
                    f">{deadlines[model]:.0f} (its {b / 2**20:.0f} MiB at {bw / 1e6:.0f} MB/s: ~{b / bw:.0f})"
                    if b
                    else f">{deadlines[model]:.0f}"
                )
        print(f"  {model:5s} " + " / ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="512", help="guest RAM sizes in MiB, comma-separated")
    ap.add_argument("--models", default="hdd,nvme,slow")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--fill", type=float, default=0.6, help="share of RAM the ARC stand-in fills")
    ap.add_argument("--snapshot-dir", type=Path, help="keep captured snapshots here and reuse them")
    ap.add_argument(
        "--deadline",
        action="append",
        default=[],
        metavar="MODEL=SECONDS",
        help="stop the writer after SECONDS on MODEL (a 4 GiB dump takes ~12 min at 4 MB/s); "
        "layers not durable by then are shown as '>SECONDS' with their bytes at the model's bandwidth",
    )
    a = ap.parse_args()
    sdir = a.snapshot_dir or Path(tempfile.mkdtemp(prefix="pd-fs-snap-"))
    sdir.mkdir(parents=True, exist_ok=True)
    for mib in (int(x) for x in a.sizes.split(",")):
        path = sdir / f"fileserver-{mib}.elf"
        if not path.exists():
            capture(mib, a.fill, path)
        deadlines = {m: float(v) for m, v in (d.split("=", 1) for d in a.deadline)}
        run(path, mib, a.models.split(","), a.repeat, deadlines)


if __name__ == "__main__":
    main()
