"""Guest timings: boot to ready, panic to event, event to Snapshot; image size.

Real QEMU, real Linux stand-in guest (``make guest-image``). For each RAM
size, one session is booted and cycled ``--runs`` times through
panic -> capture -> reset; medians are printed. Baselines measured in the
same run, on the same paused guest: QEMU's own ``dump-guest-memory`` (ELF)
and the ``pmemsave`` fallback, i.e. what the zero-copy capture replaces.

The accelerator is chosen as the harness does (``auto``: KVM only after a
probe boot proves it); the probe's verdict is printed. When KVM passes, the
table is repeated under KVM.

Usage: ``python3 bench/guest_timings.py [--runs 5] [--sizes 512,4096] [--trigger sysrq]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.controller import GuestSession  # noqa: E402
from harness.errors import HarnessError  # noqa: E402
from harness.guests import get_profile  # noqa: E402
from harness.qemu.accel import choose_accel  # noqa: E402
from harness.qemu.capture import dump_elf  # noqa: E402


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):8.1f}" if xs else "       -"


def spread(xs: list[float]) -> str:
    return f"{min(xs):.1f}-{max(xs):.1f}" if xs else "-"


def measure(accel: str, mem: int, runs: int, trigger: str, baseline: bool, work: Path) -> dict[str, list[float]]:
    r: dict[str, list[float]] = {
        k: []
        for k in (
            "boot",
            "reset",
            "event",
            "stop",
            "capture",
            "event_to_snapshot",
            "qemu_ts_to_snapshot",
            "elf_dump",
            "pmemsave",
        )
    }
    with GuestSession("linux", mem_mib=mem, accel=accel, workdir=work / f"{accel}-{mem}") as s:
        b = s.boot()
        r["boot"].append(b.seconds * 1000)
        for i in range(runs):
            p = s.panic(trigger)
            t0 = time.monotonic()
            snap = s.capture()
            cap = (time.monotonic() - t0) * 1000
            snap.close()
            r["event"].append(p.event_latency_ms)
            r["stop"].append(p.stop_ms)
            r["capture"].append(cap)
            r["event_to_snapshot"].append(p.stop_ms + cap)
            r["qemu_ts_to_snapshot"].append(s.timings["event_to_snapshot"] * 1000)
            if baseline and i == 0:
                elf = work / f"dump-{mem}.elf"
                t0 = time.monotonic()
                s.call(dump_elf(s.m, elf))
                r["elf_dump"].append((time.monotonic() - t0) * 1000)
                os.chmod(elf, 0o600)
                elf.unlink()
                t0 = time.monotonic()
                slow = s.capture("pmemsave")
                r["pmemsave"].append((time.monotonic() - t0) * 1000)
                slow.close()
            b = s.reset()  # after every panic: n resets for a median of n
            r["reset"].append(b.seconds * 1000)
    return r


def fresh_boots(accel: str, runs: int, work: Path, mem: int) -> list[float]:
    out = []
    for i in range(runs):
        with GuestSession("linux", mem_mib=mem, accel=accel, workdir=work / f"boot-{accel}-{mem}-{i}") as s:
            out.append(s.boot().seconds * 1000)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sizes", default="512,4096", help="guest RAM sizes in MiB, comma separated")
    ap.add_argument("--trigger", default="sysrq")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()
    try:
        prof = get_profile("linux")
        prof.check_image()
    except HarnessError as e:
        print(f"guest_timings: skipped: {e}")
        return 0
    man = prof.manifest  # type: ignore[attr-defined]
    img = man["vmlinuz"]["size"] + man["initramfs"]["size"]
    print(
        f"guest image: {man['kernel_package']['name']} {man['kernel_package']['version']}; "
        f"vmlinuz {man['vmlinuz']['size'] / 2**20:.1f} MiB + initramfs {man['initramfs']['size'] / 2**20:.1f} MiB "
        f"(uncompressed {man['initramfs']['uncompressed_size'] / 2**20:.1f} MiB) = {img / 2**20:.1f} MiB"
    )
    t0 = time.monotonic()
    accel, why = choose_accel("auto", prof)
    print(f"KVM probe: {'passed' if accel == 'kvm' else 'failed'} ({why}); probe step {time.monotonic() - t0:.1f} s")
    accels = ["tcg"] + (["kvm"] if accel == "kvm" else [])
    sizes = [int(x) for x in args.sizes.split(",") if x]
    with tempfile.TemporaryDirectory(prefix="pd-bench-guest-") as tmp:
        work = Path(tmp)
        for acc in accels:
            for mem in sizes:
                boots = fresh_boots(acc, args.runs, work, mem)
                print(
                    f"\n[{acc}] boot to ready (new QEMU, {mem} MiB, cont -> ready line), ms: "
                    f"median {statistics.median(boots):.0f} (range {spread(boots)}, n={len(boots)})"
                )
            print(f"\n[{acc}] trigger {args.trigger}, medians of {args.runs} (ms); baselines once per size")
            print(
                f"{'RAM MiB':>8} {'reset->ready':>12} {'trig->event':>11} {'event->stop':>11} "
                f"{'capture':>8} {'event->Snapshot':>15} {'QEMU ts->Snap':>13} {'ELF dump':>9} {'pmemsave':>9}"
            )
            for mem in sizes:
                r = measure(acc, mem, args.runs, args.trigger, not args.no_baseline, work)
                print(
                    f"{mem:>8} {med(r['reset']):>12} {med(r['event']):>11} {med(r['stop']):>11} "
                    f"{med(r['capture']):>8} {med(r['event_to_snapshot']):>15} "
                    f"{med(r['qemu_ts_to_snapshot']):>13} {med(r['elf_dump']):>9} "
                    f"{med(r['pmemsave']):>9}"
                )
    print(
        "\nevent->Snapshot = from GUEST_PANICKED received: wait for the panic's last console line + stop + "
        "capture (registers, notes, layout, zero-copy RAM view).\nQEMU ts->Snap = from the event's QEMU "
        "timestamp to the Snapshot (includes QMP delivery).\nELF dump / pmemsave: QEMU writing all RAM to a file (the baseline the "
        "zero-copy capture avoids)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
