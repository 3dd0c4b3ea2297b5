"""Golden v1 images (tests/testdata/dumps): this reader must report exactly what they hold.

They are the format's compatibility fixtures (FORMAT.md change log): a
reader change that alters what an existing v1 image recovers fails here.
Regenerate only with a format version bump: tests/testdata/dumps/make_golden.py.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from progdump.cli import main
from progdump.reader import scan

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "testdata", "dumps")
NAMES = sorted(f[: -len(".img")] for f in os.listdir(HERE) if f.endswith(".img"))


def _golden_module():
    spec = importlib.util.spec_from_file_location("make_golden", os.path.join(HERE, "make_golden.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_golden_images_present():
    assert {"v1-complete", "v1-partial", "v1-newer-partial-over-older", "v1-torn-page-record"} <= set(NAMES)
    for n in NAMES:
        assert os.path.getsize(os.path.join(HERE, n + ".img")) <= 64 * 1024


@pytest.mark.parametrize("name", NAMES)
def test_golden_image_reads_as_expected(name):
    """R-COM-3, R-RD-3, R-RD-4 on fixed bytes: statuses, artifacts and page digest as recorded."""
    want = json.load(open(os.path.join(HERE, name + ".expected.json")))
    got = _golden_module().expected(scan(os.path.join(HERE, name + ".img")))
    assert json.loads(json.dumps(got)) == want


@pytest.mark.parametrize("name", NAMES)
def test_golden_recover_manifest(name, tmp_path):
    want = json.load(open(os.path.join(HERE, name + ".expected.json")))
    assert main(["recover", os.path.join(HERE, name + ".img"), str(tmp_path / "o"), "-q"]) == 0
    m = json.load(open(tmp_path / "o" / "manifest.json"))
    assert m["dump_id"] == want["dump_id"] and m["format_version"] == 1
    assert [(x["index"], x["name"], x["status"], x["bytes"]) for x in m["layers"]] == [
        (x["index"], x["name"], x["status"], x["bytes"]) for x in want["layers"]
    ]
    assert sorted(m["artifacts"]) == sorted(want["artifacts"])
