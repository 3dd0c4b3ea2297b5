#!/usr/bin/env python3
"""Fetch an official OmniOS cloud image and verify it against its published SHA-256.

``make guest-image GUEST=omnios [OMNIOS_RELEASE=r151058]`` runs this. It
writes ``.cache/guest/omnios/omnios-<release>.cloud.qcow2`` and
``manifest.json`` (release, url, sha256, size), which the ``omnios`` guest
profile boots when ``OMNIOS_IMAGE`` is not set. Nothing is installed; the
image is never booted directly (the profile always uses a qcow2 overlay).

Where the files are (omniosorg/omniosorg.github.io ``download.md``; zxfer's
``tests/vm/guest_catalog.sh`` fetches ``media/stable/omnios-r151056.cloud.qcow2``
this way): ``https://downloads.omnios.org/media/<dir>/omnios-<release>.cloud.qcow2``
with a ``.sha256`` sidecar holding the hash (alone, or followed by the file
name). ``<dir>`` is the release (``r151058``) unless ``--dir stable|lts``.
LTS media may carry a respin suffix (``r151054r``): pass the full name as
``--release``. Not run on the machines this was written on (no internet):
see docs/OMNIOS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
OUT = REPO / ".cache" / "guest" / "omnios"
BASE_URL = "https://downloads.omnios.org/media"
DEFAULT_RELEASE = "r151058"  # stable since 2026-05-04 (omniosorg.github.io schedule.md)
RELEASE_RE = re.compile(r"^r\d{6}[a-z]?$")
MAX_SIDECAR = 4096
MAX_IMAGE = 16 << 30


class FetchError(Exception):
    pass


def image_url(release: str, base: str = BASE_URL, directory: str | None = None) -> str:
    if not RELEASE_RE.match(release):
        raise FetchError(f"release {release!r} is not of the form r151058 (or r151054r)")
    return f"{base.rstrip('/')}/{directory or release}/omnios-{release}.cloud.qcow2"


def parse_sha256_sidecar(text: str, filename: str) -> str:
    """The hash in a ``.sha256`` file: one bare hex digest, or ``digest  name`` lines (the one for ``filename``)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines or len(text) > MAX_SIDECAR:
        raise FetchError("checksum file is empty or too long")
    for ln in lines:
        parts = ln.split()
        digest = parts[0].lower()
        m = re.match(r"^SHA256 \((.+)\) = ([0-9a-fA-F]{64})$", ln)  # BSD style
        if m:
            if m.group(1) == filename:
                return m.group(2).lower()
            continue
        if re.fullmatch(r"[0-9a-f]{64}", digest) and (len(parts) == 1 or parts[-1].lstrip("*") == filename):
            return digest
    raise FetchError(f"no SHA-256 for {filename} in the checksum file")


def _get(url: str, timeout: float = 60.0) -> urllib.request.addinfourl:
    try:
        return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - https (or file: in tests) only
    except (urllib.error.URLError, OSError) as e:
        raise FetchError(f"cannot fetch {url}: {getattr(e, 'reason', e)}") from None


def fetch(
    release: str,
    out: Path = OUT,
    base: str = BASE_URL,
    directory: str | None = None,
    log=lambda s: print(s, file=sys.stderr),
) -> Path:
    url = image_url(release, base, directory)
    name = url.rsplit("/", 1)[1]
    out.mkdir(parents=True, exist_ok=True)
    with _get(url + ".sha256") as r:
        want = parse_sha256_sidecar(r.read(MAX_SIDECAR + 1).decode("ascii", "replace"), name)
    dest = out / name
    if dest.exists() and _sha256(dest) == want:
        log(f"{dest} already verified")
    else:
        part = dest.with_suffix(dest.suffix + ".part")
        h = hashlib.sha256()
        n = 0
        t0 = time.monotonic()
        with _get(url) as r, open(part, "wb") as f:
            while True:
                chunk = r.read(1 << 20)
                if not chunk:
                    break
                n += len(chunk)
                if n > MAX_IMAGE:
                    raise FetchError(f"{url}: more than {MAX_IMAGE} bytes")
                h.update(chunk)
                f.write(chunk)
        got = h.hexdigest()
        if got != want:
            part.unlink(missing_ok=True)
            raise FetchError(f"{url}: SHA-256 {got} does not match the published {want}")
        os.replace(part, dest)
        log(f"fetched {url}: {n} bytes in {time.monotonic() - t0:.0f} s, SHA-256 verified")
    (out / "manifest.json").write_text(
        json.dumps(
            {
                "release": release,
                "url": url,
                "sha256": want,
                "path": name,
                "size": dest.stat().st_size,
            },
            indent=2,
        )
        + "\n"
    )
    return dest


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--release", default=os.environ.get("OMNIOS_RELEASE") or DEFAULT_RELEASE)
    ap.add_argument("--dir", dest="directory", help="media directory (default: the release; or stable, lts)")
    ap.add_argument("--base-url", default=os.environ.get("OMNIOS_MEDIA_URL") or BASE_URL)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    if os.environ.get("OMNIOS_IMAGE"):
        print(f"OMNIOS_IMAGE={os.environ['OMNIOS_IMAGE']} is set: nothing to fetch", file=sys.stderr)
        return 0
    try:
        fetch(a.release, a.out, a.base_url, a.directory)
    except FetchError as e:
        print(f"guest-image omnios: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
