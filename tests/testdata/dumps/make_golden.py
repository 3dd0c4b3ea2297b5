"""Build the golden progdump images in this directory (the images only).

Usage: ``python3 tests/testdata/dumps/make_golden.py``

Each ``<name>.img`` is a small dump device (32 KiB) written by the progdump
writer with a fixed dump id and time, sometimes cut as a power loss would
cut it, torn, or given a header of a newer format. The images are the
format's normative test vectors (docs/FORMAT.md section 13).

What a reader must report for each image is in ``<name>.expected.json``,
written by hand from the spec and from what this script puts in (the
snapshot's pages, the producer's artifacts, where a cut falls): this script
never writes an expectation, and never runs the reader. Rebuilding the
images changes nothing an expectation states (compressed sizes may differ
between zstd versions; no expectation names one).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

import xxhash

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, ROOT)

from progdump.device import DumpDevice  # noqa: E402
from progdump.layers.base import Artifact, LayerContent, PageClass, PageClassMap, Producer  # noqa: E402
from progdump import format as F  # noqa: E402
from progdump.snapshot import PAGE_SIZE, CpuState, MemoryRange, Note, Snapshot  # noqa: E402
from progdump.writer import write_dump  # noqa: E402

DEVICE_SIZE = 32 * 1024
T0 = 1_764_000_000_000_000_000  # fixed dump times (ns)


def golden_snapshot(tag: str) -> Snapshot:
    """8 pages: zero, text, and a page of counters; deterministic."""
    buf = bytearray(8 * PAGE_SIZE)
    for p in range(8):
        if p in (1, 5):
            continue  # zero pages
        line = f"golden {tag} page {p} ".encode()
        buf[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] = (line * (PAGE_SIZE // len(line) + 1))[:PAGE_SIZE]
    mv = memoryview(buf)
    return Snapshot(
        [MemoryRange(0, 4 * PAGE_SIZE, mv[: 4 * PAGE_SIZE]), MemoryRange(1 << 20, 4 * PAGE_SIZE, mv[4 * PAGE_SIZE :])],
        cpus=[CpuState(0, {"rip": 0xFFFFFFFF81234567, "rsp": 0xFFFFC90000003E00})],
        notes=[Note("VMCOREINFO", 0, b"OSRELEASE=golden\nPAGESIZE=4096\n")],
        console_tail=f"Kernel panic - not syncing: golden {tag}\n".encode(),
        metadata={"hostname": "golden"},
    )


class GoldenProducer(Producer):
    """Fixed artifacts and page classes, so the images do not change with the real producers."""

    name = "golden"

    def panic(self) -> LayerContent:
        return LayerContent(artifacts=[Artifact("panic.txt", b"panic: golden\n")], notes=["golden producer"])

    def tasks(self) -> LayerContent:
        return LayerContent(artifacts=[Artifact("tasks.txt", b"pid 1 golden-init\n" * 4)])

    def page_classes(self) -> PageClassMap:
        m = PageClassMap(0, 260, PageClass.USER)
        m.set_run(0, 4, PageClass.KERNEL)
        m.set_run(256, 2, PageClass.CACHE)
        return m


class RecDevice(DumpDevice):
    """Records writes and flushes (as a power-loss cut needs); fake clock."""

    def __init__(self, base: bytes) -> None:
        self.size = len(base)
        self.sector_size = 512
        self.image = bytearray(base)
        self.base = bytes(base)
        self.ops: list[tuple[str, int, bytes]] = []
        self.t = 0.0

    def write(self, offset: int, data) -> None:  # type: ignore[no-untyped-def]
        self.ops.append(("W", offset, bytes(data)))
        self.image[offset : offset + len(data)] = data
        self.t += 1e-4

    def flush(self) -> None:
        self.ops.append(("F", 0, b""))
        self.t += 1e-4

    def clock(self) -> float:
        return self.t

    def close(self) -> None:
        pass

    def cut(self, nops: int) -> bytes:
        """The device after a power loss following ``nops`` operations (every write landed)."""
        img = bytearray(self.base)
        for kind, off, data in self.ops[:nops]:
            if kind == "W":
                img[off : off + len(data)] = data
        return bytes(img)


def _write(tag: str, base: bytes, t: int) -> RecDevice:
    snap = golden_snapshot(tag)
    dev = RecDevice(base)
    write_dump(snap, dev, producer=GoldenProducer(snap), threads=1, dump_id=hashlib.sha256(tag.encode()).digest()[:16], dump_time_ns=t)
    return dev


def _records(img: bytes) -> list[F.RecordHeader]:
    """The record headers the writer laid down, back to back from LOG_START (format.py, not the reader)."""
    out, off = [], F.LOG_START
    while off < F.log_end(len(img)):
        h = F.parse_record_header(img[off : off + F.RECORD_HEADER_SIZE], off)
        if h is None:
            break
        out.append(h)
        off += h.span
    return out


def build() -> dict[str, bytes]:
    """name -> device image (see each image's ``why`` in its expected.json)."""
    out: dict[str, bytes] = {}
    a = _write("A", bytes(DEVICE_SIZE), T0)
    out["v1-complete"] = bytes(a.image)
    # power loss just before layer 2's first flush: every record of layers 0-2 written, layer 2
    # uncommitted (flushes: 0 layer-0 records, 1 layer-0 commit, 2 and 3 layer 1, 4 layer-2 records)
    flushes = [i for i, (k, _, _) in enumerate(a.ops) if k == "F"]
    out["v1-partial"] = a.cut(flushes[4])
    # dump B over dump A, power lost before the flush of B's layer-1 records (B flush 2)
    b = _write("B", out["v1-complete"], T0 + 10**9)
    fb = [i for i, (k, _, _) in enumerate(b.ops) if k == "F"]
    out["v1-newer-partial-over-older"] = b.cut(fb[2])
    # one torn sector inside the payload of the last PAGES record (layer 4, pfns 258-259)
    torn = bytearray(out["v1-complete"])
    last = [h for h in _records(out["v1-complete"]) if h.rtype == F.RecordType.PAGES][-1]
    assert (last.layer, last.aux0, last.aux1) == (4, 258, 2), last
    lo = last.offset + F.RECORD_HEADER_SIZE
    torn[lo : lo + min(last.stored_len, 256)] = b"\xff" * min(last.stored_len, 256)
    out["v1-torn-page-record"] = bytes(torn)
    # dump A, then both header copies of a newer dump C in format version 2 (its records lost)
    newer = bytearray(out["v1-complete"])
    for copy, off in ((0, 0), (1, DEVICE_SIZE - F.HEADER_BLOCK)):
        blk = bytearray(F.pack_header(F.DumpHeader(1, hashlib.sha256(b"C").digest()[:16], T0 + 2 * 10**9,
                                                   DEVICE_SIZE, 512, copy, 5, {"plan": "progressive"})))
        blk[8:10] = (2).to_bytes(2, "little")
        blk[4088:] = xxhash.xxh3_64_intdigest(bytes(blk[:4088])).to_bytes(8, "little")
        newer[off : off + F.HEADER_BLOCK] = blk
    out["v1-newer-unsupported-over-older"] = bytes(newer)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.parse_args()
    for name, img in build().items():
        with open(os.path.join(HERE, name + ".img"), "wb") as f:
            f.write(img)
        print(f"{name}: {len(img)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
