"""Golden v1 images (tests/testdata/dumps): the format's normative test vectors (FORMAT.md section 13).

Each ``<name>.expected.json`` was written by hand from the spec and from what
make_golden.py puts into the image (never from a reader's output): the layer
table, artifact digests, the recovered page frames and a digest of their
bytes. Here ``progdump recover`` is run on each image and its output read
back independently: the manifest as JSON, artifacts as files, and the vmcore
with pyelftools (not progdump's ELF code). Another implementation can run
the same comparison against the same files.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from elftools.elf.elffile import ELFFile

from progdump.cli import main

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "testdata", "dumps")
NAMES = sorted(f[: -len(".img")] for f in os.listdir(HERE) if f.endswith(".img"))
PAGE = 4096


def test_golden_images_and_expectations_present():
    assert {"v1-complete", "v1-partial", "v1-newer-partial-over-older", "v1-torn-page-record",
            "v1-newer-unsupported-over-older"} <= set(NAMES)  # fmt: skip
    for n in NAMES:
        assert os.path.getsize(os.path.join(HERE, n + ".img")) <= 64 * 1024
        assert os.path.isfile(os.path.join(HERE, n + ".expected.json")), n


def _vmcore_pages(path: str) -> dict[int, bytes]:
    """pfn -> bytes of every page a PT_LOAD covers, read with pyelftools."""
    out: dict[int, bytes] = {}
    with open(path, "rb") as f:
        elf = ELFFile(f)
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD":
                continue
            assert seg["p_paddr"] % PAGE == 0 and seg["p_memsz"] % PAGE == 0
            data = seg.data() + bytes(seg["p_memsz"] - seg["p_filesz"])
            for i in range(seg["p_memsz"] // PAGE):
                pfn = seg["p_paddr"] // PAGE + i
                assert pfn not in out, f"pfn {pfn} in two PT_LOADs"
                out[pfn] = data[i * PAGE : (i + 1) * PAGE]
    return out


@pytest.mark.parametrize("name", NAMES)
def test_golden_image_recovers_as_the_spec_says(name, tmp_path, capsys):
    want = json.load(open(os.path.join(HERE, name + ".expected.json")))
    out = tmp_path / "o"
    rc = main(["recover", os.path.join(HERE, name + ".img"), str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == want["exit"], err
    if want["exit"] != 0:
        assert not out.exists()
        assert f"format version {want['unsupported_version']}" in err and want["unsupported_dump_id"] in err, err
        for d in want["other_dumps"]:
            assert d in err
        return
    m = json.load(open(out / "manifest.json"))
    assert m["dump_id"] == want["dump_id"] and m["format_version"] == 1
    assert m["other_dumps"] == want["other_dumps"]
    got_layers = [{"index": x["index"], "name": x["name"], "status": x["status"], "pages": x["pages"],
                   "artifacts": sorted(x["artifacts"])} for x in m["layers"]]  # fmt: skip
    assert got_layers == want["layers"]
    assert sorted(m["artifacts"]) == sorted(want["artifacts_sha256"])
    for art, digest in want["artifacts_sha256"].items():
        data = (out / art).read_bytes()
        if digest is not None:
            assert hashlib.sha256(data).hexdigest() == digest, art
    pages = _vmcore_pages(str(out / "vmcore"))
    assert sorted(pages) == want["recovered_pfns"]
    h = hashlib.sha256()
    for pfn in sorted(pages):
        h.update(pfn.to_bytes(8, "little") + pages[pfn])
    assert h.hexdigest() == want["pages_sha256"]
    end = None if m["end"] is None else {"reason": m["end"]["reason"], "committed": m["end"]["committed"]}
    assert end == want["end"]
