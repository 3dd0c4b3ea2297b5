"""The initiator side: QEMU blockdev/device dicts (pure) and the guest's shell scripts.

Why QEMU's own initiator with ``scsi-block``: the guest's SCSI layer then
sends its INQUIRY (VPD 0x83 included) to tgtd itself, so both paths of a LUN
show the identity the target reports and the guest groups them by it, as a
fileserver's multipath does; ``scsi-hd`` would answer with identifiers QEMU
invents. Every path is its own blockdev (its own iSCSI session, through its
own portal) and its own ``scsi-block`` device on a virtio-scsi controller
created for the LUNs (``pdiscsi``), so hot-add is QMP ``blockdev-add`` +
``device_add`` per path.

Naming: path ``p`` (0, 1) of LUN ``n`` is node and device ``iscsi-l{n}p{p}``
at SCSI target id ``10*n + p``, so the guest can tell paths apart
(``H:C:T:L`` in sysfs) while grouping them by WWID, not by that number.
"""

from __future__ import annotations

import json
from typing import Any

from harness.iscsi.target import PORTALS, iqn_for

__all__ = [
    "CONTROLLER",
    "node_name",
    "scsi_id",
    "blockdev_node",
    "scsi_block_device",
    "boot_args",
    "controller_args",
    "GUEST_FUNCS",
    "assemble_script",
    "start_io_script",
    "wait_paths_script",
]

CONTROLLER = "pdiscsi"


def node_name(lun: int, path: int) -> str:
    return f"iscsi-l{lun}p{path}"


def scsi_id(lun: int, path: int) -> int:
    if not (1 <= lun <= 24 and path in (0, 1)):
        raise ValueError(f"LUN {lun} path {path}: want LUN 1-24, path 0 or 1")
    return 10 * lun + path


def blockdev_node(iqn: str, port: int, lun: int, path: int) -> dict[str, Any]:
    """QEMU's iSCSI initiator for one path: its own portal and its own initiator name.

    One initiator name per path: two sessions with one name and the same ISID
    would make tgtd reinstate (drop) the first session when the second logs in.
    """
    return {
        "driver": "iscsi",
        "node-name": node_name(lun, path),
        "transport": "tcp",
        "portal": f"{PORTALS[path]}:{port}",
        "target": iqn,
        "lun": lun,
        "initiator-name": iqn_for(f"initiator-p{path}"),
        "cache": {"direct": True, "no-flush": False},
    }


def scsi_block_device(lun: int, path: int) -> dict[str, Any]:
    return {
        "driver": "scsi-block",
        "bus": f"{CONTROLLER}.0",
        "drive": node_name(lun, path),
        "id": node_name(lun, path),
        "scsi-id": scsi_id(lun, path),
        "lun": 0,
    }


def controller_args() -> list[str]:
    return ["-device", f"virtio-scsi-pci,id={CONTROLLER}"]


def boot_args(iqn: str, port: int, luns: list[int]) -> list[str]:
    """QEMU arguments: the controller and both paths of every boot LUN."""
    args = controller_args()
    for n in luns:
        for p in (0, 1):
            args += ["-blockdev", json.dumps(blockdev_node(iqn, port, n, p), separators=(",", ":"))]
            dev = scsi_block_device(n, p)
            args += ["-device", ",".join([dev["driver"]] + [f"{k}={v}" for k, v in dev.items() if k != "driver"])]
    return args


# ---- guest shell -----------------------------------------------------------------------

#: shell functions every script below starts with (busybox sh)
GUEST_FUNCS = r"""
# sd devices of LUN $1 (SCSI target ids 10*$1 and 10*$1+1 on any host)
pd_paths() {
    for d in /sys/block/sd*; do
        [ -e "$d/device" ] || continue
        t=$(basename "$(readlink -f "$d/device")"); t=${t#*:}; t=${t#*:}; t=${t%%:*}
        [ "$t" = "$((10 * $1))" ] || [ "$t" = "$((10 * $1 + 1))" ] && echo "${d##*/}"
    done
}
pd_wwid() { cat "/sys/block/$1/device/wwid" 2>/dev/null | tr -s ' ' | tr ' ' '_'; }
"""


def wait_paths_script(lun: int, timeout_s: int) -> str:
    """Rescan the LUN's SCSI targets and wait until both paths are block devices."""
    return (
        GUEST_FUNCS
        + f"""
for h in /sys/class/scsi_host/host*; do echo "- - -" > $h/scan 2>/dev/null; done
i=0
while [ $(pd_paths {lun} | wc -l) -lt 2 ]; do
    i=$((i+1)); [ $i -gt {timeout_s * 10} ] && {{ echo "LUN {lun}: paths $(pd_paths {lun} | tr '\\n' ' ') after {timeout_s} s"; exit 1; }}
    sleep 0.1
done
pd_paths {lun} | tr '\\n' ' '; echo
"""
    )


