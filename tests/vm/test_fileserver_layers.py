"""The fileserver plan on a real panic of a fileserver-like guest (TCG, 512 MiB).

The guest loads ``pdarc`` (guest-images/linux/pdarc: slab caches named as
ZFS's ARC names them, filled to 60 % of RAM), gets some page cache and user
memory, and panics (sysrq). Checked:

* the kernel's own accounting, read in the guest just before the panic
  (``/proc/slabinfo``, ``PageTables`` in ``/proc/meminfo``), against our
  kernel map: pages per cache, bulk pages, page-table pages;
* the fileserver plan splits the progressive plan's kernel layer and loses
  nothing: ``kstruct`` + ``bulk`` is exactly the old kernel layer;
* the test that matters: ``progdump write --plan fileserver`` cut off right
  after the kstruct layer commits, ``progdump recover``: on that vmcore drgn
  (with Debian's -dbg vmlinux, test-only) walks every task and unwinds every
  stack, prints the log, walks the slab cache list and the module list, and
  gets what it gets from the whole memory; the bulk pages are really absent.
  The ``crash`` utility is run on both too.

Skips, saying why, without QEMU, the guest image, the pdarc module, drgn,
the -dbg vmlinux or crash.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from progdump.elfcore import save_elf_snapshot
from progdump.layers import build_layers
from progdump.layers.base import PageClass
from progdump.layers.linux import LinuxProducer
from progdump.snapshot import Snapshot

pytestmark = pytest.mark.vm

ARC_DATA = ("zio_data_buf_131072", "zio_buf_131072", "zio_data_buf_16384", "zio_buf_16384", "abd_chunk_cache")
ARC_META = ("arc_buf_hdr_t_full", "arc_buf_t", "dmu_buf_impl_t", "dnode_t")


def slabinfo_pages(text: str) -> dict[str, int]:
    """Pages per cache from /proc/slabinfo: num_slabs x pagesperslab (the kernel's own count)."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(\S+)\s+\d+\s+\d+\s+\d+\s+\d+\s+(\d+) : tunables.*: slabdata\s+\d+\s+(\d+)", line)
        if m:
            out[m.group(1)] = int(m.group(2)) * int(m.group(3))
    return out


@pytest.fixture(scope="module")
def fileserver(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    request.getfixturevalue("linux_guest")
    from harness.controller import GuestSession
    from harness.guests import get_profile

    extra = get_profile("linux").manifest.get("extra_modules", {}).get("pdarc") or {}
    if not extra.get("path"):
        reason = f"guest image has no pdarc module ({extra.get('note', 'image older than pdarc')}): make guest-image"
        print(f"\nSKIP: {reason}")
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("fileserver")
    with GuestSession("linux", mem_mib=512, dump_disk=work / "dump.img", workdir=work) as s:
        s.boot()
        arc = s.run(
            f"insmod {extra['path']} && echo fill > /proc/pdarc && cat /proc/pdarc", timeout=900, check=True
        ).text
        s.workload("pagecache", 48, timeout=600)
        s.workload("anon", 16, timeout=600)
        # the kernel's own accounting, as close to the panic as the command channel allows
        truth = s.run("cat /proc/slabinfo; grep PageTables /proc/meminfo", check=True).text
        s.panic("sysrq")
        snap = s.capture()
        try:
            yield snap, arc, truth, work
        finally:
            snap.close()


def pages(content: Any) -> set[int]:
    return {p for f, n in content.page_runs() for p in range(f, f + n)}


def test_kernel_map_agrees_with_slabinfo_and_meminfo(fileserver: Any) -> None:
    snap, arc, truth, _ = fileserver
    p = LinuxProducer(snap)
    pcm = p.page_classes()
    km = p.kernel_map(pcm)
    assert km is not None, p.degraded
    ours = km.cache_pages(pcm)
    theirs = slabinfo_pages(truth)
    # pdarc's caches do not change after the fill: equal to the page
    for name in ARC_DATA + ARC_META:
        assert ours.get(name, 0) == theirs[name], (name, ours.get(name), theirs[name])
    assert "?" not in ours  # every slab page's cache is on the kernel's list
    # the whole slab: within what the panic command's own shell can allocate
    assert abs(sum(ours.values()) - sum(theirs.values())) <= 64, (sum(ours.values()), sum(theirs.values()))
    # page tables: PageTables counts exactly the pages the PG_table constructor marked
    pt_kb = int(re.search(r"PageTables:\s+(\d+) kB", truth).group(1))
    kinds = km.kind_counts(pcm)
    assert abs(kinds["page_table"] - pt_kb // 4) <= 16, (kinds["page_table"], pt_kb // 4)
    # every task's stack is STACK; the kernel image and mem_map are there
    tasks = json.loads(next(a.data for a in p.tasks().artifacts if a.name == "tasks.json"))["tasks"]
    assert kinds["stack"] >= 4 * (len(tasks) - 1)
    assert kinds["image"] > 0 and kinds["mem_map"] > 0 and kinds["module"] > 0
    print(f"\nkinds {kinds}\nvmalloc owners {km.vmalloc_owners}\nnotes {km.notes}")


def test_fileserver_plan_splits_the_kernel_layer(fileserver: Any) -> None:
    snap, arc, truth, _ = fileserver
    fs = {spec.name: (spec, c) for spec, c in build_layers(snap, "fileserver")}
    pr = {spec.name: c for spec, c in build_layers(snap, "progressive")}
    kstruct, bulk, kernel = pages(fs["kstruct"][1]), pages(fs["bulk"][1]), pages(pr["kernel"])
    assert not kstruct & bulk and kstruct | bulk == kernel
    # bulk is exactly pdarc's data caches, as the guest's kernel counts them
    theirs = slabinfo_pages(truth)
    assert len(bulk) == sum(theirs[n] for n in ARC_DATA)
    assert pages(fs["cache"][1]) == pages(pr["cache"])
    note = next(n for n in fs["kstruct"][1].notes if n.startswith("bulk caches"))
    assert all(n in note for n in ARC_DATA) and not any(n in note for n in ARC_META)
    print(
        f"\nkstruct {len(kstruct)} pages = {len(kstruct) / len(kernel):.1%} of the kernel layer ({len(kernel)}); "
        f"bulk {len(bulk)}"
    )


# ---- the real path: write, cut after the kstruct layer, recover, open in drgn and crash ----------


class CutAfter:
    """A FileDevice that fails every write once layer ``n`` has committed: a reset, deterministically."""

    def __init__(self, dev: Any, n: int) -> None:
        self.dev, self.n, self.cut = dev, n, False
        self.size, self.sector_size, self.path = dev.size, dev.sector_size, dev.path

    def write(self, offset: int, data: Any) -> None:
        from progdump.device import DeviceError

        if self.cut:
            raise DeviceError("simulated reset after the layer commit")
        self.dev.write(offset, data)

    def flush(self) -> None:
        self.dev.flush()

    def mark(self, label: str) -> None:
        self.dev.mark(label)
        if label.startswith(f"layer {self.n} ") and label.endswith("committed"):
            self.cut = True

    def clock(self) -> float:
        return self.dev.clock()

    def close(self) -> None:
        self.dev.close()


@pytest.fixture(scope="module")
def recovered_kstruct(fileserver: Any) -> Any:
    """Layers 0-2 of the fileserver plan (panic, tasks, kstruct) written, the rest cut off, recovered."""
    from progdump.device import DumpDevice, FileDevice
    from progdump.export import recover
    from progdump.writer import write_dump

    snap, _, _, work = fileserver
    img = work / "cut.img"
    with open(img, "wb") as f:
        f.truncate(700 << 20)
    dev = CutAfter(FileDevice(str(img), direct=False), 2)
    DumpDevice.register(CutAfter)
    try:
        res = write_dump(snap, dev, plan="fileserver")  # type: ignore[arg-type]
    finally:
        dev.close()
    assert [lay.committed for lay in res.layers] == [True, True, True, False, False, False], res.to_json()
    out = work / "recovered"
    scan = recover(str(img), out)
    assert [lay.status for lay in scan.layers][:3] == ["complete"] * 3
    full = work / "full.elf"
    save_elf_snapshot(snap, full)
    return snap, out, full


def dbg_vmlinux(release: str) -> Path:
    import os

    env = os.environ.get("PROGDUMP_VMLINUX_DBG")
    p = (
        Path(env)
        if env
        else Path(__file__).resolve().parents[2] / ".cache/dbg/usr/lib/debug/boot" / f"vmlinux-{release}"
    )
    if not p.is_file():
        reason = (
            f"no -dbg vmlinux for {release} (test-only, a 283 MB download): `make dbg-vmlinux` "
            "or set PROGDUMP_VMLINUX_DBG"
        )
        print(f"\nSKIP: {reason}")
        pytest.skip(reason)
    return p


def drgn_view(core: Path, vmlinux: Path) -> dict[str, Any]:
    """What a debugger session sees: tasks and their stacks, the log, slab caches, modules."""
    drgn = pytest.importorskip("drgn")
    from drgn.helpers.linux.module import for_each_module
    from drgn.helpers.linux.pid import for_each_task
    from drgn.helpers.linux.printk import get_dmesg
    from drgn.helpers.linux.slab import for_each_slab_cache

    prog = drgn.Program()
    prog.set_core_dump(str(core))
    prog.load_debug_info([str(vmlinux)])
    tasks = {}
    for t in for_each_task(prog):
        frames = []
        for f in prog.stack_trace(t):
            if f.pc < 0xFFFF800000000000:  # user frames: user memory is not kernel memory (not in kstruct)
                break
            frames.append((f.pc, f.name))
        tasks[t.value_()] = (t.pid.value_(), t.comm.string_().decode(), frames)
    caches = [(c.name.string_().decode(), c.object_size.value_(), c.size.value_()) for c in for_each_slab_cache(prog)]
    mods = [
        (m.name.string_().decode(), m.state.value_(), m.core_layout.base.value_(), m.core_layout.size.value_())
        for m in for_each_module(prog)
    ]
    return {"prog": prog, "tasks": tasks, "dmesg": get_dmesg(prog), "caches": caches, "modules": mods}


def test_kstruct_vmcore_opens_in_drgn_like_the_whole_memory(recovered_kstruct: Any) -> None:
    snap, out, full = recovered_kstruct
    vmlinux = dbg_vmlinux(snap.vmcoreinfo["OSRELEASE"])
    cut = drgn_view(out / "vmcore", vmlinux)
    whole = drgn_view(full, vmlinux)
    # every task, every stack unwound as on the whole memory (drgn stops silently at a missing page)
    assert len(cut["tasks"]) >= 40 and cut["tasks"] == whole["tasks"]
    assert all(len(frames) >= 2 for _, _, frames in cut["tasks"].values())
    assert cut["dmesg"] == whole["dmesg"] == (out / "dmesg.txt").read_bytes()
    assert cut["caches"] == whole["caches"] and {c[0] for c in cut["caches"]} >= set(ARC_DATA + ARC_META)
    assert cut["modules"] == whole["modules"] and "pdarc" in {m[0] for m in cut["modules"]}
    # and the bulk data is really not in it: a zio_data_buf_131072 page faults
    import drgn

    p = LinuxProducer(snap)
    pcm = p.page_classes()
    km = p.kernel_map(pcm)
    cid = km.caches.index("zio_data_buf_131072") + 1
    ids = km.cache_ids
    pfn = next(
        km.base_pfn + i
        for i in range(len(ids) // 2)
        if pcm.classes[i] == PageClass.KERNEL and int.from_bytes(ids[2 * i : 2 * i + 2], "little") == cid
    )
    with pytest.raises(drgn.FaultError):
        cut["prog"].read(pfn * 4096, 8, True)
    assert whole["prog"].read(pfn * 4096, 8, True)


def test_kstruct_vmcore_opens_in_crash(recovered_kstruct: Any) -> None:
    """crash 8 on the kstruct vmcore says what it says on the whole memory (bulk caches' free lists aside)."""
    snap, out, full = recovered_kstruct
    if shutil.which("crash") is None:
        print("\nSKIP: crash not installed")
        pytest.skip("crash not installed")
    vmlinux = dbg_vmlinux(snap.vmcoreinfo["OSRELEASE"])
    cmds = out / "crash.cmds"
    cmds.write_text("sys\nps\nbt -a\nlog\nkmem -s\nmod\nexit\n")

    def run(core: Path) -> list[str]:
        r = subprocess.run(
            ["crash", "-s", str(vmlinux), str(core), "-i", str(cmds)],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=out,
        )
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return [ln for ln in (r.stdout + r.stderr).splitlines() if "DUMPFILE:" not in ln]

    cut, whole = run(out / "vmcore"), run(full)
    text = "\n".join(cut)
    assert 'PANIC: "Kernel panic - not syncing: sysrq triggered crash"' in text
    assert "sysrq_handle_crash" in text and " pdarc " in text
    # kmem -s walks slab free lists, which live in the objects: only the bulk caches (not dumped) differ
    bulk = re.compile("|".join(ARC_DATA))
    assert [ln for ln in cut if not bulk.search(ln)] == [ln for ln in whole if not bulk.search(ln)]
    print(
        "\ncrash on the kstruct vmcore, lines that differ from the whole memory:\n"
        + "\n".join(ln for ln in cut if ln not in whole)
    )


# ---- hostile memory: the structures the kernel map reads, damaged on purpose ----------------------


def test_hostile_kernel_map_never_loses_a_kernel_page(fileserver: Any) -> None:
    """Scribbled slab caches, vmalloc areas and struct pages: notes, never an exception, nothing lost."""
    import random
    import struct

    from progdump.layers.linux.kernel import LinuxKernel
    from progdump.layers.linux.kmem import read_slab_caches
    from progdump.layers.linux.modules import list_entries
    from progdump.snapshot import MemoryRange

    snap = fileserver[0]
    k = LinuxKernel(snap)
    ranges = [MemoryRange(r.phys_start, r.size, memoryview(bytearray(r.buffer))) for r in snap.ranges]
    ws = Snapshot(
        ranges=ranges, cpus=snap.cpus, notes=snap.notes, console_tail=snap.console_tail, metadata=dict(snap.metadata)
    )

    def patch(va: int, data: bytes) -> None:
        for cva, pa, n in k.mem.chunks(va, len(data)):
            ws.view_phys(pa, n)[:] = data[cva - va : cva - va + n]

    caches, _ = read_slab_caches(k)
    o_list = k.btf.offsetof("vmap_area", "list")
    areas, _ = list_entries(k.mem, k.syms.address("vmap_area_list"), 1 << 20)
    vmemmap = k.mem.u64(k.syms.address("vmemmap_base"))
    rng = random.Random(11)
    first_cache = sorted(caches)[0]
    patch(
        first_cache + k.btf.offsetof("kmem_cache", "list"),  # a cache whose list link points at itself
        struct.pack("<Q", first_cache + k.btf.offsetof("kmem_cache", "list")),
    )
    size = k.btf.struct_size("kmem_cache")
    for c in list(caches)[1::3]:
        patch(c + (rng.randrange(0, size - 8) & ~7), struct.pack("<Q", rng.getrandbits(64)))
    for a in areas[::2]:
        patch(a - o_list + (rng.randrange(0, 48) & ~7), struct.pack("<Q", rng.getrandbits(64)))
    for _ in range(5000):
        patch(
            vmemmap + 64 * rng.randrange(0, 1 << 17) + (rng.randrange(0, 64) & ~7),
            struct.pack("<Q", rng.getrandbits(64)),
        )
    fs = {spec.name: c for spec, c in build_layers(ws, "fileserver")}
    pr = {spec.name: c for spec, c in build_layers(ws, "progressive")}
    kstruct, bulk = pages(fs["kstruct"]), pages(fs["bulk"])
    assert not kstruct & bulk and kstruct | bulk == pages(pr["kernel"])
    notes = fs["kstruct"].notes
    # the walk stops at the loop or at an earlier scribbled link, saying so; pages of unlisted caches are noted
    assert any(n.startswith("slab cache list:") and ("loops" in n or "broken" in n) for n in notes), notes
    print("\n" + "\n".join(n[:200] for n in notes))
