"""The built Linux guest image (``make guest-image``): checksums, contents, cache.

No VM is booted here, but the test needs the built image, so it lives with
the VM tests and skips (saying why) without it.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
BUILD = REPO / "guest-images" / "linux" / "build.py"


def _load_build():
    spec = importlib.util.spec_from_file_location("guest_build", BUILD)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["guest_build"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def image(linux_guest: None) -> Path:
    from harness.guests.linux import default_image_dir

    return default_image_dir()


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_manifest_checksums(image: Path) -> None:
    man = json.loads((image / "manifest.json").read_text())
    assert sha(image / man["vmlinuz"]["path"]) == man["vmlinuz"]["sha256"]
    assert sha(image / man["initramfs"]["path"]) == man["initramfs"]["sha256"]
    assert man["kernel_package"]["name"].endswith("-cloud-amd64")
    assert man["release"] in man["kernel_package"]["name"]
    for p in man["packages"]:
        assert len(p["sha256"]) == 64 and p["version"]
    # the cached .debs are the ones the manifest names, checksums included
    debdir = REPO / ".cache" / "debs"
    if debdir.is_dir():
        for p in man["packages"]:
            deb = debdir / f"{p['name']}_{p['version'].replace(':', '%3a')}_checked.deb"
            if deb.exists():
                assert sha(deb) == p["sha256"], deb.name


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_initramfs_readable_by_gnu_cpio(image: Path, tmp_path: Path) -> None:
    raw = gzip.decompress((image / "initramfs.cpio.gz").read_bytes())
    r = subprocess.run(["cpio", "-t", "--quiet"], input=raw, capture_output=True, check=True)
    names = set(r.stdout.decode().split())
    for want in (
        "init",
        "bin/busybox",
        "bin/sh",
        "usr/sbin/dropbear",
        "usr/local/bin/pdmarker",
        "usr/local/bin/pdcmd",
        "lib/modules/load.list",
        "etc/dropbear/dropbear_ed25519_host_key",
        "root/.ssh/authorized_keys",
        "lib64/ld-linux-x86-64.so.2",
    ):
        assert want in names, want
    subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames"], input=raw, cwd=tmp_path, check=True)
    assert (tmp_path / "init").read_bytes() == (REPO / "guest-images" / "linux" / "init").read_bytes()
    assert (tmp_path / "init").stat().st_mode & 0o111
    assert (tmp_path / "root" / ".ssh" / "authorized_keys").stat().st_mode & 0o777 == 0o600
    # modules load in dependency order
    build = _load_build()
    loaded: list[str] = []
    for fname in (tmp_path / "lib" / "modules" / "load.list").read_text().split():
        info = build.modinfo(tmp_path / "lib" / "modules" / fname)
        deps = [d.replace("-", "_") for d in info.get("depends", "").split(",") if d]
        assert all(d in loaded for d in deps), f"{fname} before its dependencies {deps}"
        loaded.append(info["name"].replace("-", "_"))
    for m in ("qemu_fw_cfg", "pvpanic_pci", "virtio_console", "virtio_blk", "virtio_scsi", "sd_mod"):
        assert m in loaded


def test_rebuild_is_cached(image: Path) -> None:
    if shutil.which("apt-cache") is None:
        pytest.skip("apt-cache not available: cannot check the input hash")
    before = (image / "manifest.json").read_text()
    r = subprocess.run([sys.executable, str(BUILD), "--out", str(image)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "up to date" in r.stdout or "keeping the existing image" in r.stdout, r.stdout
    assert (image / "manifest.json").read_text() == before


def test_cpio_writer_round_trip(tmp_path: Path) -> None:
    build = _load_build()
    c = build.Cpio()
    c.file("a/b/c.txt", b"hello", 0o640)
    c.symlink("a/link", "/a/b/c.txt")
    c.dir("empty", 0o700)
    raw = c.finish()
    if shutil.which("cpio") is None:
        pytest.skip("GNU cpio not installed")
    subprocess.run(["cpio", "-id", "--quiet"], input=raw, cwd=tmp_path, check=True)
    assert (tmp_path / "a" / "b" / "c.txt").read_bytes() == b"hello"
    assert (tmp_path / "a" / "b" / "c.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "a" / "link").is_symlink()
    assert (tmp_path / "empty").stat().st_mode & 0o777 == 0o700
