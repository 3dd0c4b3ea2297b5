"""Score a recovery against ground truth: what was written is what came back.

Ground truth is the :class:`~progdump.snapshot.Snapshot` the writer dumped,
the layer contents the producer made of it (a pure function of the snapshot:
:func:`expected_layers`), and the markers the guest planted before its panic
(``GuestSession.markers``). A recovery is ``progdump recover``'s OUTDIR:
``manifest.json`` (per-layer status), the artifact files and ``vmcore``.

Per layer the score says: what the reader claimed (complete, partial,
missing), whether the content is verified (every artifact byte-equal to the
producer's, every page the vmcore carries byte-equal to the snapshot, and
for a complete layer every expected page present or known zero), and how
many pages and artifact bytes came back.

A **false accept** is anything recovered that is not what was written: an
artifact whose bytes differ, a page whose bytes differ, or a layer claimed
complete whose content is not all there. It must never happen; scoring is
the check, and a unit test plants one to prove scoring catches it.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from progdump.snapshot import PAGE_SIZE, Snapshot

__all__ = [
    "ExpectedLayer",
    "LayerScore",
    "Score",
    "expected_layers",
    "score_recovery",
    "vmcore_loads",
    "ScoringError",
]

MAX_MANIFEST = 16 << 20
MAX_PHDRS = 1 << 16
CHUNK = 16 << 20


class ScoringError(Exception):
    """The recovery output cannot be scored (the message says why)."""


@dataclass
class ExpectedLayer:
    """What the writer was asked to put in one layer."""

    index: int
    name: str
    artifacts: dict[str, bytes]
    pfns: np.ndarray  # sorted unique pfns first written by this layer


def expected_layers(snapshot: Snapshot, plan: str = "progressive") -> list[ExpectedLayer]:
    """The producer's layers for ``snapshot`` under ``plan``, pages deduplicated across layers.

    The writer skips pages an earlier layer already wrote; so does this.
    """
    from progdump.layers import iter_layers

    seen: set[int] = set()
    out = []
    for spec, content in iter_layers(snapshot, plan):
        arts = {a.name: bytes(a.data) for a in content.artifacts}
        pf: list[np.ndarray] = []
        for first, n in content.page_runs():
            pf.append(np.arange(first, first + n, dtype=np.int64))
        arr = np.unique(np.concatenate(pf)) if pf else np.zeros(0, dtype=np.int64)
        if seen:
            arr = arr[~np.isin(arr, np.fromiter(seen, dtype=np.int64, count=len(seen)))]
        seen.update(arr.tolist())
        out.append(ExpectedLayer(spec.index, spec.name, arts, arr))
    return out


@dataclass
class LayerScore:
    index: int
    name: str
    status: str  # the reader's claim: complete | partial | missing
    verified: bool  # content checked and equal to ground truth
    expected_pages: int = 0
    pages_recovered: int = 0  # expected pages present (or known zero)
    bad_pages: int = 0
    artifacts_ok: int = 0
    artifacts_bad: list[str] = field(default_factory=list)
    artifacts_missing: list[str] = field(default_factory=list)
    bytes: int = 0

    @property
    def complete(self) -> bool:
        """Complete as claimed *and* verified."""
        return self.status == "complete" and self.verified


@dataclass
class Score:
    layers: list[LayerScore]
    false_accept: bool
    reasons: list[str]
    bytes_recovered: int
    markers: dict[str, bool] = field(default_factory=dict)
    dump_id: str | None = None
    found: bool = True

    @property
    def layers_recovered(self) -> int:
        """Leading layers complete and verified (0..n): the curve's y value."""
        n = 0
        for ls in self.layers:
            if not ls.complete:
                break
            n += 1
        return n

    def statuses(self) -> list[str]:
        return [ls.status if ls.status != "complete" or ls.verified else "complete-unverified" for ls in self.layers]

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["layers_recovered"] = self.layers_recovered
        return d


