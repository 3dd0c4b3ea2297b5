"""Layer 0 as raw pages (rawpanic.py) and its rendering at recovery (recovery.py, render_at_recovery.py).

The memory is a hand-built image (test_linux_image.Image) holding a printk
ring built from printk_ringbuffer.h's layout (test_linux_printk.build_ring)
at vmalloc-style addresses reached only through page tables, and a stack
page with a marker. Expected text is written out here by hand.
"""

from __future__ import annotations

import struct

import pytest
from test_linux_image import PAGE, PHYS_BASE, Image
from test_linux_printk import COUNT_BITS, SIZE_BITS, VI_PRINTK, build_ring

from progdump.devmodel import open_device
from progdump.export import export
from progdump.format import LOG_START
from progdump.layers import build_layers, raw_panic_content
from progdump.layers.linux.rawpanic import RawPanicError, raw_panic
from progdump.layers.linux.recovery import render_from_pages
from progdump.layers.linux.translate import START_KERNEL_MAP
from progdump.reader import scan
from progdump.snapshot import CpuState, MemoryRange, Note, Snapshot
from progdump.writer import write_dump

VMALLOC = 0xFFFFC90000000000
STACK_VA = 0xFFFFC90000100000
MESSAGES = [b"first line", b"Kernel panic - not syncing: boom", b"Call Trace:", b" panic+0x1/0x2"]
EXPECTED_DMESG = ("[    0.001500] first line\n[    0.003000] Kernel panic - not syncing: boom\n"
                  "[    0.004500] Call Trace:\n[    0.006000]  panic+0x1/0x2\n")  # fmt: skip


def panicked_image() -> tuple[Image, Snapshot, int]:
    img = Image()
    descs, infos, data, head, tail = build_ring(MESSAGES)
    va = VMALLOC
    where = {}
    for name, blob in (("descs", descs), ("infos", infos), ("data", data), ("rb", bytes(88))):
        pa = img.alloc_page()
        img.map(va, pa)
        img.put(pa, blob)
        where[name] = (va, pa)
        va += 2 * PAGE  # a hole between them, as vmalloc leaves guard pages
    rb_pa = where["rb"][1]
    struct.pack_into("<IxxxxQQQQ", img.mem, rb_pa, COUNT_BITS, where["descs"][0], where["infos"][0], head, tail)
    struct.pack_into("<IxxxxQQQ", img.mem, rb_pa + 48, SIZE_BITS, where["data"][0], 0, 0)
    prb = img.image_alloc(8)
    img.q(img.image_pa(prb), where["rb"][0])
    stack_pa = img.alloc_page(4)
    for i in range(4):
        img.map(STACK_VA + i * PAGE, stack_pa + i * PAGE)
    img.put(stack_pa + 3 * PAGE, b"STACK-MARKER")
    top = img.pgd - PHYS_BASE + START_KERNEL_MAP
    vi = (
        VI_PRINTK + f"SYMBOL(prb)={prb:x}\nSYMBOL(init_top_pgt)={top:x}\nNUMBER(phys_base)={PHYS_BASE}\nPAGESIZE=4096\n"
    )
    snap = img.snapshot(notes=[Note("VMCOREINFO", 0, vi.encode())],
                        cpus=[CpuState(0, {"rip": 0xFFFFFFFF81000010, "rsp": STACK_VA + 3 * PAGE + 0x40})],
                        console_tail=b"console says hi\n", metadata={"os": "linux"})  # fmt: skip
    return img, snap, stack_pa


def only_pages(snap: Snapshot, runs: list[tuple[int, int]]) -> Snapshot:
    """A snapshot holding just these page runs (what recovery of layer 0 alone yields)."""
    ranges = [MemoryRange(p * PAGE, n * PAGE, memoryview(bytes(snap.read_phys(p * PAGE, n * PAGE)))) for p, n in runs]
    return Snapshot(ranges=ranges, cpus=snap.cpus, notes=snap.notes, console_tail=snap.console_tail)


