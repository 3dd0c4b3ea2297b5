"""Snapshot (progdump.snapshot): ranges, lookups, file mapping, VMCOREINFO."""

from __future__ import annotations

import pytest

from progdump.snapshot import PAGE_SIZE, MemoryRange, Snapshot, SnapshotError, parse_vmcoreinfo


def mr(phys: int, data: bytes) -> MemoryRange:
    return MemoryRange(phys, len(data), memoryview(data))


def test_ranges_sorted_and_checked():
    a, b = b"a" * PAGE_SIZE, b"b" * PAGE_SIZE
    s = Snapshot(ranges=[mr(0x3000, b), mr(0x2000, a)])
    assert [r.phys_start for r in s.ranges] == [0x2000, 0x3000]
    assert s.total_pages == 2 and list(s.pfn_runs()) == [(2, 1), (3, 1)]
    # Reads may span adjacent ranges; views may not.
    assert s.read_phys(0x2FFE, 4) == b"aabb"
    with pytest.raises(SnapshotError, match="not in snapshot"):
        s.view_phys(0x2FFE, 4)
    assert bytes(s.page(3)) == b
    assert s.has_phys(0x3FFF) and not s.has_phys(0x4000) and not s.has_phys(0x1000)
    with pytest.raises(SnapshotError, match="0x4000 not in snapshot"):
        s.read_phys(0x3000, PAGE_SIZE + 1)


@pytest.mark.parametrize(
    "ranges, match",
    [
        ([mr(0x100, bytes(PAGE_SIZE))], "not page aligned"),
        ([mr(0, bytes(100))], "not page aligned"),
        ([mr(0, bytes(2 * PAGE_SIZE)), mr(PAGE_SIZE, bytes(PAGE_SIZE))], "overlap"),
        ([MemoryRange(0, 2 * PAGE_SIZE, memoryview(bytes(PAGE_SIZE)))], "short buffer"),
    ],
)
def test_bad_ranges_rejected(ranges, match):
    with pytest.raises(SnapshotError, match=match):
        Snapshot(ranges=ranges)


def test_from_file_ranges_maps_without_copy(tmp_path):
    f = tmp_path / "ram.bin"
    f.write_bytes(bytes(range(256)) * 64)  # 4 pages
    with Snapshot.from_file_ranges(f, [(0x10000, 0, 2 * PAGE_SIZE), (0x20000, 2 * PAGE_SIZE, PAGE_SIZE)]) as s:
        assert s.read_phys(0x10001, 3) == b"\x01\x02\x03"
        assert s.ranges[0].buffer.readonly
        assert s.total_bytes == 3 * PAGE_SIZE


def test_from_file_ranges_errors_release_the_mapping(tmp_path):
    f = tmp_path / "ram.bin"
    f.write_bytes(bytes(2 * PAGE_SIZE))
    # A second range beyond EOF after a good first one: clean SnapshotError (was BufferError
    # from closing an mmap with a live view).
    with pytest.raises(SnapshotError, match="beyond end of file"):
        Snapshot.from_file_ranges(f, [(0, 0, PAGE_SIZE), (PAGE_SIZE, PAGE_SIZE, 2 * PAGE_SIZE)])
    with pytest.raises(SnapshotError, match="not page aligned"):
        Snapshot.from_file_ranges(f, [(0x10, 0, PAGE_SIZE)])
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(SnapshotError, match="empty file"):
        Snapshot.from_file_ranges(tmp_path / "empty", [])


def test_vmcoreinfo_parse_is_bounded_and_first_wins():
    raw = b"OSRELEASE=6.1\nJUNK\n=novalue\nOSRELEASE=other\n" + b"K" * 200 + b"=x\nPAGESIZE=4096\0\0"
    assert parse_vmcoreinfo(raw) == {"OSRELEASE": "6.1", "PAGESIZE": "4096"}


def test_close_is_idempotent(tmp_path):
    f = tmp_path / "ram.bin"
    f.write_bytes(bytes(PAGE_SIZE))
    s = Snapshot.from_file_ranges(f, [(0, 0, PAGE_SIZE)])

    def mapped() -> bool:  # the kernel's own list of this process's mappings, not the snapshot's state
        with open("/proc/self/maps") as m:
            return any(line.rstrip().endswith(str(f)) for line in m)

    assert mapped()
    s.close()
    assert not mapped()
    s.close()  # a second close neither raises nor maps anything again
    assert not mapped()


def _rss_file_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise LookupError


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_release_phys_drops_consumed_pages_from_the_resident_set(tmp_path):
    f = tmp_path / "ram.bin"
    size = 64 << 20
    with open(f, "wb") as fh:
        fh.write(b"\x5a" * size)
    with Snapshot.from_file_ranges(f, [(0x100000, 0, size)]) as s:
        before = _rss_file_kib()
        total = 0
        for off in range(0, size, 1 << 20):
            total += s.view_phys(0x100000 + off, 1 << 20)[4095]  # touch every page
            total += sum(s.view_phys(0x100000 + off, 1 << 20)[::4096])
        grown = _rss_file_kib()
        s.release_phys(0x100000, size)
        after = _rss_file_kib()
        assert grown - before > 48 * 1024, (before, grown)
        assert after - before < 8 * 1024, (before, grown, after)
        assert s.read_phys(0x100000 + size - 1, 1) == b"\x5a"  # still readable afterwards
