"""``python -m harness boot|panic|capture|shell|report --guest linux``: the guest by hand.

``report --guest omnios FILE`` reads a recorded console log and prints one
JSON object (panic cpu, thread, message, frames, dump progress); no QEMU.

Each step prints its duration. ``capture --out core.elf`` writes the snapshot
as an ELF core (what the Linux producer's tests read). ``--show-command``
prints the QEMU command line and exits without starting anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from harness.errors import HarnessError
from progdump.elfcore import save_elf_snapshot

__all__ = ["main"]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m harness", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "verb",
        choices=("boot", "panic", "capture", "shell"),
        help="boot: boot to ready and quit; panic: boot, panic, report; capture: boot, panic, "
        "capture (and --out); shell: boot and run commands typed on stdin",
    )
    ap.add_argument(
        "--guest", default=os.environ.get("GUEST") or "linux", help="guest profile (default: $GUEST or linux)"
    )
    ap.add_argument("--mem", type=int, default=512, help="guest RAM in MiB (default 512)")
    ap.add_argument("--smp", type=int, default=1)
    ap.add_argument("--accel", default="auto", choices=("auto", "tcg", "kvm"))
    ap.add_argument(
        "--trigger",
        help="panic trigger (linux: sysrq, nmi, oops, hung-task, init-exit; "
        "omnios: uadmin, dtrace, nmi); default: the guest's first",
    )
    ap.add_argument(
        "--method",
        default="auto",
        choices=("auto", "shared", "pmemsave", "elf"),
        help="capture method (auto: zero-copy shared RAM)",
    )
    ap.add_argument("--out", type=Path, help="capture: write the snapshot as an ELF core here")
    ap.add_argument("--markers", type=Path, help="write the guest's ground-truth markers (JSON) here")
    ap.add_argument("--dump-disk", type=Path, help="raw image attached as the guest's dump disk")
    ap.add_argument(
        "--workdir", type=Path, help="logs (console.log, qemu.log); default a private new directory (mkdtemp)"
    )
    ap.add_argument(
        "--knob", action="append", default=[], metavar="K=V", help="guest setting, e.g. panic_print=0x1 (repeatable)"
    )
    ap.add_argument(
        "--workload",
        action="append",
        default=[],
        metavar="CMD",
        help="shell command to run in the guest before the panic (repeatable)",
    )
    ap.add_argument(
        "--load",
        action="append",
        default=[],
        metavar="KIND=N",
        help="workload before the panic: pagecache=MiB, anon=MiB, slab=entries (repeatable)",
    )
    ap.add_argument("--ssh", action="store_true", help="forward a local port to the guest's dropbear")
    ap.add_argument("--show-command", action="store_true", help="print the QEMU command line and exit")
    ap.add_argument("-q", "--quiet", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        from harness.consolereport.cli import report_main

        return report_main(argv[1:])
    args = _parse(argv)
    from harness.controller import GuestSession
    from harness.qemu.argv import format_argv

    knobs = {}
    for kv in args.knob:
        k, sep, v = kv.partition("=")
        if not sep:
            print(f"--knob {kv!r}: expected K=V", file=sys.stderr)
            return 2
        knobs[k] = v
    log = (lambda s: None) if args.quiet else _say
    try:
        session = GuestSession(
            args.guest,
            mem_mib=args.mem,
            smp=args.smp,
            dump_disk=args.dump_disk,
            workdir=args.workdir,
            accel=args.accel,
            knobs=knobs,
            ssh=args.ssh,
            log=log,
        )
        args.trigger = args.trigger or session.profile.triggers[0]
        if args.verb in ("panic", "capture") and args.trigger not in session.profile.triggers:
            raise ValueError(
                f"unknown trigger {args.trigger!r} for {args.guest} (known: {', '.join(session.profile.triggers)})"
            )
        if args.show_command:
            print(format_argv(session.command_line()))
            return 0
        t0 = time.monotonic()
        with session as s:
            b = s.boot()
            _say(f"ready: boot id {b.boot_id}, {b.seconds:.2f} s from cont (accel {s.accel}: {s.accel_reason})")
            if args.markers:
                args.markers.write_text(json.dumps(s.markers, indent=2) + "\n")
            if s.ssh_port:
                _say(f"ssh: ssh -p {s.ssh_port} -i {s.profile.image_dir}/ssh/id_ed25519 root@127.0.0.1")  # type: ignore[attr-defined]
            for spec in args.load:
                kind, _, n = spec.partition("=")
                if not n.isdigit():
                    raise ValueError(f"--load {spec!r}: expected KIND=N with N a number")
                r = s.workload(kind, int(n))
                _say(f"load {kind} {n}: {r.seconds * 1000:.0f} ms")
            for cmd in args.workload:
                r = s.run(cmd)
                _say(f"workload {cmd!r}: status {r.status}, {r.seconds * 1000:.0f} ms")
            if args.verb == "shell":
                return _shell(s)
            if args.verb in ("panic", "capture"):
                p = s.panic(args.trigger)
                seen = "GUEST_PANICKED" if session.profile.panic_detection == "event" else "panic line on the console"
                _say(
                    f"panic ({p.trigger}): {seen} {p.event_latency_ms:.1f} ms after the trigger, "
                    f"stopped {p.stop_ms:.1f} ms later, status {p.status}; "
                    f'"{p.panic_string}"; console complete: {p.console_complete}'
                )
            if args.verb == "capture":
                snap = s.capture(args.method)
                try:
                    _say(
                        f"snapshot: {snap.total_bytes / 2**20:.0f} MiB in {len(snap.ranges)} ranges, "
                        f"{len(snap.cpus)} CPUs, VMCOREINFO {'yes' if snap.vmcoreinfo_raw else 'NO'}, "
                        f"{snap.metadata.get('capture_method')}, {s.timings['capture'] * 1000:.1f} ms"
                    )
                    if args.out:
                        t1 = time.monotonic()
                        save_elf_snapshot(snap, args.out)
                        _say(f"wrote {args.out} in {time.monotonic() - t1:.2f} s")
                finally:
                    snap.close()
            _say("timings (ms): " + ", ".join(f"{k} {v * 1000:.0f}" for k, v in s.timings.items()))
        _say(f"total {time.monotonic() - t0:.2f} s; logs in {session.workdir}")
        return 0
    except HarnessError as e:
        print(f"harness: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"harness: {e}", file=sys.stderr)
        return 2


def _shell(s: object) -> int:
    """Read commands from stdin, run each in the guest, print output and status."""
    from harness.controller import GuestSession

    assert isinstance(s, GuestSession)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("guest# ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("exit", "quit"):
            return 0
        try:
            r = s.run(line)
        except HarnessError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        sys.stdout.write(r.text)
        if r.status:
            print(f"[status {r.status}]", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