def test_raw_pages_hold_the_ring_and_the_stack_and_render_alone() -> None:
    _img, snap, stack_pa = panicked_image()
    c = raw_panic(snap)
    runs = list(c.page_runs())
    pfns = {p + i for p, n in runs for i in range(n)}
    assert {stack_pa // PAGE + i for i in range(4)} <= pfns  # the whole THREAD_SIZE block around rsp
    assert len(pfns) < 40  # ring pages, page tables, the prb pointer: not the whole 16 MiB
    files, notes = render_from_pages(only_pages(snap, runs))
    assert files["dmesg.txt"].decode() == EXPECTED_DMESG
    txt = files["panic.txt"].decode()
    assert "Kernel panic - not syncing: boom" in txt and " panic+0x1/0x2" in txt
    assert "rendered at recovery from layer 0's raw pages" in txt


def test_missing_vmcoreinfo_and_generic_fallback() -> None:
    _img, snap, _ = panicked_image()
    bare = Snapshot(ranges=list(snap.ranges), cpus=snap.cpus, console_tail=b"Kernel panic - not syncing: x\n")
    with pytest.raises(RawPanicError, match="VMCOREINFO"):
        raw_panic(bare)
    content, reasons = raw_panic_content(bare)  # no producer accepts it: the generic layer 0
    assert [a.name for a in content.artifacts] == ["panic.txt"] and reasons == []


def test_plan_layer0_raw_then_recovery_of_layer0_alone_renders(tmp_path) -> None:
    _img, snap, _ = panicked_image()
    layers = build_layers(snap, "progressive-raw")
    names0 = {a.name for a in layers[0][1].artifacts}
    assert "panic-raw.json" in names0 and "panic.txt" not in names0
    path = tmp_path / "dev.img"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    dev = open_device(str(path))
    try:
        res = write_dump(snap, dev, plan="progressive-raw")
    finally:
        dev.close()
    assert res.layers[0].committed and res.layers[0].pages > 0
    with open(path, "r+b") as f:  # cut the device right after layer 0: what a reset there leaves
        f.seek(LOG_START + res.layers[0].bytes)
        f.write(bytes(8 << 20))
    found = scan(str(path))
    assert [lay.status for lay in found.layers][:2] == ["complete", "missing"]
    m = export(found, str(tmp_path / "out"))
    assert (tmp_path / "out" / "dmesg.txt").read_text() == EXPECTED_DMESG
    assert "Kernel panic - not syncing: boom" in (tmp_path / "out" / "panic.txt").read_text()
    assert m["artifacts"]["panic.txt"] == 0


def test_the_raw_artifact_is_a_function_of_the_snapshot_alone() -> None:
    """Scoring compares each artifact with the producer's output for the same snapshot (harness.scoring):
    a timing inside it (the raw layer once carried ``capture_ms``) made every progressive-raw dump look
    like a false accept."""
    _img, snap, _ = panicked_image()
    a, b = raw_panic(snap), raw_panic(snap)
    assert [x.data for x in a.artifacts] == [x.data for x in b.artifacts]
    assert b"_ms" not in a.artifacts[0].data


def test_plan_raw_kernel_full_recovery_renders_panic_text(tmp_path) -> None:
    """``raw-kernel``: nothing decoded while writing; recovery renders panic.txt/dmesg.txt from the pages."""
    _img, snap, _ = panicked_image()
    path = tmp_path / "dev.img"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    dev = open_device(str(path))
    try:
        res = write_dump(snap, dev, plan="raw-kernel")
    finally:
        dev.close()
    assert res.complete and [lay.name for lay in res.layers] == ["panic", "kernel", "cache", "all"]
    assert not any("panic.txt" in lay.artifacts or "tasks.txt" in lay.artifacts for lay in res.layers)
    found = scan(str(path))
    assert [lay.status for lay in found.layers] == ["complete"] * 4
    export(found, str(tmp_path / "out"))
    assert (tmp_path / "out" / "dmesg.txt").read_text() == EXPECTED_DMESG
    assert "Kernel panic - not syncing: boom" in (tmp_path / "out" / "panic.txt").read_text()
    total = sum(r.size for r in snap.ranges) // PAGE
    assert sum(lay.pages for lay in res.layers) == total  # every page of the snapshot, once
