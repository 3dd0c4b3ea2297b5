"""Regenerate the golden progdump images in this directory and their expected manifests.

Usage: ``python3 tests/testdata/dumps/make_golden.py [--check]``

Each ``<name>.img`` is a small dump device (32 KiB) written by the progdump
writer with a fixed dump id and time, sometimes cut as a power loss would
cut it; ``<name>.expected.json`` is what ``progdump recover`` must report
for it (layer table, artifacts, a digest of the recovered pages). The images
are the format's compatibility fixtures: a future reader must still read
them exactly so (tests/unit/test_reader_golden.py). ``--check`` rebuilds them
in memory and reports any difference from the files (manifests, not bytes:
zstd output may differ between library versions).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, ROOT)

from progdump.device import DumpDevice  # noqa: E402
from progdump.layers.base import Artifact, LayerContent, PageClass, PageClassMap, Producer  # noqa: E402
from progdump.reader import ScanResult, iter_recovered_pages, scan  # noqa: E402
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


def build() -> dict[str, bytes]:
    """name -> device image."""
    out: dict[str, bytes] = {}
    a = _write("A", bytes(DEVICE_SIZE), T0)
    out["v1-complete"] = bytes(a.image)
    # cut after the commit of layer 1 and the first record write of layer 2
    flushes = [i for i, (k, _, _) in enumerate(a.ops) if k == "F"]
    out["v1-partial"] = a.cut(flushes[3] + 2)  # 2 flushes per layer: layers 0, 1 committed
    b = _write("B", out["v1-complete"], T0 + 10**9)
    fb = [i for i, (k, _, _) in enumerate(b.ops) if k == "F"]
    out["v1-newer-partial-over-older"] = b.cut(fb[1] + 2)  # layer 0 committed, layer 1 records landed, no commit
    torn = bytearray(out["v1-complete"])
    res = scan(_Bytes(bytes(torn)))
    last = max(r.h.offset for r in res._recs if r.h.rtype == 3)  # last PAGES record
    torn[last + 512 : last + 1024] = b"\xff" * 512  # one torn sector inside its payload
    out["v1-torn-page-record"] = bytes(torn)
    return out


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    def pread(self, off: int, n: int) -> bytes:
        return self.data[off : off + n]


def expected(res: ScanResult) -> dict[str, object]:
    """The stable part of what recovery reports."""
    h = hashlib.sha256()
    npages = 0
    for first, n, skip, rh in iter_recovered_pages(res):
        got = res.read_pages(rh)
        assert got is not None
        _, zmap, data = got
        pos = 0
        for i in range(n):
            z = zmap is None or (zmap[i // 8] >> (i % 8)) & 1
            page = bytes(PAGE_SIZE) if z else data[pos * PAGE_SIZE : (pos + 1) * PAGE_SIZE]
            if not z:
                pos += 1
            if i >= skip:
                h.update((first + i).to_bytes(8, "little") + page)
                npages += 1
    return {
        "found": res.found,
        "dump_id": res.dump_id,
        "format_version": res.format_version,
        "layers": [
            {"index": lay.index, "name": lay.name, "status": lay.status, "bytes": lay.bytes, "pages": lay.pages, "artifacts": lay.artifacts}
            for lay in res.layers
        ],
        "artifacts": {n: hashlib.sha256(res.read_artifact(n) or b"").hexdigest() for n in sorted(res.artifact_names())},
        "recovered_pages": npages,
        "pages_sha256": h.hexdigest(),
        "end": res.end,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare, do not write")
    a = ap.parse_args()
    bad = 0
    for name, img in build().items():
        exp = expected(scan(_Bytes(img)))
        ipath, epath = os.path.join(HERE, name + ".img"), os.path.join(HERE, name + ".expected.json")
        text = json.dumps(exp, indent=1, sort_keys=True) + "\n"
        if a.check:
            try:
                old = open(epath).read()
            except OSError:
                old = ""
            if old != text:
                print(f"{name}: expected manifest differs from a fresh build")
                bad += 1
            continue
        with open(ipath, "wb") as f:
            f.write(img)
        with open(epath, "w") as f:
            f.write(text)
        print(f"{name}: {len(img)} bytes, layers {[lay['status'] for lay in exp['layers']]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
