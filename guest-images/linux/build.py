#!/usr/bin/env python3
"""Build the Linux stand-in guest (kernel + busybox initramfs) from Debian packages.

Why this shape: the emulator needs a real kernel that really panics, and CI
machines cannot fetch OmniOS images. Debian's ``linux-image-*-cloud-amd64``
kernel decompresses fast under TCG (LZ4) and carries kallsyms in VMCOREINFO.

Inputs are Debian packages fetched with ``apt-get download`` (never installed
on the host), each checked against the SHA256 that apt's Packages index
records. Outputs go to ``.cache/guest/linux/`` (stable paths)::

    vmlinuz  initramfs.cpio.gz  manifest.json  ssh/id_ed25519  ssh/host_key.pub

The build is skipped when ``manifest.json`` records the same input hash
(package versions and checksums, this script, the guest scripts). Nothing
here is needed at run time: booting uses only the outputs.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_OUT = REPO / ".cache" / "guest" / "linux"
GUEST_FILES = ("init", "pdmarker", "pdcmd")

KERNEL_META = "linux-image-cloud-amd64"
# dropbear and the shared libraries it links against (checked after extraction).
USERLAND_PACKAGES = (
    "busybox-static",
    "dropbear-bin",
    "libc6",
    "libcrypt1",
    "libtomcrypt1",
    "libtommath1",
    "libgmp10",
    "zlib1g",
)
# Modules the guest loads at boot; their dependencies are added from modinfo.
WANTED_MODULES = (
    "virtio_pci",  # every virtio device on q35
    "virtio_blk",  # dump disk and extra disks
    "virtio_scsi",  # hot-pluggable scsi-hd disks
    "sd_mod",  # disks on virtio-scsi / iSCSI
    "virtio_console",  # the host command channel (virtio-serial)
    "virtio_net",  # user networking for dropbear
    "virtio_rng",  # entropy early, so dropbear does not wait
    "pvpanic_pci",  # GUEST_PANICKED events
    "qemu_fw_cfg",  # publishes VMCOREINFO to QEMU's vmcoreinfo device
    "loop",  # file-backed block devices for workloads
    "iscsi_tcp",  # iSCSI dump targets
)
DROPBEAR_BINARIES = ("usr/sbin/dropbear",)
# Multipathed storage (the iscsi-panic / iscsi-hang scenarios): device-mapper's
# multipath target assembles the two paths of every iSCSI LUN; the table is
# built by the host's script (harness/iscsi/guest.py) and loaded with dmsetup.
# ext4 is built into this kernel; busybox's mke2fs makes the file systems.
STORAGE_MODULES = (
    "dm_mod",
    "dm_multipath",
    "dm_round_robin",  # the path selector in the multipath tables
)
STORAGE_PACKAGES = (
    "dmsetup",
    "libdevmapper1.02.1",
    "libselinux1",
    "libudev1",
    "libpcre2-8-0",
)
STORAGE_BINARIES = ("sbin/dmsetup",)
# Kernel command line, one reason each.
KERNEL_CMDLINE_PARTS = (
    "console=ttyS0,115200",  # every kernel message on the serial console the host reads
    "panic=0",  # never reboot after a panic: the host freezes the guest and resets it
    "printk.time=1",  # timestamps in the log: the panic report shows how long things took
    "mitigations=off",  # speculative-execution mitigations only slow TCG down; no secrets here
    "random.trust_cpu=on",  # crng ready at once, so dropbear and the nonce never wait
)
KERNEL_CMDLINE = " ".join(KERNEL_CMDLINE_PARTS)
MAX_MODINFO = 1 << 20


class BuildError(Exception):
    """The guest image cannot be built; the message says what is missing."""


def log(msg: str) -> None:
    print(f"[guest-image] {msg}", flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- apt -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str
    sha256: str
    filename: str  # pool path, for the record


def apt_show(spec: str) -> dict[str, str]:
    """Fields of one package record from apt's index (no network)."""
    try:
        out = subprocess.run(
            ["apt-cache", "show", "--no-all-versions", spec],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except FileNotFoundError as e:
        raise BuildError("apt-cache not found: this build needs a Debian host") from e
    except subprocess.CalledProcessError as e:
        raise BuildError(f"apt-cache show {spec} failed: {e.stderr.strip()}") from e
    fields: dict[str, str] = {}
    for line in out.split("\n\n")[0].splitlines():
        if line[:1].isspace() or ":" not in line:
            continue
        k, _, v = line.partition(":")
        fields[k.strip()] = v.strip()
    for k in ("Package", "Version", "SHA256"):
        if k not in fields:
            raise BuildError(f"apt-cache show {spec}: no {k} field")
    return fields


def resolve_kernel_package(override: str | None) -> str:
    """The versioned kernel package: the one the cloud meta-package depends on."""
    if override:
        return override
    deps = apt_show(KERNEL_META).get("Depends", "")
    m = re.search(r"(linux-image-[0-9][^\s,(]*-cloud-amd64)\b", deps)
    if not m:
        raise BuildError(f"{KERNEL_META} does not depend on a versioned cloud kernel: {deps!r}")
    return m.group(1)


def resolve_header_packages(kernel: DebPackage) -> list[DebPackage]:
    """The headers packages matching ``kernel`` (for building the pdoops module)."""
    hdr = resolve(kernel.name.replace("linux-image-", "linux-headers-", 1))
    if hdr.version != kernel.version:
        raise BuildError(f"{hdr.name} is {hdr.version}, kernel is {kernel.version}")
    deps = apt_show(f"{hdr.name}={hdr.version}").get("Depends", "")
    names = re.findall(r"(linux-headers-[^\s,(]+-common|linux-kbuild-[0-9.]+)\b", deps)
    if len(names) != 2:
        raise BuildError(f"{hdr.name}: expected a -common and a linux-kbuild dependency in {deps!r}")
    return [hdr] + [resolve(n) for n in names]


def build_module(src: Path, headers_root: Path, release: str, work: Path) -> tuple[Path | None, str]:
    """Build the out-of-tree module in ``src`` against extracted headers.

    Returns (path to the .ko, note). Needs make and the kernel's gcc on the
    host; without them the module (and the guest's ``oops`` trigger) is
    skipped, with the reason in the manifest.
    """
    hdir = headers_root / "usr" / "src" / f"linux-headers-{release}"
    mk = hdir / "Makefile"
    if not mk.is_file():
        return None, f"no headers tree for {release}"
    # Debian's per-flavour Makefile includes the -common tree by absolute path.
    if str(headers_root) not in mk.read_text():  # once: every module is built against the same tree
        mk.write_text(mk.read_text().replace("/usr/src/", f"{headers_root}/usr/src/"))
    cc = re.search(r"gcc-(\d+)", (hdir / ".kernelvariables").read_text())
    need = ["make", f"gcc-{cc.group(1)}" if cc else "gcc"]
    missing = [t for t in need if shutil.which(t) is None]
    if missing:
        return None, f"not built: {', '.join(missing)} not installed"
    mod = work / src.name
    shutil.copytree(src, mod)
    r = subprocess.run(["make", "-C", str(hdir), f"M={mod}", "modules"], capture_output=True, text=True)
    ko = mod / f"{src.name}.ko"
    if r.returncode != 0 or not ko.is_file():
        return None, f"not built: make failed: {(r.stdout + r.stderr).strip()[-300:]}"
    if shutil.which("strip"):
        subprocess.run(["strip", "--strip-debug", str(ko)], check=False)
    if modinfo(ko).get("vermagic", "").split()[:1] != [release]:
        return None, f"not built: vermagic {modinfo(ko).get('vermagic')!r} does not match {release}"
    return ko, "built against " + hdir.name


#: further out-of-tree modules (guest-images/linux/<name>/), built like pdoops and
#: shipped in /lib/modules/extra/ for the scenarios that load them (pdarc: fileserver-panic)
EXTRA_MODULES = ("pdarc",)


def build_extra_modules(
    hroot: Path, release: str, tmp: Path, have_headers: bool, hdr_note: str
) -> dict[str, tuple[Path | None, str]]:
    """Build every module of :data:`EXTRA_MODULES`: name -> (.ko or None, note)."""
    out: dict[str, tuple[Path | None, str]] = {}
    for name in EXTRA_MODULES:
        work = tmp / f"extra-{name}"
        work.mkdir()
        out[name] = build_module(HERE / name, hroot, release, work) if have_headers else (None, hdr_note)
        log(f"{name} module: {out[name][1]}")
    return out


def resolve(name: str) -> DebPackage:
    f = apt_show(name)
    return DebPackage(f["Package"], f["Version"], f["SHA256"].lower(), f.get("Filename", ""))


def fetch_deb(pkg: DebPackage, debdir: Path) -> Path:
    """Download (or reuse) the .deb and check it against the index's SHA256."""
    debdir.mkdir(parents=True, exist_ok=True)
    path = debdir / f"{pkg.name}_{pkg.version.replace(':', '%3a')}_checked.deb"
    if path.exists() and sha256_file(path) == pkg.sha256:
        return path
    with tempfile.TemporaryDirectory(dir=debdir) as tmp:
        log(f"downloading {pkg.name}={pkg.version}")
        r = subprocess.run(
            ["apt-get", "download", "-q", f"{pkg.name}={pkg.version}"],
            cwd=tmp,
            capture_output=True,
            text=True,
        )
        got = [p for p in Path(tmp).iterdir() if p.suffix == ".deb"]
        if r.returncode != 0 or len(got) != 1:
            raise BuildError(f"apt-get download {pkg.name}={pkg.version} failed: {r.stderr.strip()[-400:]}")
        digest = sha256_file(got[0])
        if digest != pkg.sha256:
            raise BuildError(f"{got[0].name}: sha256 {digest} does not match the index's {pkg.sha256}")
        os.chmod(got[0], 0o644)
        os.replace(got[0], path)
    return path


def extract(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)


# ---- kernel modules --------------------------------------------------------------------


def modinfo(path: Path) -> dict[str, str]:
    """Parse the ``.modinfo`` section of an ELF64 LE module (bounded, no tools)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BuildError(f"{path}: not an ELF64 little-endian module")
    (e_shoff,) = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if e_shentsize != 64 or e_shoff + e_shnum * 64 > len(data) or e_shstrndx >= e_shnum:
        raise BuildError(f"{path}: bad section header table")

    def sh(i: int) -> tuple[int, int, int]:
        name, _t, _f, _a, off, size = struct.unpack_from("<IIQQQQ", data, e_shoff + i * 64)
        return name, off, size

    _, stroff, strsize = sh(e_shstrndx)
    for i in range(e_shnum):
        name, off, size = sh(i)
        end = data.find(b"\0", stroff + name, stroff + strsize)
        if data[stroff + name : end] == b".modinfo":
            if off + size > len(data) or size > MAX_MODINFO:
                raise BuildError(f"{path}: .modinfo out of bounds")
            out: dict[str, str] = {}
            for entry in data[off : off + size].split(b"\0"):
                k, sep, v = entry.partition(b"=")
                if sep and k.decode() not in out:
                    out[k.decode()] = v.decode("utf-8", "replace")
            return out
    raise BuildError(f"{path}: no .modinfo section")


def module_load_order(moddir: Path, wanted: tuple[str, ...]) -> list[tuple[str, Path]]:
    """Wanted modules plus their dependencies, dependencies first."""
    index = {p.name.removesuffix(".ko").replace("-", "_"): p for p in moddir.rglob("*.ko")}
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in stack:
            raise BuildError(f"module dependency cycle: {' -> '.join(stack + (name,))}")
        path = index.get(name)
        if path is None:
            raise BuildError(f"module {name} not in the kernel package (built in? then drop it)")
        deps = [d for d in modinfo(path).get("depends", "").split(",") if d]
        for d in deps:
            visit(d.replace("-", "_"), stack + (name,))
        seen.add(name)
        order.append((name, path))

    for w in wanted:
        visit(w, ())
    return order


# ---- shared libraries -------------------------------------------------------------------


def lib_path(root: Path) -> str:
    return ":".join(str(root / d / "x86_64-linux-gnu") for d in ("lib", "usr/lib"))


def needed_libs(root: Path, binary: Path) -> list[Path]:
    """Shared libraries of ``binary`` inside the extracted tree, via its own loader."""
    loader = root / "lib64" / "ld-linux-x86-64.so.2"
    r = subprocess.run(
        [str(loader), "--inhibit-cache", "--library-path", lib_path(root), "--list", str(binary)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise BuildError(f"cannot list libraries of {binary.name}: {r.stderr.strip()}")
    libs: list[Path] = []
    for line in r.stdout.splitlines():
        if "not found" in line:
            raise BuildError(f"{binary.name}: missing library: {line.strip()}")
        m = re.search(r"=>\s+(\S+)", line)
        if m:
            p = Path(m.group(1))
            if root not in p.parents:
                raise BuildError(f"{binary.name}: library resolved outside the packages: {p}")
            libs.append(p)
    return libs


# ---- cpio (newc) --------------------------------------------------------------------------


class Cpio:
    """A minimal newc archive writer: enough for an initramfs, deterministic."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}" for v in (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name_b), 0)
        )
        self.ino += 1
        self.buf.write(hdr.encode() + name_b)
        self.buf.write(b"\0" * (-(110 + len(name_b)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str, perm: int = 0o755) -> None:
        name = name.strip("/")
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in self.dirs:
                self.dir(parent)
        if name not in self.dirs:
            self.dirs.add(name)
            self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        name = name.strip("/")
        if "/" in name:
            self.dir(name.rsplit("/", 1)[0])
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        if "/" in name:
            self.dir(name.rsplit("/", 1)[0])
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


# ---- keys ------------------------------------------------------------------------------


def make_keys(root: Path, out: Path) -> tuple[bytes, str, str]:
    """Host key (dropbear format, for the image) and a client key for paramiko."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    sshdir = out / "ssh"
    sshdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    hostkey = sshdir / "dropbear_ed25519_host_key"
    hostkey.unlink(missing_ok=True)
    loader = root / "lib64" / "ld-linux-x86-64.so.2"
    r = subprocess.run(
        [
            str(loader),
            "--inhibit-cache",
            "--library-path",
            lib_path(root),
            str(root / "usr/bin/dropbearkey"),
            "-t",
            "ed25519",
            "-f",
            str(hostkey),
        ],
        capture_output=True,
        text=True,
    )
    m = re.search(r"^(ssh-ed25519 \S+)", r.stdout, re.M)
    if r.returncode != 0 or not m:
        raise BuildError(f"dropbearkey failed: {r.stderr.strip()}")
    host_pub = m.group(1)
    (sshdir / "host_key.pub").write_text(host_pub + "\n")
    client = Ed25519PrivateKey.generate()
    priv = client.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    pub = client.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    keyfile = sshdir / "id_ed25519"
    keyfile.unlink(missing_ok=True)
    fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv)
    (sshdir / "id_ed25519.pub").write_text(pub + " progdump-host\n")
    data = hostkey.read_bytes()
    hostkey.unlink()  # lives only inside the image
    return data, host_pub, pub


# ---- build -----------------------------------------------------------------------------


def input_hash(pkgs: list[DebPackage]) -> str:
    h = hashlib.sha256()
    for p in sorted(pkgs, key=lambda p: p.name):
        h.update(f"{p.name}={p.version}:{p.sha256}\n".encode())
    h.update(Path(__file__).read_bytes())
    for f in GUEST_FILES:
        h.update((HERE / f).read_bytes())
    for f in sorted((HERE / "pdoops").iterdir()):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    for name in EXTRA_MODULES:
        for f in sorted((HERE / name).iterdir()):
            h.update(f"{name}/{f.name}".encode() + b"\0" + f.read_bytes())
    h.update(repr((shutil.which("make"), shutil.which("gcc-12"))).encode())  # a module appears when tools do
    return h.hexdigest()


def outputs_ok(out: Path) -> dict | None:
    try:
        man = json.loads((out / "manifest.json").read_text())
        for key in ("vmlinuz", "initramfs"):
            p = out / man[key]["path"]
            if sha256_file(p) != man[key]["sha256"]:
                return None
        return man
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build(out: Path, kernel_pkg: str | None, force: bool) -> dict:
    t0 = time.monotonic()
    try:
        kname = resolve_kernel_package(kernel_pkg)
        pkgs = [resolve(kname)] + [resolve(n) for n in USERLAND_PACKAGES + STORAGE_PACKAGES]
        try:
            hdr_pkgs = resolve_header_packages(pkgs[0])
            hdr_note = ""
        except BuildError as e:  # the image is still useful without the oops module
            hdr_pkgs, hdr_note = [], f"not built: {e}"
    except BuildError as e:
        old = outputs_ok(out)
        if old is not None:
            log(f"cannot resolve packages ({e}); keeping the existing image")
            return old
        raise
    ihash = input_hash(pkgs + hdr_pkgs)
    old = outputs_ok(out)
    if old is not None and old.get("input_hash") == ihash and not force:
        log(f"up to date ({out}, inputs {ihash[:12]})")
        return old

    out.mkdir(parents=True, exist_ok=True)
    debdir = REPO / ".cache" / "debs"
    debs = {p.name: fetch_deb(p, debdir) for p in pkgs + hdr_pkgs}
    with tempfile.TemporaryDirectory(prefix="guest-build-") as tmp:
        root = Path(tmp) / "root"
        for p in pkgs:
            extract(debs[p.name], root)
        moddirs = list((root / "lib" / "modules").iterdir())
        if len(moddirs) != 1:
            raise BuildError(f"expected one kernel module tree, found {moddirs}")
        release = moddirs[0].name
        vmlinuz_src = root / "boot" / f"vmlinuz-{release}"
        mods = module_load_order(moddirs[0], WANTED_MODULES + STORAGE_MODULES)
        hroot = Path(tmp) / "headers"
        for p in hdr_pkgs:
            extract(debs[p.name], hroot)
        oops_ko, oops_note = build_module(HERE / "pdoops", hroot, release, Path(tmp)) if hdr_pkgs else (None, hdr_note)
        log(f"pdoops module: {oops_note}")
        extra = build_extra_modules(hroot, release, Path(tmp), bool(hdr_pkgs), hdr_note)

        cpio = Cpio()
        for d in (
            "dev",
            "proc",
            "sys",
            "tmp",
            "run",
            "root",
            "etc",
            "var",
            "mnt",
            "bin",
            "sbin",
            "usr/bin",
            "usr/sbin",
            "usr/local/bin",
            "lib/modules",
        ):
            cpio.dir(d, 0o1777 if d == "tmp" else 0o755)
        cpio.dir("root/.ssh", 0o700)
        cpio.symlink("var/run", "/run")
        # busybox and one link per applet it offers
        bb = root / "bin" / "busybox"
        cpio.file("bin/busybox", bb.read_bytes(), 0o755)
        applets = subprocess.run([str(bb), "--list-full"], check=True, capture_output=True, text=True).stdout.split()
        for a in applets:
            if a.strip("/") != "bin/busybox":
                cpio.symlink(a, "/bin/busybox")
        # modules, flat, in load order
        load = []
        for i, (_name, path) in enumerate(mods):
            fname = f"{i:02d}-{path.name}"
            cpio.file(f"lib/modules/{fname}", path.read_bytes())
            load.append(fname)
        cpio.file("lib/modules/load.list", ("\n".join(load) + "\n").encode())
        if oops_ko is not None:  # loaded only by the oops trigger (it taints the kernel)
            cpio.file("lib/modules/extra/pdoops.ko", oops_ko.read_bytes())
        for name, (ko, _note) in extra.items():
            if ko is not None:  # loaded by the scenarios that use them
                cpio.file(f"lib/modules/extra/{name}.ko", ko.read_bytes())
        # dropbear and its libraries
        libs: set[Path] = set()
        for b in DROPBEAR_BINARIES + STORAGE_BINARIES:
            cpio.file(b, (root / b).read_bytes(), 0o755)
            libs.update(needed_libs(root, root / b))
        for lib in sorted(libs):
            rel = lib.relative_to(root)
            cpio.file(str(rel), lib.resolve().read_bytes(), 0o755)
        ld = root / "lib64" / "ld-linux-x86-64.so.2"
        cpio.file("lib64/ld-linux-x86-64.so.2", ld.resolve().read_bytes(), 0o755)
        hostkey, host_pub, client_pub = make_keys(root, out)
        cpio.file("etc/dropbear/dropbear_ed25519_host_key", hostkey, 0o600)
        cpio.file("root/.ssh/authorized_keys", (client_pub + "\n").encode(), 0o600)
        cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        cpio.file("etc/group", b"root:x:0:\n")
        cpio.file("etc/shadow", b"root:*:19000:0:99999:7:::\n", 0o600)
        cpio.file("etc/shells", b"/bin/sh\n")
        cpio.file("etc/hostname", b"pdguest\n")
        # our scripts
        cpio.file("init", (HERE / "init").read_bytes(), 0o755)
        for s in ("pdmarker", "pdcmd"):
            cpio.file(f"usr/local/bin/{s}", (HERE / s).read_bytes(), 0o755)
        raw = cpio.finish()

        initrd = out / "initramfs.cpio.gz"
        vmlinuz = out / "vmlinuz"
        tmp_initrd = initrd.with_suffix(".tmp")
        with open(tmp_initrd, "wb") as f:
            f.write(gzip.compress(raw, compresslevel=6, mtime=0))
        os.replace(tmp_initrd, initrd)
        shutil.copyfile(vmlinuz_src, vmlinuz.with_suffix(".tmp"))
        os.replace(vmlinuz.with_suffix(".tmp"), vmlinuz)
        shutil.copyfile(root / "boot" / f"config-{release}", out / "config")

    kernel = pkgs[0]
    man = {
        "guest": "linux",
        "input_hash": ihash,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - t0, 2),
        "release": release,
        "kernel_package": {"name": kernel.name, "version": kernel.version, "sha256": kernel.sha256},
        "packages": [{"name": p.name, "version": p.version, "sha256": p.sha256, "filename": p.filename} for p in pkgs],
        "modules": [name for name, _ in mods],
        "header_packages": [{"name": p.name, "version": p.version, "sha256": p.sha256} for p in hdr_pkgs],
        "oops_module": {"path": "/lib/modules/extra/pdoops.ko" if oops_ko else None, "note": oops_note},
        "extra_modules": {
            name: {"path": f"/lib/modules/extra/{name}.ko" if ko else None, "note": note}
            for name, (ko, note) in extra.items()
        },
        "cmdline": KERNEL_CMDLINE,
        "vmlinuz": {"path": "vmlinuz", "size": vmlinuz.stat().st_size, "sha256": sha256_file(vmlinuz)},
        "initramfs": {
            "path": "initramfs.cpio.gz",
            "size": initrd.stat().st_size,
            "sha256": sha256_file(initrd),
            "uncompressed_size": len(raw),
        },
        "ssh": {"user": "root", "key": "ssh/id_ed25519", "host_key": host_pub},
    }
    tmpm = out / "manifest.json.tmp"
    tmpm.write_text(json.dumps(man, indent=2) + "\n")
    os.replace(tmpm, out / "manifest.json")
    log(
        f"built {release}: vmlinuz {man['vmlinuz']['size'] / 1e6:.1f} MB, initramfs "
        f"{man['initramfs']['size'] / 1e6:.1f} MB, {len(mods)} modules, {man['build_seconds']} s"
    )
    return man


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    ap.add_argument("--kernel-package", help="e.g. linux-image-6.1.0-56-cloud-amd64")
    ap.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = ap.parse_args(argv)
    try:
        build(args.out, args.kernel_package, args.force)
    except BuildError as e:
        print(f"guest-image: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
