"""Helpers for the progdump format/writer/reader tests (not a test module).

* :func:`make_snapshot`: a synthetic Snapshot over bytearrays (no file, no
  QEMU), with zero, random and text pages, two ranges, one CPU, VMCOREINFO.
* :class:`MemDevice`: an in-memory DumpDevice that **records** every write and
  flush, with a fake clock that advances per write. It is a test fake of the
  device layer (the real one is FileDevice / the modelled device); it exists
  so tests can build crash states: all writes before the last flush persist,
  later ones as any subset, one maybe torn, the old content elsewhere.
* :func:`check_recovery`: the invariants every test asserts on a scan.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from progdump.device import DeviceError, DumpDevice, MediaError
from progdump.layers.base import LayerContent, PageClass, PageClassMap
from progdump.layers.generic import GenericProducer
from progdump.reader import ScanResult, iter_recovered_pages
from progdump.snapshot import PAGE_SIZE, CpuState, MemoryRange, Note, Snapshot

VMCOREINFO = b"OSRELEASE=6.1.0-test\nPAGESIZE=4096\n"


def make_snapshot(pages: int = 64, seed: int = 1, zero_frac: float = 0.4, tag: bytes = b"A") -> Snapshot:
    """``pages`` pages in two ranges (low memory and above 4 GiB); content depends on seed and tag."""
    rng = random.Random(seed)
    buf = bytearray(pages * PAGE_SIZE)
    for p in range(pages):
        k = rng.random()
        if k < zero_frac:
            continue
        if k < zero_frac + (1 - zero_frac) / 2:
            buf[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] = rng.randbytes(PAGE_SIZE)
        else:
            line = tag + b" page %d seed %d text " % (p, seed)
            buf[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] = (line * (PAGE_SIZE // len(line) + 1))[:PAGE_SIZE]
    mv = memoryview(buf)
    lo = (pages // 2) * PAGE_SIZE
    ranges = [MemoryRange(0, lo, mv[:lo]), MemoryRange(1 << 32, len(buf) - lo, mv[lo:])]
    return Snapshot(
        ranges,
        cpus=[CpuState(0, {"rip": 0xFFFFFFFF81000000 + seed, "rsp": 0xFFFF888000010000, "cr3": 0x1000})],
        notes=[Note("VMCOREINFO", 0, VMCOREINFO)],
        console_tail=b"boot\nKernel panic - not syncing: synthetic " + tag + b"\n",
        metadata={"os": "unknown", "hostname": "synthetic"},
    )


def snapshot_pages(snap: Snapshot) -> dict[int, bytes]:
    return {
        (r.phys_start // PAGE_SIZE) + i: bytes(r.buffer[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
        for r in snap.ranges
        for i in range(r.size // PAGE_SIZE)
    }


class ClassProducer(GenericProducer):
    """Generic producer plus page classes (first half KERNEL, next quarter CACHE, rest USER).

    A test producer so the kernel and cache layers carry pages.
    """

    name = "testclasses"

    def page_classes(self) -> PageClassMap | None:
        s = self.snapshot
        first = s.ranges[0].phys_start // PAGE_SIZE
        last = s.ranges[-1].phys_end // PAGE_SIZE
        m = PageClassMap(first, last - first, PageClass.USER)
        pfns = [pfn for a, n in s.pfn_runs() for pfn in range(a, a + n)]
        for i, pfn in enumerate(pfns):
            cls = (
                PageClass.KERNEL
                if i < len(pfns) // 2
                else PageClass.CACHE
                if i < 3 * len(pfns) // 4
                else PageClass.USER
            )
            m.set_run(pfn, 1, cls)
        return m

    def tasks(self) -> LayerContent:
        c = super().tasks()
        from progdump.layers.base import Artifact

        c.artifacts.append(Artifact("tasks.txt", b"pid 1 init\n" * 50))
        return c


@dataclass
class Op:
    kind: str  # "W" or "F"
    offset: int = 0
    data: bytes = b""


class MemDevice(DumpDevice):
    """In-memory recording DumpDevice (test fake; see the module docstring)."""

    def __init__(self, size: int, sector_size: int = 512, base: bytes | None = None, tick: float = 1e-4) -> None:
        self.size = size
        self.sector_size = sector_size
        self.path = "mem"
        self.base = bytes(base) if base is not None else bytes(size)
        assert len(self.base) == size
        self.image = bytearray(self.base)
        self.ops: list[Op] = []
        self.marks: list[tuple[int, str]] = []
        self.t = 0.0
        self.tick = tick
        self.fail_at: int | None = None  # raise DeviceError on writes touching this offset
        self.bad: list[tuple[int, int]] = []  # [lo, hi) regions where writes raise MediaError (EIO)
        self.failed: list[tuple[int, int]] = []  # (offset, length) of writes that failed there

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        data = bytes(data)
        assert offset % self.sector_size == 0 and len(data) % self.sector_size == 0, "unaligned write"
        if offset + len(data) > self.size:
            raise DeviceError("write past the end")
        if self.fail_at is not None and offset <= self.fail_at < offset + len(data):
            raise DeviceError(f"injected I/O error at {self.fail_at:#x}")
        if any(offset < hi and lo < offset + len(data) for lo, hi in self.bad):
            self.failed.append((offset, len(data)))
            self.ops.append(Op("X", offset, b""))  # a failed write, in order (no data reached the device)
            raise MediaError(f"injected EIO writing {len(data)} bytes at {offset:#x}", offset, len(data))
        self.image[offset : offset + len(data)] = data
        self.ops.append(Op("W", offset, data))
        self.t += self.tick

    def flush(self) -> None:
        self.ops.append(Op("F"))
        self.t += self.tick

    def mark(self, label: str) -> None:
        self.marks.append((len(self.ops), label))

    def clock(self) -> float:
        return self.t

    def close(self) -> None:
        pass

    # -- crash states ---------------------------------------------------------
    def state(self, nops: int, keep: set[int] | None = None, tear: tuple[int, int] | None = None) -> bytes:
        """Device content if power was lost after ``nops`` operations.

        Writes before the last flush among them persist; later writes persist
        only if their index is in ``keep`` (default: none). ``tear`` =
        (op index, sectors) keeps only that many leading sectors of one write.
        """
        ops = self.ops[:nops]
        last_flush = max((i for i, o in enumerate(ops) if o.kind == "F"), default=-1)
        img = bytearray(self.base)
        for i, o in enumerate(ops):
            if o.kind != "W":
                continue
            data = o.data
            if i > last_flush and (keep is None or i not in keep):
                continue
            if tear is not None and tear[0] == i:
                data = data[: tear[1] * self.sector_size]
            img[o.offset : o.offset + len(data)] = data
        return bytes(img)


class BytesSource:
    """``size``/``pread`` over bytes: what the reader's source protocol needs."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def pread(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


