"""Fetch the guest kernel's Debian ``-dbg`` vmlinux into ``.cache/dbg/`` (test-only cross-check).

Why: ``tests/vm/test_linux_layers.py`` compares our ORC backtraces with drgn's
own unwinder, which needs full debug info. progdump never needs it (a real
dump path has none); the tests use it to check us, and skip, saying why,
when it is absent. The package (~283 MB) is fetched with ``apt-get
download``, which checks it against the SHA256 apt's Packages index
records; only ``vmlinux-<release>`` (~590 MB) is kept, the ``.deb`` is
removed. Nothing is done when the file is already there. A failure (no
network, no such package) is reported and is not an error: the cross-check
is optional.

Usage: ``python3 guest-images/linux/fetch_dbg.py`` (``make test`` runs it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / ".cache/guest/linux/manifest.json"
DBG = ROOT / ".cache/dbg"


def say(msg: str) -> None:
    print(f"[dbg-vmlinux] {msg}", flush=True)


def main() -> int:
    try:
        man = json.loads(MANIFEST.read_text())
        release = str(man["release"])
    except (OSError, ValueError, KeyError) as e:
        say(f"no guest image manifest ({e}); run make guest-image first; skipped")
        return 0
    target = DBG / "usr/lib/debug/boot" / f"vmlinux-{release}"
    if target.is_file() and target.stat().st_size > 0:
        say(f"up to date ({target.relative_to(ROOT)})")
        return 0
    pkg = f"linux-image-{release}-dbg"
    DBG.mkdir(parents=True, exist_ok=True)
    for old in DBG.glob("*.deb"):
        old.unlink()
    say(f"downloading {pkg} (~283 MB, test-only)")
    r = subprocess.run(["apt-get", "download", pkg], cwd=DBG, capture_output=True, text=True, timeout=1800)
    debs = sorted(DBG.glob(f"{pkg}_*.deb"))
    if r.returncode != 0 or not debs:
        say(
            f"not available ({(r.stderr or r.stdout).strip().splitlines()[-1:] or ['apt-get failed']}); "
            "the drgn debug-info cross-checks will skip"
        )
        return 0
    if shutil.which("dpkg-deb") is None:
        say("dpkg-deb not found; skipped")
        return 0
    tmp = target.with_suffix(".part")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    member = f"./usr/lib/debug/boot/vmlinux-{release}"
    with open(tmp, "wb") as out:
        deb = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(debs[-1])], stdout=subprocess.PIPE)
        tar = subprocess.run(["tar", "-x", "-O", "-f", "-", member], stdin=deb.stdout, stdout=out)
        assert deb.stdout is not None
        deb.stdout.close()
        deb.wait()
    for d in debs:
        d.unlink()
    if deb.returncode or tar.returncode or tmp.stat().st_size == 0:
        tmp.unlink(missing_ok=True)
        say(f"could not extract {member} from {debs[-1].name}; skipped")
        return 0
    tmp.rename(target)
    say(f"{target.relative_to(ROOT)}: {target.stat().st_size / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
