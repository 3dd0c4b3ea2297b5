"""The benchmark's synthetic snapshot (bench/_snapgen.py) is what it claims to be."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from _snapgen import KINDS, make_bench_snapshot, page_plan  # noqa: E402

from progdump.elfcore import load_elf_snapshot  # noqa: E402
from progdump.snapshot import PAGE_SIZE  # noqa: E402


def test_plan_is_half_zero_and_blended():
    runs = page_plan(262144, seed=7)
    total = {k: 0 for k in ("zero", *dict(KINDS))}
    for kind, n in runs:
        total[kind] += n
    assert sum(total.values()) == 262144
    assert total["zero"] == 131072
    for kind, weight in KINDS:
        assert abs(total[kind] / 131072 - weight) < 0.03, (kind, total)


def test_snapshot_file_loads_and_is_reproducible(tmp_path):
    size = 8 << 20
    a = make_bench_snapshot(tmp_path / "a.elf", size, seed=3)
    b = make_bench_snapshot(tmp_path / "b.elf", size, seed=3)
    digest = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.elf", "b.elf")]
    assert digest[0] == digest[1] and a["pages"] == b["pages"]
    with load_elf_snapshot(tmp_path / "a.elf") as s:
        assert s.total_bytes == size
        assert [(r.phys_start, r.phys_end) for r in s.ranges] == [(0, 0xA0000), (0x100000, size + 0x60000)]
        zero = sum(1 for pfn, n in s.pfn_runs() for p in range(pfn, pfn + n) if not any(s.page(p)))
        assert zero >= size // PAGE_SIZE // 2  # planned zero pages (sparse pages are never all zero)
        assert s.cpus and s.metadata["seed"] == 3
    # Reused from the cache when parameters match.
    mtime = (tmp_path / "a.elf").stat().st_mtime_ns
    make_bench_snapshot(tmp_path / "a.elf", size, seed=3)
    assert (tmp_path / "a.elf").stat().st_mtime_ns == mtime
