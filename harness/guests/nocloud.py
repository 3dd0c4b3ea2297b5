"""A NoCloud seed volume (label ``CIDATA``) built in pure Python: no root, no mkfs.

Why FAT and why by hand: cloud-init on illumos finds its seed by globbing
``/dev/dsk/c*t*d*p0`` and accepting a volume whose ``fstyp`` is hsfs or pcfs
with the label ``cidata`` (omniosorg/cloud-init ``find_devs_with_illumos``);
OmniOS' metadata-agent wants pcfs. A FAT12 "superfloppy" (no partition table,
so the whole-disk ``p0`` node shows the file system) is the smallest thing
both accept, and writing one takes a page of code instead of mtools or
dosfstools on the host.

Layout (Microsoft FAT specification; 1.44 MB floppy geometry): boot sector
with BPB (512-byte sectors, 1 sector per cluster, 1 reserved, 2 FATs of 9
sectors, 224 root entries, 2880 sectors, media 0xF0) and extended BPB (volume
label at 43, ``FAT12   `` at 54, 0x55AA at 510); FATs at sectors 1 and 10; root
directory at 19 (14 sectors); data from sector 33. ``meta-data`` and
``user-data`` do not fit 8.3 names, so each gets one VFAT long-name entry
(checksum of its short name ``META-D~1``/``USER-D~1``) before its short entry.
"""

from __future__ import annotations

import struct
from pathlib import Path

__all__ = ["fat12_image", "write_seed", "user_data", "meta_data", "SEED_LABEL", "FatError"]

SECTOR = 512
TOTAL_SECTORS = 2880
FAT_SECTORS = 9
ROOT_ENTRIES = 224
ROOT_SECTOR = 1 + 2 * FAT_SECTORS  # 19
DATA_SECTOR = ROOT_SECTOR + ROOT_ENTRIES * 32 // SECTOR  # 33
CLUSTERS = TOTAL_SECTORS - DATA_SECTOR
SEED_LABEL = "CIDATA"


class FatError(ValueError):
    """The files do not fit, or a name cannot be stored."""


def _short_name(name: str, index: int) -> bytes:
    base = "".join(c for c in name.upper() if c.isalnum() or c in "-_")[:6]
    return f"{base}~{index}".ljust(11).encode("ascii")


def _lfn_checksum(short: bytes) -> int:
    s = 0
    for c in short:
        s = (((s & 1) << 7) + (s >> 1) + c) & 0xFF
    return s


def _lfn_entries(name: str, short: bytes) -> list[bytes]:
    chars = [ord(c) for c in name] + [0]
    chars += [0xFFFF] * (-len(chars) % 13)
    parts = [chars[i : i + 13] for i in range(0, len(chars), 13)]
    if len(parts) > 20:
        raise FatError(f"name {name!r} too long")
    out = []
    ck = _lfn_checksum(short)
    for seq in range(len(parts), 0, -1):  # stored last part first
        p = parts[seq - 1]
        e = bytearray(32)
        e[0] = seq | (0x40 if seq == len(parts) else 0)
        e[1:11] = struct.pack("<5H", *p[0:5])
        e[11] = 0x0F  # attribute: long name
        e[13] = ck
        e[14:26] = struct.pack("<6H", *p[5:11])
        e[28:32] = struct.pack("<2H", *p[11:13])
        out.append(bytes(e))
    return out


def _set_fat(fat: bytearray, n: int, v: int) -> None:
    o = n * 3 // 2
    if n % 2 == 0:
        fat[o] = v & 0xFF
        fat[o + 1] = (fat[o + 1] & 0xF0) | ((v >> 8) & 0x0F)
    else:
        fat[o] = (fat[o] & 0x0F) | ((v & 0x0F) << 4)
        fat[o + 1] = (v >> 4) & 0xFF