def vmcore_loads(path: str) -> list[tuple[int, int, int]]:
    """PT_LOAD file-backed extents of an ELF64 core: ``(paddr, file_offset, filesz)``.

    Bounded and defensive: the vmcore comes from a device we do not trust.
    """
    try:
        with open(path, "rb") as f:
            hdr = f.read(64)
            size = os.fstat(f.fileno()).st_size
            if len(hdr) < 64 or hdr[:4] != b"\x7fELF" or hdr[4] != 2 or hdr[5] != 1:
                raise ScoringError(f"{path}: not a little-endian ELF64 file")
            (phoff,) = struct.unpack_from("<Q", hdr, 32)
            phentsize, phnum = struct.unpack_from("<HH", hdr, 54)
            if phentsize < 56 or phnum > MAX_PHDRS or phoff + phentsize * phnum > size:
                raise ScoringError(f"{path}: program headers out of bounds")
            f.seek(phoff)
            raw = f.read(phentsize * phnum)
    except OSError as e:
        raise ScoringError(f"{path}: {e.strerror}") from None
    out = []
    for i in range(phnum):
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, _memsz = struct.unpack_from("<IIQQQQQ", raw, i * phentsize)
        if p_type != 1 or p_filesz == 0:
            continue
        if p_offset + p_filesz > size:
            raise ScoringError(f"{path}: PT_LOAD {i} extends past the end of the file")
        out.append((p_paddr, p_offset, p_filesz))
    return out


