"""Linux layers: per-layer sizes, production times, agreement with makedumpfile.

Real QEMU (TCG), real Linux stand-in guest. For each RAM size a guest boots,
fills its page cache (``GuestSession.workload("pagecache", MiB)``) and some
anonymous memory, panics with sysrq, and is captured. Then, on that same
snapshot:

* the Linux producer: init, ``panic()``, ``tasks()``, ``page_classes()``
  wall times; per-layer artifact bytes (raw and zstd -3), page counts;
* baseline, same run: ``makedumpfile -d 31 -l`` on the snapshot written as a
  standard ELF core (``progdump.elfcore.save_elf_snapshot``): its wall time, its page counts, and
  the exact pfn set it keeps (second bitmap of its kdump output) against our
  layer 2, each difference explained by our page class;
* ``makedumpfile --dump-dmesg`` against our ``dmesg.txt`` (byte equality);
* drgn 0.3 on an ELF core of layers 1+2 only (kernel pages and stack pages):
  symbols from its own kallsyms reader (``load_vmlinux_kallsyms``), the
  panicking CPU's RIP and every stack-scan frame of layer 0 re-symbolized
  from the layer-2 memory alone;
* optional (when Debian's ``-dbg`` vmlinux is in ``.cache/dbg`` or
  ``$PROGDUMP_VMLINUX_DBG``): drgn's own unwinder with full debug info against
  our ORC backtraces of every task, pc by pc.

Usage: ``python3 bench/linux_layers.py [--sizes 512,4096] [--fill 0.6]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import zstandard  # noqa: E402

from harness.controller import GuestSession  # noqa: E402
from harness.makedumpfile import compare_with_layer2, kdump_kept_pfns, message_counts  # noqa: E402
from progdump.elfcore import save_elf_snapshot  # noqa: E402
from progdump.layers import build_layers  # noqa: E402
from progdump.layers.base import PageClass  # noqa: E402
from progdump.layers.linux import LinuxProducer  # noqa: E402

PAGE = 4096


def count_zero_pages(snap, pfns) -> int:  # type: ignore[no-untyped-def]
    n = 0
    for p in pfns.tolist():
        if not np.frombuffer(snap.page(p), dtype=np.uint64).any():
            n += 1
    return n


def run_size(mib: int, fill: float, work: Path) -> None:
    print(f"\n=== {mib} MiB guest (TCG), page cache filled with {int(mib * fill)} MiB ===", flush=True)
    with GuestSession("linux", mem_mib=mib, dump_disk=work / "dump.img", workdir=work / f"g{mib}") as s:
        s.boot()
        t = time.perf_counter()
        s.workload("pagecache", int(mib * fill), timeout=600)
        s.workload("anon", max(16, mib // 16), timeout=600)
        print(f"workload: {time.perf_counter() - t:.1f} s")
        s.panic("sysrq")
        snap = s.capture()
        try:
            measure(snap, work, mib)
        finally:
            snap.close()


def measure(snap, work: Path, mib: int) -> None:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    p = LinuxProducer(snap)
    t_init = time.perf_counter() - t0
    t = time.perf_counter()
    layers = build_layers(snap, producer=p)
    # force each part in order, timing it
    z = zstandard.ZstdCompressor(level=3)
    print(f"{'layer':<8} {'artifacts':>10} {'zstd-3':>9} {'pages':>9} {'page MiB':>9}  time")
    classes = None
    for spec, c in layers:
        t = time.perf_counter()
        runs = list(c.page_runs())
        dt = time.perf_counter() - t
        npages = sum(n for _, n in runs)
        raw = sum(len(a.data) for a in c.artifacts)
        comp = sum(len(z.compress(a.data)) for a in c.artifacts)
        print(
            f"{spec.name:<8} {raw:>10} {comp:>9} {npages:>9} {npages * PAGE / 2**20:>9.1f}  page runs {dt * 1000:.0f} ms"
        )
        if spec.name == "kernel":
            classes = p.page_classes()  # cached object is internal to iter_layers: recompute for the comparison
    tm = p.timings
    print(
        f"producer: init {t_init * 1000:.0f} ms, panic() {tm.get('panic_s', 0) * 1000:.0f} ms, "
        f"tasks() {tm.get('tasks_s', 0) * 1000:.0f} ms, page_classes() {tm.get('pages_total_s', 0) * 1000:.0f} ms "
        f"(struct pages {tm.get('pages_struct_pages_s', 0) * 1000:.0f}, buddy/tails "
        f"{tm.get('pages_buddy_tail_s', 0) * 1000:.0f}) "
        f"for {int(tm.get('pages_pages', 0))} pfns"
    )
    print(layer0_line(p, t_init))
    assert classes is not None
    counts = classes.counts()
    print("our classes (pages): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if shutil.which("makedumpfile") is None:
        print("makedumpfile not installed: no baseline")
        return
    core, out, dm = work / "core.elf", work / "d31.kdump", work / "mdf.dmesg"
    for f in (core, out, dm):
        f.unlink(missing_ok=True)
    t = time.perf_counter()
    save_elf_snapshot(snap, core)
    print(f"baseline input: save_elf_snapshot {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    r = subprocess.run(
        ["makedumpfile", "-d", "31", "-l", "--message-level", "23", str(core), str(out)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    t_mdf = time.perf_counter() - t
    if r.returncode:
        print(f"makedumpfile -d 31 failed: {r.stderr[-500:]}")
        return
    mc = message_counts(r.stdout + r.stderr)
    print(
        f"makedumpfile -d 31 -l: {t_mdf:.2f} s wall; excluded zero {mc.get('Pages filled with zero')}, "
        f"cache {mc.get('Non-private cache pages', 0) + mc.get('Private cache pages', 0)}, "
        f"user {mc.get('User process data pages')}, free {mc.get('Free pages')}; remaining {mc.get('Remaining pages')}"
    )
    cmp = compare_with_layer2(snap, classes, kdump_kept_pfns(out))
    cls, ours2, mdf_set = cmp.classes, cmp.ours, cmp.theirs
    zero2 = count_zero_pages(snap, np.nonzero(ours2)[0] + classes.base_pfn)
    print(
        f"layer 2 (ours): {int(ours2.sum())} pages, of which {zero2} all-zero (the writer stores those as "
        f"markers); makedumpfile -d 31 keeps {int(mdf_set.sum())} = {mc.get('Remaining pages')} written "
        f"+ {mc.get('Pages filled with zero')} zero pages it writes as one shared page"
    )
    diff_a = ours2 & ~mdf_set
    diff_b = mdf_set & ~ours2
    print(f"pfn sets: ours only {int(diff_a.sum())}, makedumpfile only {int(diff_b.sum())}")
    for name, mask in (("ours only", diff_a), ("makedumpfile only", diff_b)):
        idx = np.nonzero(mask)[0]
        if idx.size:
            by = {PageClass(c).name.lower(): int((cls[idx] == c).sum()) for c in np.unique(cls[idx])}
            zero = count_zero_pages(snap, idx + classes.base_pfn)
            print(
                f"  {name}: by our class {by}, {zero} of them all-zero; "
                f"pfns {int(idx[0]) + classes.base_pfn:#x}..{int(idx[-1]) + classes.base_pfn:#x}"
            )
    t = time.perf_counter()
    r = subprocess.run(["makedumpfile", "--dump-dmesg", str(core), str(dm)], capture_output=True, timeout=300)
    t_dm = time.perf_counter() - t
    ours = {a.name: a.data for a in layers[0][1].artifacts}["dmesg.txt"]
    same = r.returncode == 0 and dm.read_bytes() == ours
    print(
        f"dmesg: ours {len(ours)} bytes ({tm.get('panic_s', 0) * 1000:.0f} ms for all of layer 0), "
        f"makedumpfile --dump-dmesg {t_dm * 1000:.0f} ms wall: {'IDENTICAL' if same else 'DIFFERENT'}"
    )
    for f in (core, out, dm):
        f.unlink(missing_ok=True)
    # the real path: progdump's writer and reader
    res, out = write_and_recover(snap, work, None)
    print("progdump write (file device, unpaced) + recover:")
    for lay in res.layers:
        print(
            f"  layer {lay.index} {lay.name:<7} {lay.bytes / 2**20:9.2f} MiB on the device, {lay.pages:>8} pages "
            f"({lay.zero_pages} zero), durable at {lay.durable_s:.2f} s"
        )
    res2, out2 = write_and_recover(snap, work, 2)
    print(
        f"cut after layer 2: committed {[lay.committed for lay in res2.layers]}; recovered vmcore "
        f"{(out2 / 'vmcore').stat().st_size / 2**20:.0f} MiB (the pages of layers 0-2)"
    )
    dm = work / "rec.dmesg"
    dm.unlink(missing_ok=True)
    r = subprocess.run(
        ["makedumpfile", "--dump-dmesg", str(out2 / "vmcore"), str(dm)], capture_output=True, timeout=300
    )
    print(
        f"makedumpfile --dump-dmesg on the recovered layer-2 vmcore: "
        f"{'IDENTICAL to dmesg.txt' if r.returncode == 0 and dm.read_bytes() == (out2 / 'dmesg.txt').read_bytes() else 'FAILED/DIFFERENT'}"
    )
    k2 = work / "rec.kdump"
    k2.unlink(missing_ok=True)
    r = subprocess.run(
        ["makedumpfile", "-d", "31", "-l", "--message-level", "23", str(out2 / "vmcore"), str(k2)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if r.returncode == 0:
        mc2 = message_counts(r.stdout + r.stderr)
        print(
            f"makedumpfile -d 31 on the recovered layer-2 vmcore: keeps {mc2.get('Remaining pages')} "
            f"(+ {mc2.get('Pages filled with zero')} zero) of {mc2.get('Original pages')}; "
            f"on the full snapshot it kept {mc.get('Remaining pages')} (+ {mc.get('Pages filled with zero')} zero)"
        )
    else:
        said = [ln for ln in (r.stdout + r.stderr).splitlines() if "%]" not in ln and not ln.startswith("LOAD[")]
        print(
            f"makedumpfile -d 31 on the recovered layer-2 vmcore failed (exit {r.returncode}): {' | '.join(said)[-600:]}"
        )
    k2.unlink(missing_ok=True)
    drgn_check(out2 / "vmcore", out2)
    dbg_check(snap, out2 / "vmcore", out2)


class _CutAfter:
    """FileDevice wrapper failing every write once layer ``n`` committed: a deterministic reset."""

    def __init__(self, dev, n: int) -> None:  # type: ignore[no-untyped-def]
        self.dev, self.n, self.cut = dev, n, False
        self.size, self.sector_size, self.path = dev.size, dev.sector_size, dev.path

    def write(self, offset: int, data) -> None:  # type: ignore[no-untyped-def]
        from progdump.device import DeviceError

        if self.cut:
            raise DeviceError("simulated reset after the layer commit")
        self.dev.write(offset, data)

    def flush(self) -> None:
        self.dev.flush()

    def mark(self, label: str) -> None:
        self.dev.mark(label)
        self.cut = self.cut or (label.startswith(f"layer {self.n} ") and label.endswith("committed"))

    def clock(self) -> float:
        return self.dev.clock()

    def close(self) -> None:
        self.dev.close()


def layer0_line(p: LinuxProducer, t_init: float) -> str:
    """Layer 0's producer time, and, same run and snapshot, the eager work its lazy paths skip.

    Baseline: decoding every kallsyms name (what building the symbol table
    did before names stayed encoded) and walking all of BTF (what the
    constructor did before records were walked on demand).
    """
    from progdump.layers.linux.btf import Btf
    from progdump.layers.linux.kallsyms import decode_kallsyms

    k, vi = p.k, p.k.vi
    a = {
        n: vi.symbol(f"kallsyms_{n}")
        for n in ("num_syms", "names", "token_table", "token_index", "offsets", "relative_base")
    }
    num = k.mem.u32(a["num_syms"])
    tables = (
        num,
        k.mem.read(a["names"], a["token_table"] - a["names"]),
        k.mem.read(a["token_table"], a["token_index"] - a["token_table"]),
        k.mem.read(a["token_index"], 512),
        k.mem.read(a["offsets"], 4 * num),
        k.mem.u64(a["relative_base"]),
    )
    t = time.perf_counter()
    decode_kallsyms(*tables)
    t_names = time.perf_counter() - t
    lo, hi = k.syms.address("__start_BTF"), k.syms.address("__stop_BTF")
    blob = k.mem.read(lo, hi - lo)
    t = time.perf_counter()
    ntypes = len(Btf(blob))
    t_btf = time.perf_counter() - t
    panic_ms = p.timings.get("panic_s", 0) * 1000
    return (
        f"layer 0 path: producer init {t_init * 1000:.0f} ms + panic() {panic_ms:.0f} ms; "
        f"baseline, same run: every kallsyms name decoded ({num}) {t_names * 1000:.0f} ms, "
        f"all of BTF walked ({ntypes} types) {t_btf * 1000:.0f} ms"
    )


def write_and_recover(snap, work: Path, cut_after: int | None):  # type: ignore[no-untyped-def]
    """progdump's writer (unpaced file device) then its reader: (WriteResult, outdir)."""
    from progdump.device import DumpDevice, FileDevice
    from progdump.export import recover
    from progdump.writer import write_dump

    img = work / "dump.bin"
    img.unlink(missing_ok=True)
    with open(img, "wb") as f:
        f.truncate(snap.total_bytes + (256 << 20))
    dev = FileDevice(str(img), direct=False)
    if cut_after is not None:
        DumpDevice.register(_CutAfter)
        dev = _CutAfter(dev, cut_after)
    try:
        res = write_dump(snap, dev)
    finally:
        dev.close()
    out = work / "recovered"
    shutil.rmtree(out, ignore_errors=True)
    recover(str(img), out)
    img.unlink()
    return res, out


