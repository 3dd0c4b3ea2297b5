"""A writer armed before the panic: ``python3 -m progdump.resident DEVICE [options]``.

Why: a kernel's dump path is resident; it does not import code, open the
device or pick its OS decoder after the machine died. This process does all
of that when it starts (*arming*), then waits for one "go" message carrying
the captured machine state, and writes the dump the moment it arrives. It
stays a separate process, so a modelled power cut can kill it like the
writer it replaces.

Protocol (one line each way, UTF-8 JSON, newline-terminated):

1. Start: ``python3 -m progdump.resident DEVICE [--plan P] [--device-model
   M|none] [--trace FILE] [--deadline S] [--threads N]``. DEVICE must exist.
2. Armed: once everything is imported, one dump of a tiny made-up snapshot
   has run to a device that discards (warm code paths), and the device is
   open, the process
   prints ``{"armed": true, "pid": PID, "arm_s": SECONDS}`` on stdout.
   A failure to arm prints ``{"armed": false, "error": "..."}`` and exits 1.
3. Go: the parent writes one line on stdin (at most 1 MiB), either
   ``{"elf": PATH}`` (an ELF core), or the captured memory directly:
   ``{"ram": PATH, "ranges": [[phys_start, file_offset, size], ...],
   "notes_elf": PATH?, "cpus": [{"index": 0, "regs": {"rip": ...}}]?,
   "vmcoreinfo": TEXT?, "console_tail": TEXT?, "metadata": {...}?}``
   where PATH is QEMU's shared memory-backend file (read-only mmap, no copy),
   ``notes_elf`` a one-page ``dump-guest-memory`` whose notes (VMCOREINFO,
   CPU notes) are taken, and ``cpus``/``vmcoreinfo`` override or supply them.
   EOF instead of a line disarms: exit 0, nothing written.
4. While writing: one line per durable layer, as ``progdump write`` prints
   it (``layer 0 panic durable at 3.1 ms, 41 KiB``), then a final JSON line
   ``{"done": true, "stopped": ..., "go_to_layer_s": {"0": s, ...},
   "go_to_start_s": s, "result": {...}}``. ``go_to_layer_s`` counts from
   the moment the go line was read to each layer's commit flush returning
   (monotonic clock); ``go_monotonic_ns`` is that moment on the host's
   CLOCK_MONOTONIC (comparable with a parent's ``time.monotonic_ns()``, e.g.
   the instant it received the panic event); ``result`` is the writer's
   :class:`WriteResult`.
   Exit 0 when the dump stopped cleanly (done or deadline), 1 otherwise; a bad
   go message is one ``{"done": false, "error": "..."}`` line and exit 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import IO, Any

from progdump.errors import ProgdumpError

MAX_GO_LINE = 1 << 20
MAX_RANGES = 4096

__all__ = ["main", "parse_go", "GoError"]


class GoError(ProgdumpError, ValueError):
    """The go message is unusable; the message says what is wrong."""


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise GoError(f"{what}: {v!r} is not a non-negative integer")
    return v


def _str(v: Any, what: str, limit: int = 4096) -> str:
    if not isinstance(v, str) or len(v) > limit:
        raise GoError(f"{what}: expected a string of at most {limit} characters")
    return v


def parse_go(line: bytes | str) -> dict[str, Any]:
    """Validate a go line (see the module docstring); return the decoded object."""
    if len(line) > MAX_GO_LINE:
        raise GoError(f"go message is {len(line)} bytes, more than {MAX_GO_LINE}")
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise GoError(f"go message is not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise GoError("go message must be a JSON object")
    if ("elf" in msg) == ("ram" in msg):
        raise GoError('go message needs exactly one of "elf" and "ram"')
    if "elf" in msg:
        _str(msg["elf"], "elf")
        return msg
    _str(msg["ram"], "ram")
    ranges = msg.get("ranges")
    if not isinstance(ranges, list) or not 0 < len(ranges) <= MAX_RANGES:
        raise GoError(f'"ranges" must be a list of 1..{MAX_RANGES} [phys_start, file_offset, size]')
    for i, r in enumerate(ranges):
        if not isinstance(r, list) or len(r) != 3:
            raise GoError(f"ranges[{i}] must be [phys_start, file_offset, size]")
        for v, name in zip(r, ("phys_start", "file_offset", "size")):
            _int(v, f"ranges[{i}].{name}")
    if "notes_elf" in msg:
        _str(msg["notes_elf"], "notes_elf")
    cpus = msg.get("cpus", [])
    if not isinstance(cpus, list) or len(cpus) > 1024:
        raise GoError('"cpus" must be a list of at most 1024 {"index", "regs"} objects')
    for i, c in enumerate(cpus):
        if not isinstance(c, dict) or not isinstance(c.get("regs"), dict):
            raise GoError(f'cpus[{i}] must be {{"index": N, "regs": {{name: value}}}}')
        _int(c.get("index", i), f"cpus[{i}].index")
        for k, v in c["regs"].items():
            _str(k, f"cpus[{i}] register name", 16)
            _int(v, f"cpus[{i}].regs.{k}")
    for key in ("vmcoreinfo", "console_tail"):
        if key in msg:
            _str(msg[key], key, MAX_GO_LINE)
    if not isinstance(msg.get("metadata", {}), dict):
        raise GoError('"metadata" must be an object')
    return msg


def snapshot_from_go(msg: dict[str, Any]):  # type: ignore[no-untyped-def]
    """The Snapshot a go message names (no copy of guest memory: mmaps of the files)."""
    from progdump.elfcore import load_elf_snapshot  # noqa: PLC0415
    from progdump.snapshot import CpuState, Note, Snapshot  # noqa: PLC0415

    if "elf" in msg:
        return load_elf_snapshot(msg["elf"])
    notes: list = []
    cpus: list = []
    if "notes_elf" in msg:
        with load_elf_snapshot(msg["notes_elf"]) as small:
            notes = list(small.notes)
            cpus = [CpuState(c.index, dict(c.regs), c.prstatus) for c in small.cpus]
    if msg.get("cpus"):
        cpus = [
            CpuState(int(c.get("index", i)), {k: int(v) for k, v in c["regs"].items()})
            for i, c in enumerate(msg["cpus"])
        ]
    if "vmcoreinfo" in msg:
        notes = [n for n in notes if n.name != "VMCOREINFO"] + [Note("VMCOREINFO", 0, msg["vmcoreinfo"].encode())]
    ranges = [tuple(r) for r in msg["ranges"]]
    return Snapshot.from_file_ranges(
        msg["ram"], ranges, cpus=cpus, notes=notes,  # type: ignore[arg-type]
        console_tail=msg.get("console_tail", "").encode("utf-8", "replace"),
        metadata=dict(msg.get("metadata", {})),
    )  # fmt: skip


def _warm(plan: str) -> None:
    """One whole dump of a tiny made-up snapshot to a device that discards: every code path a
    real dump takes runs once (first calls cost 10-20 ms here: the go-to-layer-0 clock should not pay them)."""
    from progdump.device import DumpDevice  # noqa: PLC0415
    from progdump.snapshot import CpuState, MemoryRange, Note, Snapshot  # noqa: PLC0415
    from progdump.writer import write_dump  # noqa: PLC0415

    class _Discard(DumpDevice):
        size, sector_size, path = 8 << 20, 512, "warm-up"

        def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
            pass

        def flush(self) -> None:
            pass

        def clock(self) -> float:
            return time.monotonic()

        def close(self) -> None:
            pass

    buf = bytearray(64 * 4096)
    buf[4096:12288] = b"warm-up page " * 630 + bytes(8192 - 13 * 630)
    buf[20480:24576] = os.urandom(4096)
    vi = b"OSRELEASE=warm-up\nPAGESIZE=4096\nNUMBER(phys_base)=0\nSYMBOL(swapper_pg_dir)=ffffffff81000000\n"
    snap = Snapshot([MemoryRange(0, len(buf), memoryview(buf))], cpus=[CpuState(0, {"rip": 1, "rsp": 4096})],
                    notes=[Note("VMCOREINFO", 0, vi)], console_tail=b"warm-up\n",
                    metadata={"os": "warm-up"})  # fmt: skip
    parse_go(json.dumps({"ram": "/warm-up", "ranges": [[0, 0, 4096]], "cpus": [{"index": 0, "regs": {"rip": 1}}]}))
    write_dump(snap, _Discard(), plan=plan)


def _say(out: IO[str], obj: object) -> None:
    out.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
    out.flush()


def main(argv: list[str] | None = None, stdin: IO[bytes] | None = None, stdout: IO[str] | None = None) -> int:
    t_arm0 = time.monotonic()
    ap = argparse.ArgumentParser(prog="python3 -m progdump.resident", description=__doc__.split("\n\n")[0])
    ap.add_argument("device")
    ap.add_argument("--plan", default="progressive")
    ap.add_argument("--device-model", default="none")
    ap.add_argument("--trace", default=None)
    ap.add_argument("--deadline", type=float, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-warm", action="store_true", help="skip the warm-up dump (to measure what it buys)")
    a = ap.parse_args(argv)
    inp = stdin if stdin is not None else sys.stdin.buffer
    out = stdout if stdout is not None else sys.stdout

    # Arm: everything a dump needs, before there is anything to dump.
    try:
        import progdump.elfcore  # noqa: F401, PLC0415 - snapshot_from_go needs it: 15-20 ms to import
        from progdump.device import DeviceError  # noqa: PLC0415
        from progdump.devmodel import open_device  # noqa: PLC0415
        from progdump.layers import get_plan, preload_producers  # noqa: PLC0415
        from progdump.snapshot import SnapshotError  # noqa: PLC0415
        from progdump.writer import WriterError, compressor, format_durable_line, write_dump  # noqa: PLC0415

        get_plan(a.plan)
        preload_producers()
        for spec in get_plan(a.plan):  # compressor contexts of this thread (layer-info records)
            if spec.zstd_level > 0:
                compressor(spec.zstd_level).compress(b"warm" * 64)
        if not a.no_warm:
            _warm(a.plan)
        if not os.path.exists(a.device):
            raise DeviceError(f"{a.device}: no such file or device")
        dev = open_device(a.device, None if a.device_model == "none" else a.device_model, a.trace)
    except Exception as e:  # noqa: BLE001 - one line for the parent, never a traceback
        _say(out, {"armed": False, "error": f"{type(e).__name__}: {e}"})
        return 1
    # The collector must not run between the go line and layer 0: a full collection over everything
    # imported took ~27 ms in one event dump here (scenario sysrq-panic, 2026-12-05), more than the
    # whole layer-0 budget. Objects made while arming are frozen out of later collections; collection
    # resumes once layer 0 is durable.
    gc.collect()
    gc.freeze()
    gc.disable()
    _say(out, {"armed": True, "pid": os.getpid(), "arm_s": round(time.monotonic() - t_arm0, 4)})

    try:
        line = inp.readline(MAX_GO_LINE + 1)
        t_go = time.monotonic()
        if not line.strip():
            return 0  # disarmed
        try:
            msg = parse_go(line)
            snap = snapshot_from_go(msg)
        except (GoError, SnapshotError, OSError) as e:
            _say(out, {"done": False, "error": str(e)})
            return 1
        go_to: dict[str, float] = {}
        t_start: list[float] = []

        def progress(ev) -> None:  # type: ignore[no-untyped-def]
            now = time.monotonic()
            if not t_start:
                t_start.append(now - ev.t)
            if ev.kind == "layer-durable":
                go_to[str(ev.layer.index)] = round(now - t_go, 6)
                gc.enable()
                _say(out, format_durable_line(ev.layer))

        try:
            res = write_dump(snap, dev, plan=a.plan, deadline=a.deadline, progress=progress, threads=a.threads)
        except (WriterError, DeviceError) as e:
            _say(out, {"done": False, "error": str(e)})
            return 1
        finally:
            snap.close()
        _say(out, {"done": True, "stopped": res.stopped, "go_to_layer_s": go_to,
                   "go_to_start_s": round(t_start[0] - t_go, 6) if t_start else None,
                   "go_monotonic_ns": int(t_go * 1e9), "result": res.to_json()})  # fmt: skip
        return 0 if res.stopped in ("done", "deadline") else 1
    finally:
        dev.close()
        gc.enable()  # main() also runs inside other processes (tests): leave the collector as it was
        gc.unfreeze()


if __name__ == "__main__":
    sys.exit(main())
