"""Recovered dump -> files: manifest.json, artifacts, per-layer files, vmcore (FORMAT.md section 10).

Only verified records reach a file: artifacts whose every chunk verified,
pages whose record verified (re-verified as they are read again here). No
path from the device is used: artifact names are re-checked against
``ARTIFACT_NAME_RE`` and the names the recovery itself writes are refused.

``vmcore`` is an ELF core with one PT_LOAD per run of recovered page frames:
a recovered page reads back exactly, a page recorded as zero reads back as
zero (a hole of the sparse file), a page not recovered is in no PT_LOAD. Its
notes are the snapshot's (``elf-notes.bin`` from layer 0: VMCOREINFO,
NT_PRSTATUS) plus registers, console tail and metadata from layer 0, so drgn
and crash open it. It is streamed with :class:`progdump.elfcore.ElfCoreWriter`:
memory stays bounded by one record.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile

from progdump.elfcore import ElfCoreWriter, ElfSegment, parse_prstatus, snapshot_notes
from progdump.errors import ProgdumpError
from progdump.format import ARTIFACT_NAME_RE, RecordHeader
from progdump.layers.generic import decode_notes
from progdump.reader import ScanResult, iter_recovered_pages, scan
from progdump.snapshot import PAGE_SIZE, CpuState, Note

__all__ = ["recover", "export", "check_outdir", "ExportError", "RESERVED_NAMES", "vmcore_notes"]

RESERVED_NAMES = frozenset({"manifest.json", "vmcore", "layers"})
MAX_JSON_ARTIFACT = 16 << 20
NT_PRSTATUS = 1
U64 = (1 << 64) - 1


class ExportError(ProgdumpError):
    """Recovery output could not be written (disk full, device changed under us); one line."""


class _BadRecord(ProgdumpError):
    """A page record verified at scan but fails on re-read (device changed) or its content is invalid."""

    def __init__(self, h: RecordHeader) -> None:
        super().__init__(f"record {h.seq}")
        self.h = h


MAX_REJECTS = 64


def _write_file(path: str, data: bytes) -> None:
    if os.path.islink(path):
        os.unlink(path)  # never write through a link planted in OUTDIR
    tmp = path + ".tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _json_artifact(res: ScanResult, name: str) -> object:
    if name not in res.artifact_names():
        return None
    data = res.read_artifact(name)
    if data is None or len(data) > MAX_JSON_ARTIFACT:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError:
        return None


def vmcore_notes(res: ScanResult, warnings: list[str]) -> list[Note]:
    """ELF notes for the recovered vmcore, from layer 0's artifacts (bounded, never raises)."""
    raw_notes: list[Note] = []
    if "elf-notes.bin" in res.artifact_names():
        data = res.read_artifact("elf-notes.bin") or b""
        raw_notes = decode_notes(data)
    prstatus = [n.desc for n in raw_notes if n.name == "CORE" and n.type == NT_PRSTATUS]
    cpus: list[CpuState] = []
    regs_doc = _json_artifact(res, "registers.json")
    if isinstance(regs_doc, list):
        for pos, ent in enumerate(regs_doc[:4096]):
            if not isinstance(ent, dict) or not isinstance(ent.get("regs"), dict):
                continue
            regs = {str(k)[:32]: v for k, v in ent["regs"].items() if isinstance(v, int) and 0 <= v <= U64}
            idx = ent.get("cpu", pos)
            cpus.append(
                CpuState(idx if isinstance(idx, int) else pos, regs, prstatus[pos] if pos < len(prstatus) else None)
            )
    elif prstatus:
        for pos, desc in enumerate(prstatus):
            try:
                regs = parse_prstatus(desc)
            except Exception as e:  # hostile note content: keep going without it
                warnings.append(f"vmcore: CPU {pos} NT_PRSTATUS unreadable: {e}")
                continue
            cpus.append(CpuState(pos, regs, desc))
    console = b""
    if "console.txt" in res.artifact_names():
        console = res.read_artifact("console.txt") or b""
    md = _json_artifact(res, "metadata.json")
    try:
        return snapshot_notes(cpus, raw_notes, console, md if isinstance(md, dict) else None)
    except Exception as e:
        warnings.append(f"vmcore: CPU notes not rebuilt ({type(e).__name__}: {e}); snapshot notes kept as stored")
        return raw_notes