def drgn_check(vmcore: Path, outdir: Path) -> None:
    try:
        import drgn
        from drgn.helpers.linux.kallsyms import load_vmlinux_kallsyms
    except ImportError as e:
        print(f"drgn check skipped: {e}")
        return
    path = vmcore
    try:
        prog = drgn.Program()
        prog.set_core_dump(str(path))
        t = time.perf_counter()
        prog.register_symbol_finder("vmlinux_kallsyms", load_vmlinux_kallsyms(prog), enable_index=0)
        t_sym = time.perf_counter() - t
        import json

        pj = json.loads((outdir / "panic.json").read_bytes())
        cpu = (
            next(c for c in pj["cpus"] if c["panicking"]) if any(c["panicking"] for c in pj["cpus"]) else pj["cpus"][0]
        )
        rip = int(cpu["regs"]["rip"], 16)
        s = prog.symbol(rip)
        rip_ok = f"{s.name}+{rip - s.address:#x}" == cpu["rip_symbol"].split("/")[0]
        frames = pj["backtrace"]["scan"]["frames"]
        agree = 0
        for f in frames:
            w = struct.unpack("<Q", prog.read(int(f["stack_addr"], 16), 8))[0]
            s = prog.symbol(w - 1)  # a return address, looked up like printk's %pB
            agree += f"{s.name}+{w - s.address:#x}" == f["symbol"].split("/")[0]
        print(
            f"drgn 0.3 on the recovered layer-2 vmcore: kallsyms loaded in {t_sym * 1000:.0f} ms; "
            f"RIP {'agrees' if rip_ok else 'DISAGREES'}; stack-scan frames re-read and symbolized: "
            f"{agree}/{len(frames)} agree"
        )
    finally:
        pass