def _zero_pfns(snapshot: Snapshot) -> np.ndarray:
    """Pfns of all-zero pages in the snapshot (vectorised; one pass over memory)."""
    out = []
    for r in snapshot.ranges:
        a = np.frombuffer(r.buffer, dtype=np.uint64, count=r.size // 8).reshape(-1, PAGE_SIZE // 8)
        z = ~a.any(axis=1)
        out.append(np.nonzero(z)[0].astype(np.int64) + r.phys_start // PAGE_SIZE)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _check_pages(snapshot: Snapshot, vmcore: str) -> tuple[np.ndarray, np.ndarray]:
    """Pfns the vmcore carries, and those among them whose bytes differ from the snapshot."""
    present: list[np.ndarray] = []
    bad: list[np.ndarray] = []
    loads = vmcore_loads(vmcore)
    if not loads:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    import mmap

    with open(vmcore, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            for paddr, foff, n in loads:
                if paddr % PAGE_SIZE or n % PAGE_SIZE:
                    raise ScoringError(f"{vmcore}: PT_LOAD at {paddr:#x}+{n:#x} not page aligned")
                first = paddr // PAGE_SIZE
                present.append(np.arange(first, first + n // PAGE_SIZE, dtype=np.int64))
                for c in range(0, n, CHUNK):  # bounded memory: compare 16 MiB at a time
                    m = min(CHUNK, n - c)
                    pfns = np.arange((paddr + c) // PAGE_SIZE, (paddr + c + m) // PAGE_SIZE, dtype=np.int64)
                    got = np.frombuffer(mm, dtype=np.uint64, count=m // 8, offset=foff + c).reshape(len(pfns), -1)
                    try:
                        want_b = snapshot.read_phys(paddr + c, m)
                    except Exception:
                        bad.append(pfns)  # pages the snapshot does not have cannot have been written
                        del got
                        continue
                    want = np.frombuffer(want_b, dtype=np.uint64).reshape(len(pfns), -1)
                    diff = (got != want).any(axis=1)
                    if diff.any():
                        bad.append(pfns[diff])
                    del got, want
        finally:
            mm.close()
    return np.concatenate(present), (np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64))


def _load_manifest(outdir: Path) -> dict:
    p = outdir / "manifest.json"
    try:
        raw = p.read_bytes()[: MAX_MANIFEST + 1]
    except OSError as e:
        raise ScoringError(f"{p}: {e.strerror}") from None
    if len(raw) > MAX_MANIFEST:
        raise ScoringError(f"{p}: larger than {MAX_MANIFEST} bytes")
    try:
        m = json.loads(raw)
    except ValueError as e:
        raise ScoringError(f"{p}: not JSON: {e}") from None
    if not isinstance(m, dict) or not isinstance(m.get("layers"), list):
        raise ScoringError(f"{p}: no 'layers' list")
    return m


def score_recovery(
    outdir: str | os.PathLike[str] | None,
    snapshot: Snapshot,
    expected: list[ExpectedLayer],
    markers: dict[str, object] | None = None,
) -> Score:
    """Score recovery output ``outdir`` (None: the reader found no dump) against ground truth."""
    reasons: list[str] = []
    if outdir is None or not (Path(outdir) / "manifest.json").exists():
        layers = [LayerScore(e.index, e.name, "missing", True, len(e.pfns)) for e in expected]
        return Score(layers, False, [], 0, _markers(markers, None, layers), None, False)
    out = Path(outdir)
    man = _load_manifest(out)
    origin = man.get("artifacts") if isinstance(man.get("artifacts"), dict) else {}
    claimed = {}
    for entry in man["layers"]:
        if isinstance(entry, dict) and isinstance(entry.get("index"), int):
            claimed[entry["index"]] = entry
    vm = out / "vmcore"
    if vm.exists():
        present, bad = _check_pages(snapshot, str(vm))
    else:
        present, bad = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if len(bad):
        reasons.append(f"{len(bad)} recovered pages differ from the snapshot (first pfn {int(bad[0]):#x})")
    zero = _zero_pfns(snapshot)
    have = np.union1d(present, zero)
    layers: list[LayerScore] = []
    total = 0
    for e in expected:
        c = claimed.get(e.index, {})
        status = str(c.get("status", "missing"))
        if status not in ("complete", "partial", "missing"):
            reasons.append(f"layer {e.index}: unknown status {status!r}")
            status = "missing"
        nbytes = int(c.get("bytes", 0)) if isinstance(c.get("bytes", 0), int) else 0
        ls = LayerScore(e.index, e.name, status, True, len(e.pfns), bytes=nbytes)
        ls.pages_recovered = int(np.isin(e.pfns, have, assume_unique=True).sum()) if len(e.pfns) else 0
        ls.bad_pages = int(np.isin(e.pfns, bad).sum()) if len(bad) and len(e.pfns) else 0
        if ls.bad_pages:
            ls.verified = False
        for name, data in e.artifacts.items():
            p = out / name
            src = origin.get(name)
            if not p.exists() or (isinstance(src, int) and not isinstance(src, bool) and src != e.index):
                # absent, or the manifest says another layer made it (recovery renders panic.txt from
                # layer 0's raw pages when layer 1 is lost): not this layer's artifact
                ls.artifacts_missing.append(name)
                continue
            got = p.read_bytes()
            if got == data:
                ls.artifacts_ok += 1
            else:
                ls.artifacts_bad.append(name)
                ls.verified = False
                reasons.append(f"layer {e.index} {e.name}: artifact {name} differs from what was written")
        if status == "complete":
            if ls.artifacts_missing:
                ls.verified = False
                reasons.append(
                    f"layer {e.index} {e.name}: claimed complete but artifacts missing: "
                    f"{', '.join(ls.artifacts_missing)}"
                )
            if ls.pages_recovered < ls.expected_pages:
                ls.verified = False
                reasons.append(
                    f"layer {e.index} {e.name}: claimed complete but {ls.expected_pages - ls.pages_recovered} "
                    f"of {ls.expected_pages} pages are missing"
                )
        total += nbytes
        layers.append(ls)
    fa = bool(reasons)
    return Score(layers, fa, reasons, total, _markers(markers, out, layers), str(man.get("dump_id")), True)


#: markers the guest plants (GuestSession.markers) and where each must show up:
#: text markers in recovered text files, pattern units in the recovered memory
TEXT_MARKERS = ("kmsg", "comm", "release", "hostname")
MEMORY_MARKERS = ("cache_unit", "anon_unit")


def _markers(markers: dict[str, object] | None, out: Path | None, layers: list[LayerScore]) -> dict[str, bool]:
    """Did each planted marker come back?

    ``kmsg`` (a log line), ``comm`` (the marker task), ``release`` and
    ``hostname`` are searched in the recovered text files; ``cache_unit`` and
    ``anon_unit`` (a 32-byte unit the guest repeated over 64 KiB of page cache
    and of a task's heap) are searched, twice in a row, in the recovered vmcore.
    """
    res: dict[str, bool] = {}
    if not markers:
        return res
    texts: list[bytes] = []
    vm = None
    if out is not None:
        for p in sorted(out.iterdir()):
            if p.is_file() and p.suffix in (".txt", ".json", ".log") and p.stat().st_size < (64 << 20):
                texts.append(p.read_bytes())
        if (out / "vmcore").exists():
            vm = out / "vmcore"
    for k in TEXT_MARKERS:
        v = markers.get(k)
        if isinstance(v, str) and v:
            res[k] = any(v.encode() in t for t in texts)
    for k in MEMORY_MARKERS:
        v = markers.get(k)
        if isinstance(v, str) and v:
            res[k] = _in_file(vm, v.encode() * 2) if vm is not None else False
    return res


def _in_file(path: Path, needle: bytes) -> bool:
    import mmap

    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return False
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return mm.find(needle) >= 0