def _write_vmcore(res: ScanResult, path: str, warnings: list[str], zero_by_layer: dict[int, int]) -> dict[str, int]:
    pieces = list(iter_recovered_pages(res))
    # PT_LOADs: runs of recovered pages, every page with file bytes (p_filesz = p_memsz);
    # known-zero pages are holes of the sparse file, so they take no disk blocks. (PT_LOADs
    # with p_filesz 0 for long zero runs were tried: makedumpfile 1.7.2 crashes reading them.)
    segments: list[list[int]] = []  # [first pfn, end pfn]
    for first, n, skip, _h in pieces:
        a, b = first + skip, first + n
        if segments and segments[-1][1] == a:
            segments[-1][1] = b
        else:
            segments.append([a, b])
    notes = vmcore_notes(res, warnings)
    elf_segs = [ElfSegment(a * PAGE_SIZE, (b - a) * PAGE_SIZE, (b - a) * PAGE_SIZE) for a, b in segments]
    pages = zero = 0
    w = ElfCoreWriter(path, notes, elf_segs)
    try:
        for _first, n, skip, h in pieces:
            got = res.read_pages(h)
            if got is None:
                raise _BadRecord(h)
            npages, zmap, data = got
            if zmap is None:  # ZERO record: a hole of the sparse file
                w.write_zeros((n - skip) * PAGE_SIZE)
                zero += n - skip
                pages += n - skip
                continue
            bits = int.from_bytes(zmap, "little")
            nz = bin(bits).count("1")
            zero_by_layer[h.layer] = zero_by_layer.get(h.layer, 0) + nz
            if bits == 0 and skip == 0:
                w.write(data)
            else:
                mv = memoryview(data)
                pos = 0  # pages of data consumed
                i = 0
                while i < n:  # runs of zero / non-zero pages: one call each (zero runs become holes)
                    isz = (bits >> i) & 1
                    j = i
                    while j < n and ((bits >> j) & 1) == isz:
                        j += 1
                    lo = max(i, skip)
                    if isz:
                        if j > lo:
                            w.write_zeros((j - lo) * PAGE_SIZE)
                            zero += j - lo
                    else:
                        if j > lo:
                            w.write(mv[(pos + lo - i) * PAGE_SIZE : (pos + j - i) * PAGE_SIZE])
                        pos += j - i
                    i = j
            pages += n - skip
        w.close()
    except BaseException:
        w.abort()
        raise
    st = os.stat(path)
    return {
        "segments": len(segments),
        "pages": pages,
        "zero_pages": zero,
        "file_bytes": st.st_size,
        "disk_bytes": st.st_blocks * 512,
    }