def dbg_check(snap, vmcore: Path, outdir: Path) -> None:  # type: ignore[no-untyped-def]
    import json

    release = snap.vmcoreinfo["OSRELEASE"]
    env = os.environ.get("PROGDUMP_VMLINUX_DBG")
    vmlinux = (
        Path(env)
        if env
        else Path(__file__).resolve().parent.parent / ".cache/dbg/usr/lib/debug/boot" / f"vmlinux-{release}"
    )
    if not vmlinux.is_file():
        print(f"drgn + -dbg vmlinux: skipped (no {vmlinux})")
        return
    import drgn
    from drgn.helpers.linux.pid import for_each_task

    core = vmcore
    try:
        prog = drgn.Program()
        prog.set_core_dump(str(core))
        prog.load_debug_info([str(vmlinux)])
        t = time.perf_counter()
        theirs = {}
        for task in for_each_task(prog):
            pcs: list[int] = []
            for f in prog.stack_trace(task):
                if f.pc < 0xFFFF800000000000:
                    break
                if not pcs or pcs[-1] != f.pc:
                    pcs.append(f.pc)
            theirs[task.value_()] = pcs
        t_drgn = time.perf_counter() - t
        from drgn.helpers.linux.printk import get_dmesg

        ours_log = (outdir / "dmesg.txt").read_bytes()
        theirs_log = get_dmesg(prog)
        log_same = theirs_log == ours_log
    finally:
        pass
    tasks = json.loads((outdir / "tasks.json").read_bytes())["tasks"]
    both = [t for t in tasks if int(t["task"], 16) in theirs]
    same = sum(
        1
        for t in both
        if [int(f["address"], 16) for f in t["backtrace"] if f["method"] == "orc"] == theirs[int(t["task"], 16)]
    )
    print(
        f"drgn + -dbg vmlinux on the recovered layer-2 vmcore: get_dmesg {'IDENTICAL to' if log_same else 'DIFFERS from'} our dmesg.txt; "
        f"its own unwinder: {same}/{len(both)} task backtraces identical "
        f"pc by pc ({len(tasks) - len(both)} idle tasks drgn does not list); drgn unwind {t_drgn * 1000:.0f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="512,4096")
    ap.add_argument("--fill", type=float, default=0.6, help="page cache to fill, as a fraction of RAM")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pd-bench-linux-", dir=os.environ.get("TMPDIR", "/tmp")))
    try:
        for mib in (int(x) for x in args.sizes.split(",")):
            run_size(mib, args.fill, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
