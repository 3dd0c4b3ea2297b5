"""``progdump`` command line: write, recover, info (and subcommands others register).

Contract (issue 2; other tools rely on it exactly):

* ``progdump write SNAPSHOT DEVICE [--plan progressive|monolithic]
  [--device-model NAME|none] [--trace FILE] [--deadline SECONDS]``:
  SNAPSHOT is an ELF core; DEVICE an existing file or block device large
  enough, else a one-line error and exit 1. Prints one line per layer when it
  is durable (``layer 0 panic durable at 3.1 ms, 41 KiB``) and a progress bar
  on a terminal. Exit 0 when the dump stopped cleanly (done or deadline),
  1 on errors (including a device too small for the whole dump).
* ``progdump recover DEVICE OUTDIR``: exit 0 when a dump was found (even
  partial), 2 when the device holds none, 1 for usage or I/O errors.
* ``progdump info DEVICE [--json]``: the layer table; exit codes as recover.

Every error progdump raises on purpose is a :class:`~progdump.errors.ProgdumpError`:
one line on stderr and the exit status its class names (1 today), never a
traceback (set ``PROGDUMP_TRACEBACK=1`` to see one when debugging). Any
other exception is a bug in progdump: it is not caught, so Python prints
its traceback (exit status 1) for a bug report.

Other modules add subcommands with :func:`register` (``replay``): every entry
point of group ``progdump.cli`` is loaded and its ``register_cli(register)``
called, but only when the command line needs them (a command that is not
built in, or the top-level help): ``write``, ``recover`` and ``info`` start
without importing ``importlib.metadata`` or the harness (issue 13: 35-87 ms
of a ``write``'s start went to plugins it never used).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from progdump.errors import EXIT_ERROR, EXIT_NO_DUMP, EXIT_OK, ProgdumpError

__all__ = ["main", "register", "Subcommand", "SUBCOMMANDS", "BUILTIN"]

#: subcommands defined here: they need no plugin loaded
BUILTIN = ("write", "recover", "info")


@dataclass
class Subcommand:
    name: str
    help: str
    setup: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {}


def register(
    name: str, help: str, setup: Callable[[argparse.ArgumentParser], None], run: Callable[[argparse.Namespace], int]
) -> None:
    """Add (or replace) a subcommand: ``setup`` adds its arguments, ``run`` returns the exit status."""
    SUBCOMMANDS[name] = Subcommand(name, help, setup, run)


class CliError(ProgdumpError):
    """A one-line error for the user; exit status 1."""


# ---------------------------------------------------------------------------
# write


def _setup_write(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "snapshot", metavar="SNAPSHOT", help="ELF core of the machine (QEMU dump-guest-memory, /proc/vmcore)"
    )
    p.add_argument("device", metavar="DEVICE", help="existing file or block device to write the dump to")
    from progdump.layers.plan import PLANS  # noqa: PLC0415 (only when write's arguments are wanted)

    p.add_argument(
        "--plan",
        default="progressive",
        metavar="PLAN",
        help=f"layer plan (progdump/layers/plan.py): {', '.join(PLANS)}; default progressive",
    )
    p.add_argument(
        "--device-model",
        default="none",
        metavar="NAME",
        help="pace as this device model (progdump/device-models.toml) or none",
    )
    p.add_argument("--trace", metavar="FILE", help="keep a write trace (needs --device-model)")
    p.add_argument(
        "--deadline",
        type=float,
        metavar="SECONDS",
        help="stop cleanly after this many seconds; committed layers stay valid",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON at the end")


class _Bar:
    """A one-line progress bar on a terminal (stderr); silent elsewhere."""

    def __init__(self, stream) -> None:  # type: ignore[no-untyped-def]
        self.stream = stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.last = 0.0
        self.shown = False

    def update(self, done: int, total: int, label: str) -> None:
        if not self.tty or total <= 0:
            return
        now = time.monotonic()
        if now - self.last < 0.1:
            return
        self.last = now
        frac = min(1.0, done / total)
        width = 30
        fill = int(frac * width)
        self.stream.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {frac * 100:5.1f}% {label[:30]:<30}")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * 72 + "\r")
            self.stream.flush()
            self.shown = False


def _run_write(a: argparse.Namespace) -> int:
    from progdump.device import MIN_DEVICE_SIZE
    from progdump.devmodel import open_device
    from progdump.elfcore import load_elf_snapshot
    from progdump.layers import PLANS
    from progdump.writer import format_durable_line, write_dump

    if a.plan not in PLANS:
        raise CliError(f"unknown plan {a.plan!r} (known: {', '.join(sorted(PLANS))})")
    if a.deadline is not None and not (a.deadline >= 0):
        raise CliError("--deadline must be a number of seconds >= 0")
    if not os.path.exists(a.device):
        raise CliError(f"{a.device}: no such file or device (it must exist and be large enough)")
    snap = load_elf_snapshot(a.snapshot)  # SnapshotError names what is wrong with the file
    # Overlapping, unaligned or duplicate PT_LOADs were clipped or rounded: say so, never silently.
    for w in snap.load_warnings[:8]:
        print(f"progdump: warning: {a.snapshot}: {w}", file=sys.stderr)
    if len(snap.load_warnings) > 8:
        print(
            f"progdump: warning: {a.snapshot}: {len(snap.load_warnings) - 8} more adjustments of its PT_LOADs",
            file=sys.stderr,
        )
    model = None if a.device_model in (None, "none") else a.device_model
    try:
        dev = open_device(a.device, model, a.trace)
    except BaseException:
        snap.close()
        raise
    if dev.size < MIN_DEVICE_SIZE:  # the format's minimum (R-MAP-1); a larger one stops at device-full
        dev.close()
        snap.close()
        raise CliError(f"{a.device}: {dev.size} bytes, too small for a dump (at least {MIN_DEVICE_SIZE})")
    bar = _Bar(sys.stderr)
    quiet = a.quiet

    def progress(ev) -> None:  # type: ignore[no-untyped-def]
        if ev.kind == "layer-durable" and not quiet:
            bar.clear()
            print(format_durable_line(ev.layer), flush=True)
        elif ev.kind == "write-error":
            bar.clear()
            print(f"progdump: {ev.message}; carrying on past it", file=sys.stderr, flush=True)
        elif ev.kind in ("pages", "layer-start") and not quiet:
            name = ev.layer.name if ev.layer else ""
            bar.update(ev.pages_done, ev.pages_total, f"layer {ev.layer.index} {name}" if ev.layer else "")

    try:
        res = write_dump(snap, dev, plan=a.plan, deadline=a.deadline, progress=progress)
    finally:
        bar.clear()
        try:
            dev.close()
        finally:
            snap.close()
    n_ok = sum(1 for lay in res.layers if lay.committed)
    rate = ""
    if res.stopped == "done" and res.elapsed_s > 0:
        rate = f", {res.snapshot_bytes / res.elapsed_s / 1e6:.0f} MB/s of snapshot"
    if a.json:
        print(json.dumps(res.to_json(), indent=1))
    elif not quiet:
        print(
            f"dump {res.dump_id}: {n_ok}/{len(res.layers)} layers committed ({res.stopped}) in {res.elapsed_s:.2f} s, "
            f"{_human(res.device_bytes)} written{rate}"
        )
    if res.failed_writes and not quiet:
        holey = [f"{lay.index} {lay.name}" for lay in res.layers if lay.holes]
        retry = (
            f"{res.pages_lost} of their pages are in no layer"
            if res.pages_lost
            else "every lost page was written again by a later layer"
        )
        print(
            f"progdump: {res.failed_writes} writes failed on the medium;"
            f" layers with a hole: {', '.join(holey) or 'none'} ({retry}; recover reports the holes)",
            file=sys.stderr,
        )
    if res.stopped == "error":
        print(f"progdump: write stopped by a device error: {res.error}", file=sys.stderr)
        return EXIT_ERROR
    if res.stopped == "device-full":
        print(f"progdump: {a.device} is too small for the whole dump: {n_ok} layers committed", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


# ---------------------------------------------------------------------------
# recover / info


def _setup_recover(p: argparse.ArgumentParser) -> None:
    p.add_argument("device", metavar="DEVICE", help="dump device or image to read")
    p.add_argument("outdir", metavar="OUTDIR", help="directory for manifest.json, artifacts and vmcore")


def _setup_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("device", metavar="DEVICE", help="dump device or image to read")
    p.add_argument("--json", action="store_true", help="print the scan result as JSON")


def _human(n: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def _secs(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def layer_table(res) -> str:  # type: ignore[no-untyped-def]
    """The human layer table ``info`` and ``recover`` print."""
    when = ""
    if res.dump_time_ns:
        when = time.strftime(", written %Y-%m-%d %H:%M:%S UTC", time.gmtime(res.dump_time_ns / 1e9))
    lines = [
        f"dump {res.dump_id} (format {res.format_version}), plan {res.plan or '?'},"
        f" producer {res.producer or '?'}{when}",
        f"{'layer':>5}  {'name':<8} {'status':<9} {'bytes':>10} {'pages':>9} {'flushed':>10}  artifacts / why",
    ]
    for lay in res.layers:
        extra = " ".join(lay.artifacts)
        if lay.status != "complete" and lay.reasons:
            extra = (extra + "  " if extra else "") + f"({lay.reasons[0]})"
        lines.append(
            f"{lay.index:>5}  {lay.name:<8} {lay.status:<9} {_human(lay.bytes):>10} {lay.pages:>9}"
            f" {_secs(lay.durable_s):>10}  {extra}"
        )
    if res.end:
        lines.append(f"writer ended: {res.end.get('reason', '?')}")
    else:
        lines.append("writer ended: no END record (interrupted)")
    if res.other_dumps:
        lines.append(f"older dumps on the device (ignored): {', '.join(res.other_dumps)}")
    for w in res.warnings[:10]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def _scan_or_fail(device: str):  # type: ignore[no-untyped-def]
    from progdump.reader import scan

    if not os.path.exists(device):
        raise CliError(f"{device}: no such file or device")
    return scan(device)  # ReaderError says why the device cannot be read


def _no_dump(device: str, res) -> int:  # type: ignore[no-untyped-def]
    if res.unsupported:
        # R-VER-1: the newest dump needs what this reader lacks; exit 1 naming the format it is in
        ver = res.unsupported_version
        fmt = f"format version {ver}" if ver and ver != 1 else "a format this version does not support"
        print(
            f"progdump: {device}: the newest dump is in {fmt} (this progdump reads format version 1); "
            f"upgrade progdump to read it: {res.unsupported}",
            file=sys.stderr,
        )
        if res.other_dumps:
            print(
                f"progdump: older dumps on the device (not read in its place): {', '.join(res.other_dumps)}",
                file=sys.stderr,
            )
        return EXIT_ERROR
    why = f" ({res.error})" if res.error else ""
    print(f"progdump: {device}: no progdump dump found{why}", file=sys.stderr)
    return EXIT_NO_DUMP


def _run_info(a: argparse.Namespace) -> int:
    res = _scan_or_fail(a.device)
    if a.json:
        print(json.dumps(res.to_json(), indent=1))
        return EXIT_OK if res.found else (EXIT_ERROR if res.unsupported else EXIT_NO_DUMP)
    if not res.found:
        return _no_dump(a.device, res)
    print(layer_table(res))
    return EXIT_OK


def _run_recover(a: argparse.Namespace) -> int:
    from progdump.export import recover

    if not os.path.exists(a.device):
        raise CliError(f"{a.device}: no such file or device")
    res = recover(a.device, a.outdir)  # refuses a non-empty OUTDIR before reading (ExportError)
    if not res.found:
        return _no_dump(a.device, res)
    if not a.quiet:
        print(layer_table(res))
        print(f"recovered into {a.outdir}/ (manifest.json, vmcore, {len(res.artifact_names())} artifacts)")
    return EXIT_OK


register("write", "write a progressive dump of an ELF-core snapshot to a device", _setup_write, _run_write)
register("recover", "recover the newest dump on a device into a directory (our savecore)", _setup_recover, _run_recover)
register("info", "print the layer table of the newest dump on a device", _setup_info, _run_info)


def _load_plugins() -> None:
    """Subcommands from other modules: entry points of group ``progdump.cli``
    (``replay = "harness.crashsim.cli:register_cli"`` in pyproject.toml), so
    ``progdump`` itself never imports the harness."""
    from importlib.metadata import entry_points  # noqa: PLC0415 (10-15 ms: only when plugins are wanted)

    for ep in entry_points(group="progdump.cli"):
        hook = ep.load()
        if callable(hook):
            hook(register)


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not a top-level option)."""
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only that subcommand's arguments are set up (the others are
    listed by name, which is all the top-level help shows), so ``recover`` never imports the plans."""
    ap = argparse.ArgumentParser(prog="progdump", description="Progressive crash dumps: write, recover, inspect.")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for sc in SUBCOMMANDS.values():
        p = sub.add_parser(sc.name, help=sc.help, description=sc.help)
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="print only errors")
        if command is None or command == sc.name:
            sc.setup(p)
        p.set_defaults(_run=sc.run)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command(argv)
    if command not in BUILTIN:  # a plugin's command, the top-level help, or a usage error listing commands
        try:
            _load_plugins()
        except Exception as e:  # a broken optional plugin must not break write/recover
            print(f"progdump: warning: subcommand plugin failed to load: {type(e).__name__}: {e}", file=sys.stderr)
    ap = build_parser(command if command in SUBCOMMANDS else None)
    try:
        a = ap.parse_args(argv)
    except SystemExit as e:  # argparse: usage errors exit 2; the contract says 1
        return EXIT_OK if e.code == 0 else EXIT_ERROR
    if not getattr(a, "_run", None):
        ap.print_usage(sys.stderr)
        return EXIT_ERROR
    try:
        return a._run(a)
    except ProgdumpError as e:  # every deliberate error; anything else is a bug and keeps its traceback
        if os.environ.get("PROGDUMP_TRACEBACK"):
            raise
        print(f"progdump: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("progdump: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