def check_outdir(outdir: str) -> str:
    """The absolute OUTDIR, or :class:`ExportError` when recovery must not write there.

    Why refuse rather than merge: a second recovery into the directory of a
    first would leave the first dump's files (artifacts, ``layers/*.json``)
    beside the second's manifest, and a reader of OUTDIR could not tell them
    apart. OUTDIR must not exist, or be an empty directory (not a symlink).
    """
    final = os.path.abspath(outdir)
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        return final
    except OSError as e:
        raise ExportError(f"{outdir}: {e.strerror or e}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ExportError(f"{outdir}: is a symbolic link; give the directory itself")
    if not stat.S_ISDIR(st.st_mode):
        raise ExportError(f"{outdir}: exists and is not a directory")
    try:
        if os.listdir(final):
            raise ExportError(f"{outdir}: not empty (it may hold another recovery); give a new or empty directory")
    except OSError as e:
        raise ExportError(f"{outdir}: {e.strerror or e}") from None
    return final


def export(res: ScanResult, outdir: str) -> dict[str, object]:
    """Write the recovery output of a found dump into ``outdir``; returns the manifest.

    Everything is written into a fresh private directory beside OUTDIR, which
    is renamed into place at the end: OUTDIR holds one whole recovery or
    nothing (an interrupted recovery leaves only ``.<name>.*.partial``), and
    no name in it can be a link planted before (``layers`` included).
    """
    final = check_outdir(outdir)
    parent = os.path.dirname(final)
    try:
        os.makedirs(parent, exist_ok=True)
        work = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.", suffix=".partial", dir=parent)
    except OSError as e:
        raise ExportError(f"{outdir}: {e.strerror or e}") from None
    try:
        manifest = _export_into(res, work)
        try:
            os.chmod(work, 0o755)  # mkdtemp's 0700 was for while it was being filled
            os.rename(work, final)  # onto nothing or an empty directory; fails if one appeared meanwhile
        except OSError as e:
            raise ExportError(f"{outdir}: cannot move the recovery into place: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _export_into(res: ScanResult, outdir: str) -> dict[str, object]:
    try:
        os.makedirs(os.path.join(outdir, "layers"))
    except OSError as e:
        raise ExportError(f"{outdir}: {e.strerror or e}") from None
    warnings = list(res.warnings)
    written: dict[str, int] = {}
    try:
        for name, li in sorted(res.artifact_names().items()):
            if name in RESERVED_NAMES or not ARTIFACT_NAME_RE.match(name):
                warnings.append(f"artifact {name!r} refused: reserved or invalid name")
                continue
            data = res.read_artifact(name)
            if data is None:
                warnings.append(f"artifact {name}: no longer verifies; not written")
                for lay in res.layers:
                    if lay.index == li:
                        lay.status = "partial" if lay.status == "complete" else lay.status
                        lay.reasons.append(f"artifact {name} failed on re-read")
                continue
            _write_file(os.path.join(outdir, name), data)
            written[name] = li
        zero_by_layer: dict[int, int] = {}
        vm_path = os.path.join(outdir, "vmcore")
        if os.path.islink(vm_path):
            os.unlink(vm_path)
        for _ in range(MAX_REJECTS + 1):
            try:
                vm = _write_vmcore(res, vm_path, warnings, zero_by_layer)
                break
            except _BadRecord as b:  # rare: rebuild the vmcore without that record
                res.reject_record(b.h, "payload no longer verifies or its zero map does not match its length")
                warnings.append(f"page record {b.h.seq} rejected at export; vmcore rebuilt without it")
                zero_by_layer.clear()
        else:
            raise ExportError(
                f"more than {MAX_REJECTS} page records failed on re-read: the device is changing under us"
            )
        from progdump.render_at_recovery import render_missing  # noqa: PLC0415 - issue 13: a raw layer 0

        written.update(render_missing(vm_path, outdir, written, warnings))
        for lay in res.layers:
            lay.zero_pages += zero_by_layer.get(lay.index, 0)
            _write_file(
                os.path.join(outdir, "layers", f"{lay.index}.json"), json.dumps(lay.to_json(), indent=1).encode()
            )
        manifest: dict[str, object] = {
            "dump_id": res.dump_id,
            "format_version": res.format_version,
            "dump_time_ns": res.dump_time_ns,
            "plan": res.plan,
            "producer": res.producer,
            "layers": [lay.to_json() for lay in res.layers],
            "artifacts": written,
            "vmcore": vm,
            "end": res.end,
            "headers": res.headers,
            "other_dumps": res.other_dumps,
            "warnings": warnings,
        }
        _write_file(os.path.join(outdir, "manifest.json"), json.dumps(manifest, indent=1).encode())
    except OSError as e:
        raise ExportError(f"{outdir}: {e.strerror or e}") from None
    return manifest


def recover(source: object, outdir: str | os.PathLike[str]) -> ScanResult:
    """Scan ``source`` and write the recovery output into ``outdir`` (FORMAT.md section 10).

    The source is closed when this returns if it was opened here from a path
    (the result then answers from what it holds, not from the device).
    """
    check_outdir(os.fspath(outdir))  # before a long scan: refuse a non-empty OUTDIR at once
    res = scan(source)
    try:
        if res.found:
            export(res, os.fspath(outdir))
        return res
    finally:
        res.close()
