"""Synthetic benchmark snapshot: an ELF core of guest memory with a known blend.

Why synthetic: the write benchmark needs a 1 GiB snapshot whose content mix
is fixed and documented, so figures are comparable run to run; a booted
guest's RAM is mostly zero and varies.

The blend (by page; ``seed`` fixes everything):

* 50 % zero pages, in runs (geometric lengths, mean 32 pages), as free
  memory is.
* 50 % mixed pages, in runs of 1-16 pages of one kind:

  - 35 % text: lines of kernel-log and source-like words (compress ~3x);
  - 30 % structures: arrays of 64-byte records with direct-map pointers,
    counters, flags and zero padding, like slab caches (compress ~4-8x);
  - 25 % random bytes: already compressed or encrypted data (incompressible);
  - 10 % sparse: page-table-like pages, 1 entry in 8 set (compress well).

Pages of one kind are drawn from a pool (text 2048 pages, structures 512)
rotated by a random offset, so they are never byte-identical and zstd's
window (512 KiB at level 1) rarely sees a repeat.

Layout: two PT_LOADs like a small PC: [0, 640 KiB) and [1 MiB, 1 MiB +
size - 640 KiB), ``size`` bytes in all. Zero runs are file holes (sparse).
Cached by parameters: a second call with the same ones reuses the file.
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from progdump.elfcore import ElfCoreWriter, ElfSegment, snapshot_notes  # noqa: E402
from progdump.snapshot import PAGE_SIZE, CpuState, Note  # noqa: E402

GEN_VERSION = 1
DEFAULT_SEED = 2026
KINDS = (("text", 0.35), ("struct", 0.30), ("random", 0.25), ("sparse", 0.10))
WORDS = (
    "the of and to in is for on with that kernel page memory cpu task lock irq "
    "struct return if else int unsigned long static const void null err ret "
    "sched mm fs net dev blk sda nvme ext4 xfs zfs arc txg spa vdev dnode "
    "0x0 0x1 0xffff888 alloc free map unmap flush sync write read open close "
    "[  12.345678] Call Trace: RIP: RSP: RAX: RBX: <TASK> </TASK> ? __schedule"
).split()


def _text_pool(rng: random.Random, n: int) -> bytes:
    out = bytearray()
    while len(out) < n * PAGE_SIZE:
        words = rng.choices(WORDS, k=rng.randint(4, 14))
        out += (" ".join(words) + ("\n" if rng.random() < 0.8 else ";\n\t")).encode()
    return bytes(out[: n * PAGE_SIZE])


def _struct_pool(rng: random.Random, n: int) -> bytes:
    rec = struct.Struct("<QQIIQQHHI8x8x")  # 64 bytes
    assert rec.size == 64
    out = bytearray(n * PAGE_SIZE)
    base = 0xFFFF888000000000
    for p in range(n):
        slab = base + rng.randrange(1 << 30) * 64
        for i in range(PAGE_SIZE // 64):
            rec.pack_into(
                out, p * PAGE_SIZE + i * 64,
                slab + i * 64 + 64, slab + i * 64 - 64,  # list next/prev
                rng.randrange(1 << 16), rng.choice((0, 1, 0x41, 0x8000)),  # refcount, flags
                base + rng.randrange(1 << 24) * 4096, 0,  # a page pointer, NULL
                rng.randrange(64), 0xFFFF, rng.randrange(1 << 20),
            )  # fmt: skip
    return bytes(out)


def _rotated(pool: bytes, rng: random.Random) -> bytes:
    o = rng.randrange(0, len(pool) - PAGE_SIZE) & ~7
    return pool[o : o + PAGE_SIZE]


def _sparse_page(rng: random.Random) -> bytes:
    page = bytearray(PAGE_SIZE)
    for slot in rng.sample(range(PAGE_SIZE // 8), PAGE_SIZE // 64):
        struct.pack_into("<Q", page, slot * 8, (rng.randrange(1 << 22) << 12) | 0x67)
    return bytes(page)


def page_plan(total_pages: int, seed: int) -> list[tuple[str, int]]:
    """Runs ``(kind, npages)`` covering ``total_pages``: half zero, half mixed."""
    rng = random.Random(seed)
    runs: list[tuple[str, int]] = []
    zero_left = total_pages // 2
    mixed_left = total_pages - zero_left
    names = [k for k, _ in KINDS]
    weights = [w for _, w in KINDS]
    while zero_left or mixed_left:
        # Alternate a zero run and a stretch of mixed runs of similar total size.
        if zero_left:
            n = min(zero_left, max(1, int(rng.expovariate(1 / 32))))
            runs.append(("zero", n))
            zero_left -= n
        target = min(mixed_left, max(1, int(rng.expovariate(1 / 32))))
        if not zero_left:
            target = mixed_left
        mixed_left -= target
        while target:
            n = min(target, rng.randint(1, 16))
            runs.append((rng.choices(names, weights)[0], n))
            target -= n
    return runs


def make_bench_snapshot(path: str | os.PathLike[str], size: int = 1 << 30, seed: int = DEFAULT_SEED) -> dict:
    """Write (or reuse) the benchmark snapshot at ``path``; return its description."""
    path = Path(path)
    if size % PAGE_SIZE or size <= 0xA0000:
        raise ValueError("size must be a page multiple above 640 KiB")
    desc = {"gen_version": GEN_VERSION, "size": size, "seed": seed, "blend": dict(KINDS), "zero_fraction": 0.5}
    sidecar = path.with_suffix(path.suffix + ".json")
    if path.exists() and sidecar.exists():
        try:
            old = json.loads(sidecar.read_text())
            if {k: old.get(k) for k in desc} == desc and path.stat().st_size == old.get("file_size"):
                return old
        except (OSError, ValueError):
            pass
    rng = random.Random(seed ^ 0x5EED)
    text = _text_pool(rng, 2048)
    structs = _struct_pool(rng, 512)
    low = 0xA0000
    segs = [ElfSegment(0, low, low), ElfSegment(0x100000, size - low, size - low)]
    counts = {k: 0 for k in ("zero", *dict(KINDS))}
    cpus = [CpuState(0, {"rip": 0xFFFFFFFF81A00000, "rsp": 0xFFFFC90000003E00, "cr3": 0x10A000})]
    notes = snapshot_notes(
        cpus,
        [Note("VMCOREINFO", 0, b"OSRELEASE=bench\nPAGESIZE=4096\n")],
        b"bench snapshot\n",
        {"os": "unknown", "guest": "synthetic-bench", **desc},
    )
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with ElfCoreWriter(tmp, notes, segs) as w:
        for kind, n in page_plan(size // PAGE_SIZE, seed):
            counts[kind] += n
            if kind == "zero":
                w.write_zeros(n * PAGE_SIZE)
                continue
            buf = bytearray()
            for _ in range(n):
                if kind == "text":
                    buf += _rotated(text, rng)
                elif kind == "struct":
                    buf += _rotated(structs, rng)
                elif kind == "random":
                    buf += rng.randbytes(PAGE_SIZE)
                else:
                    buf += _sparse_page(rng)
            w.write(buf)
    os.replace(tmp, path)
    desc.update(pages=counts, file_size=path.stat().st_size, path=str(path))
    sidecar.write_text(json.dumps(desc, indent=1))
    return desc


if __name__ == "__main__":
    import argparse
    import time

    ap = argparse.ArgumentParser(description="write the synthetic benchmark snapshot (ELF core)")
    ap.add_argument("path")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    a = ap.parse_args()
    t0 = time.perf_counter()
    d = make_bench_snapshot(a.path, a.size_mib << 20, a.seed)
    print(json.dumps(d, indent=1), f"\n{time.perf_counter() - t0:.1f} s")