def assemble_script(lun: int, queue_if_no_path: bool) -> str:
    """Group the LUN's paths by WWID and load a dm-multipath table over them (dmsetup).

    Two paths with different WWIDs are an error (they are not one LUN), as in
    multipathd. ``queue_if_no_path``: I/O waits for a path rather than failing.
    """
    feat = "1 queue_if_no_path" if queue_if_no_path else "0"
    return (
        GUEST_FUNCS
        + f"""
set -- $(pd_paths {lun})
[ $# -eq 2 ] || {{ echo "LUN {lun}: want 2 paths, have $*"; exit 1; }}
w1=$(pd_wwid $1); w2=$(pd_wwid $2)
[ -n "$w1" ] && [ "$w1" = "$w2" ] || {{ echo "LUN {lun}: paths $1 $2 differ in WWID: '$w1' '$w2'"; exit 1; }}
size=$(cat /sys/block/$1/size)
m1=$(cat /sys/block/$1/dev); m2=$(cat /sys/block/$2/dev)
echo "<6>pd-multipath: mpath{lun} wwid $w1 paths $1 ($m1) $2 ($m2)" > /dev/kmsg
dmsetup create mpath{lun} --table "0 $size multipath {feat} 0 1 1 round-robin 0 2 1 $m1 1 $m2 1" || exit 1
dmsetup mknodes mpath{lun}  # no udev in this guest: dmsetup makes /dev/mapper/mpath{lun} itself
[ -b /dev/mapper/mpath{lun} ] || {{ echo "no /dev/mapper/mpath{lun}"; exit 1; }}
dmsetup status mpath{lun}
"""
    )


def mkfs_mount_script(lun: int) -> str:
    return f"""
set -e
mke2fs -q -F /dev/mapper/mpath{lun} >/dev/null 2>&1
mkdir -p /mnt/mp{lun}
mount -t ext4 /dev/mapper/mpath{lun} /mnt/mp{lun}
"""


def start_io_script(lun: int) -> str:
    """A named writer/verifier (comm ``pdio-mp{lun}``) and a path checker (``pdchk-mp{lun}``).

    The writer: buffered writes + fsync, direct reads, compare. The checker
    reads one sector of each path device with O_DIRECT every 2 s, as
    multipathd's directio checker does (so path I/O waits in the block layer
    show up too).

    Why buffered writes with fsync: fsync waits for page writeback in
    ``folio_wait_writeback`` (TASK_UNINTERRUPTIBLE, no timeout), which the
    hung-task detector sees when the storage stalls. A direct-I/O wait would
    not do: ``blk_io_schedule`` wakes every half hung-task period on purpose.
    Reads are direct so they check what reached the LUN, not the page cache.
    Mismatches go to the kernel log (layer 0) as ``PDIO-MISMATCH``.
    """
    body = f"""#!/bin/sh
i=0
while :; do
    i=$((i+1)); f=/mnt/mp{lun}/blk.$((i % 4))
    dd if=/dev/urandom of=/run/pdio{lun}.src bs=64k count=4 2>/dev/null
    a=$(md5sum < /run/pdio{lun}.src)
    dd if=/run/pdio{lun}.src of=$f bs=64k conv=fsync 2>/dev/null
    b=$(dd if=$f bs=64k iflag=direct 2>/dev/null | md5sum)
    [ "$a" = "$b" ] || echo "<3>PDIO-MISMATCH mp{lun} $f" > /dev/kmsg
    echo $i > /run/pdio{lun}.count
done
"""
    # multipathd's "directio" path checker, by hand: one O_DIRECT sector read per path every 2 s
    checker = (
        GUEST_FUNCS
        + f"""
while :; do
    for p in $(pd_paths {lun}); do dd if=/dev/$p of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null; done
    sleep 2
done
"""
    )
    # a log appender (comm pdlog-mp{lun}): one 512-byte record + fsync every 0.5 s, like a
    # journal; it is never in a direct-I/O wait, so a stall always leaves it in D state
    logger = f"""
i=0
while :; do
    i=$((i+1))
    echo "pdlog $i" | dd of=/mnt/mp{lun}/journal bs=512 seek=$((i % 64)) count=1 conv=notrunc,sync,fsync 2>/dev/null
    sleep 0.5
done
"""
    return f"""
cat > /run/pdio-mp{lun} <<'PDEOF'
{body}PDEOF
cat > /run/pdlog-mp{lun} <<'PDEOF'
#!/bin/sh
{logger}PDEOF
chmod +x /run/pdlog-mp{lun}
(/run/pdlog-mp{lun} </dev/null >/dev/null 2>&1 &)
cat > /run/pdchk-mp{lun} <<'PDEOF'
#!/bin/sh
{checker}PDEOF
chmod +x /run/pdio-mp{lun} /run/pdchk-mp{lun}
(/run/pdio-mp{lun} </dev/null >/dev/null 2>&1 &)
(/run/pdchk-mp{lun} </dev/null >/dev/null 2>&1 &)
i=0; while [ ! -s /run/pdio{lun}.count ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
cat /run/pdio{lun}.count 2>/dev/null || {{ echo "I/O on mp{lun} did not complete a round"; exit 1; }}
"""
