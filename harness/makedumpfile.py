"""Reading what makedumpfile prints and writes: the field's tool our layers are checked against.

Two small parsers, used by the VM tests and ``bench/linux_layers.py``:
the page counts of ``makedumpfile --message-level 23`` ("Pages filled with
zero : 0x...") and the dumpable-pfn bitmap of its kdump-compressed output
(the second bitmap: what ``-d N`` keeps, before zero pages are shared).
The kdump layout is makedumpfile's ``diskdump_data.h`` (disk_dump_header,
then the kdump sub-header, then two bitmaps of ``bitmap_blocks/2`` blocks
each); every field read is bounded by the file.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["kdump_kept_pfns", "message_counts", "KdumpError", "SetComparison", "compare_with_layer2"]

_COUNT = re.compile(r"^\s*([A-Za-z][A-Za-z ()-]*?)\s*:\s*0x([0-9a-fA-F]+)\b")
KDUMP_SIGNATURE = b"KDUMP   "
MAX_MAPNR = 1 << 40  # 52-bit physical addresses


class KdumpError(ValueError):
    """The file is not a kdump-compressed dump this parser can read; the message says why."""


def message_counts(text: str) -> dict[str, int]:
    """``{"Pages filled with zero": n, "Remaining pages": n, ...}`` from makedumpfile's report."""
    out: dict[str, int] = {}
    for line in text.splitlines()[:10000]:
        m = _COUNT.match(line)
        if m:
            out[m.group(1).strip()] = int(m.group(2), 16)
    return out


def kdump_kept_pfns(path: str | Path) -> np.ndarray:
    """Bool array over pfns: True where makedumpfile's kdump output marks the page dumpable."""
    d = Path(path).read_bytes()
    if d[:8] != KDUMP_SIGNATURE:
        raise KdumpError(f"{path}: not a kdump-compressed file (signature {d[:8]!r})")
    # disk_dump_header: signature[8], header_version i32, utsname (6 x 65 bytes), then an
    # 8-byte aligned struct timeval (16), status, block_size, sub_hdr_size, bitmap_blocks, max_mapnr
    off = 8 + 4 + 6 * 65
    off += -off % 8
    off += 16
    if len(d) < off + 20:
        raise KdumpError(f"{path}: truncated header")
    _status, block_size, sub_hdr_size, bitmap_blocks, max_mapnr = struct.unpack_from("<iiiII", d, off)
    if block_size <= 0 or block_size > 1 << 20 or sub_hdr_size < 0 or bitmap_blocks <= 0 or max_mapnr > MAX_MAPNR:
        raise KdumpError(f"{path}: implausible header (block {block_size}, bitmap blocks {bitmap_blocks})")
    start = (1 + sub_hdr_size) * block_size
    half = bitmap_blocks * block_size // 2
    if len(d) < start + 2 * half or half * 8 < max_mapnr:
        raise KdumpError(f"{path}: bitmaps past the end of the file")
    bits = np.frombuffer(d, dtype=np.uint8, count=half, offset=start + half)
    return np.unpackbits(bits, bitorder="little")[:max_mapnr].astype(bool)


@dataclass
class SetComparison:
    """Our page classes and makedumpfile's kept bitmap over the same pfns (from ``base_pfn``)."""

    base_pfn: int
    classes: np.ndarray  # our PageClass per pfn
    present: np.ndarray  # pfn in the snapshot
    ours: np.ndarray  # in our layer 2 (KERNEL or UNKNOWN, present)
    theirs: np.ndarray  # kept by makedumpfile (present)

    def count(self, cls: int) -> int:
        """Present pages of our class ``cls``."""
        return int((self.present & (self.classes == cls)).sum())


def compare_with_layer2(snapshot, page_classes, kept: np.ndarray) -> SetComparison:  # type: ignore[no-untyped-def]
    """Line up makedumpfile's kept pfns with our layer-2 set (classes KERNEL and UNKNOWN)."""
    from progdump.layers.base import PageClass  # noqa: PLC0415

    cls = np.frombuffer(bytes(page_classes.classes), dtype=np.uint8)
    n = min(len(cls), len(kept))
    present = np.zeros(n, dtype=bool)
    for first, cnt in snapshot.pfn_runs():
        lo = first - page_classes.base_pfn
        present[max(lo, 0) : min(lo + cnt, n)] = True
    cls = cls[:n]
    ours = present & ((cls == PageClass.KERNEL) | (cls == PageClass.UNKNOWN))
    return SetComparison(page_classes.base_pfn, cls, present, ours, present & kept[:n])