@dataclass
class Expect:
    """What a dump wrote: pages of the snapshot, artifacts per layer name."""

    pages: dict[int, bytes]
    other_pages: list[dict[int, bytes]] = field(default_factory=list)  # older dumps' pages (must not appear)


def recovered_pages(res: ScanResult) -> dict[int, bytes]:
    """Every page the scan recovered, read back through the reader's own API."""
    out: dict[int, bytes] = {}
    for first, n, skip, h in iter_recovered_pages(res):
        got = res.read_pages(h)
        assert got is not None, f"record {h.seq} verified at scan but not on re-read"
        npages, zmap, data = got
        pos = 0
        for i in range(n):
            z = zmap is None or (zmap[i // 8] >> (i % 8)) & 1
            if i >= skip:
                out[first + i] = bytes(PAGE_SIZE) if z else data[pos * PAGE_SIZE : (pos + 1) * PAGE_SIZE]
            if not z:
                pos += 1
    return out


def check_recovery(
    res: ScanResult, pages: dict[int, bytes], dump_id: str | None, layer_pages: dict[int, set[int]] | None = None
) -> dict[int, bytes]:
    """Assert the no-false-accept invariants; returns the recovered pages.

    * a recovered page equals what the snapshot had (never other content);
    * the dump found is ``dump_id`` (or none);
    * a complete layer has all of its pages (``layer_pages``: layer -> pfns).
    """
    if not res.found:
        return {}
    assert res.dump_id == dump_id, f"scan returned dump {res.dump_id}, expected {dump_id}"
    got = recovered_pages(res)
    for pfn, data in got.items():
        assert pfn in pages, f"page {pfn:#x} recovered but never written"
        assert data == pages[pfn], f"page {pfn:#x} recovered with wrong content"
    if layer_pages:
        for lay in res.layers:
            if lay.status == "complete":
                missing = layer_pages.get(lay.index, set()) - set(got)
                assert not missing, f"layer {lay.index} complete but {len(missing)} pages missing"
    return got


def crash_states(dev: MemDevice, rng, n: int):
    """Random crash states of a recorded dump: ``(cut, keep, tear, last_flush)``.

    A cut after some operation, a random subset of the writes not yet flushed,
    maybe one of them torn; ``last_flush`` is the index of the last flush
    before the cut (-1 if none). Feed the first three to ``MemDevice.state``.
    """
    nops = len(dev.ops)
    for _ in range(n):
        cut = rng.randrange(0, nops + 1)
        last_flush = max((i for i in range(cut) if dev.ops[i].kind == "F"), default=-1)
        unflushed = [i for i in range(last_flush + 1, cut) if dev.ops[i].kind == "W"]
        keep = {i for i in unflushed if rng.random() < 0.5}
        tear = None
        if unflushed and rng.random() < 0.5:
            i = rng.choice(unflushed)
            keep.add(i)
            tear = (i, rng.randrange(0, len(dev.ops[i].data) // 512))
        yield cut, keep, tear, last_flush


def writer_records(img: bytes, align: int = 512) -> list[dict[str, int]]:
    """The records a writer laid down, by an independent parse of FORMAT.md section 5 (not the reader,
    not format.py): walk from 4096 while the record magic is there. For ground truth on dumps
    written without write errors (their log is contiguous)."""
    import struct

    out, off = [], 4096
    while off + 128 <= len(img) - 4096 and img[off : off + 8] == b"\x89PDREC\r\n":
        rtype, layer = struct.unpack_from("<HH", img, off + 12)
        seq, at, stored = struct.unpack_from("<QQI", img, off + 40)
        aux0, aux1 = struct.unpack_from("<QQ", img, off + 64)
        assert at == off
        span = 128 + stored
        span += -span % align
        out.append({"type": rtype, "layer": layer, "seq": seq, "offset": off, "span": span, "aux0": aux0, "aux1": aux1})
        off += span
    return out