def fat12_image(files: dict[str, bytes], label: str = SEED_LABEL, volume_id: int = 0x50440001) -> bytes:
    """A 1.44 MB FAT12 image holding ``files`` (flat, in the root directory)."""
    if not label or len(label) > 11 or not all(c.isalnum() or c in "-_ " for c in label):
        raise FatError(f"bad volume label {label!r}")
    img = bytearray(TOTAL_SECTORS * SECTOR)
    bs = bytearray(SECTOR)
    bs[0:3] = b"\xeb\x3c\x90"
    bs[3:11] = b"PROGDUMP"
    struct.pack_into(
        "<HBHBHHBHHHII", bs, 11, SECTOR, 1, 1, 2, ROOT_ENTRIES, TOTAL_SECTORS, 0xF0, FAT_SECTORS, 18, 2, 0, 0
    )
    bs[36] = 0x00  # drive number
    bs[38] = 0x29  # extended boot signature: volume id, label and type follow
    struct.pack_into("<I", bs, 39, volume_id)
    bs[43:54] = label.upper().ljust(11).encode("ascii")
    bs[54:62] = b"FAT12   "
    bs[510:512] = b"\x55\xaa"
    img[0:SECTOR] = bs
    fat = bytearray(FAT_SECTORS * SECTOR)
    _set_fat(fat, 0, 0xFF0)
    _set_fat(fat, 1, 0xFFF)
    root = bytearray()
    vol = bytearray(32)
    vol[0:11] = label.upper().ljust(11).encode("ascii")
    vol[11] = 0x08  # volume label entry
    root += vol
    cluster = 2
    for i, (name, data) in enumerate(sorted(files.items()), 1):
        if not name or "/" in name or len(name) > 255:
            raise FatError(f"bad file name {name!r}")
        need = max(1, -(-len(data) // SECTOR))
        if cluster + need - 2 > CLUSTERS:
            raise FatError(f"files do not fit in {CLUSTERS * SECTOR} bytes")
        first = cluster if data else 0
        if data:
            for k in range(need):
                _set_fat(fat, cluster + k, cluster + k + 1 if k + 1 < need else 0xFFF)
            off = (DATA_SECTOR + cluster - 2) * SECTOR
            img[off : off + len(data)] = data
            cluster += need
        short = _short_name(name, i)
        for e in _lfn_entries(name, short):
            root += e
        d = bytearray(32)
        d[0:11] = short
        d[11] = 0x20  # archive
        # create time, create date, access date, cluster high, write time, write date (dates: 2025-01-01)
        struct.pack_into("<6H", d, 14, 0, 0x5A21, 0x5A21, 0, 0, 0x5A21)
        struct.pack_into("<H", d, 26, first)
        struct.pack_into("<I", d, 28, len(data))
        root += d
    if len(root) > ROOT_ENTRIES * 32:
        raise FatError("too many directory entries")
    for k in range(2):
        off = (1 + k * FAT_SECTORS) * SECTOR
        img[off : off + len(fat)] = fat
    img[ROOT_SECTOR * SECTOR : ROOT_SECTOR * SECTOR + len(root)] = root
    return bytes(img)


def meta_data(instance_id: str, hostname: str = "omnios") -> bytes:
    return f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n".encode()


def user_data(authorized_key: str, nmi_panic: bool = True) -> bytes:
    """#cloud-config that gives root key-only SSH and (next boot) NMI panics.

    The ``write_files`` form for root's key is what zxfer uses on r151056 cloud
    images (see docs/OMNIOS.md). ``/boot/conf.d/nmi`` with ``nmi=panic`` is read
    by the illumos loader; ``mlsetup()`` turns the ``nmi`` boot property into
    ``nmi_action`` (illumos-gate ``usr/src/uts/i86pc/os/mlsetup.c``). It takes
    effect from the next boot.
    """
    key = authorized_key.strip()
    if "\n" in key or not key.startswith(("ssh-ed25519 ", "ssh-rsa ", "ecdsa-")):
        raise ValueError("authorized key must be one OpenSSH public key line")
    files = [("/root/.ssh/authorized_keys", "0600", key)]
    if nmi_panic:
        files.append(("/boot/conf.d/nmi", "0644", "nmi=panic"))
    body = "".join(f"  - path: {p}\n    permissions: '{m}'\n    content: |\n      {c}\n" for p, m, c in files)
    return ("#cloud-config\ndisable_root: false\nssh_pwauth: false\nwrite_files:\n" + body).encode()


def write_seed(path: Path, authorized_key: str, instance_id: str, hostname: str = "omnios") -> Path:
    path.write_bytes(
        fat12_image({"meta-data": meta_data(instance_id, hostname), "user-data": user_data(authorized_key)})
    )
    return path
