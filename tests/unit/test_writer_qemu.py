"""Round trip of a real QEMU ``dump-guest-memory`` core through write and recover."""

from __future__ import annotations

from progdump.device import FileDevice
from progdump.elfcore import load_elf_snapshot
from progdump.export import recover
from progdump.snapshot import PAGE_SIZE
from progdump.writer import write_dump


def test_qemu_core_round_trip(qemu_elf_core, tmp_path):
    """Planted bytes, every page, the CPU registers and notes come back in the recovered vmcore."""
    dev = tmp_path / "dev.img"
    with open(dev, "wb") as f:
        f.truncate(qemu_elf_core.mem_bytes + (8 << 20))
    with load_elf_snapshot(qemu_elf_core.path) as snap:
        with FileDevice(str(dev)) as d:
            res = write_dump(snap, d)
        assert res.stopped == "done" and all(lay.committed for lay in res.layers)
        out = tmp_path / "out"
        sr = recover(str(dev), str(out))
        assert [lay.status for lay in sr.layers] == ["complete"] * 5
        with load_elf_snapshot(out / "vmcore") as v:
            for addr, data in qemu_elf_core.plants.items():
                assert v.read_phys(addr, len(data)) == data
            for r in snap.ranges:
                for off in range(0, r.size, 64 * PAGE_SIZE):  # every 64th page, and all of the last
                    a = r.phys_start + off
                    assert v.read_phys(a, PAGE_SIZE) == bytes(r.buffer[off : off + PAGE_SIZE]), hex(a)
            assert len(v.cpus) == len(snap.cpus) == qemu_elf_core.smp
            for a, b in zip(v.cpus, snap.cpus):
                assert a.regs["rip"] == b.regs["rip"] and a.regs.get("cr3") == b.regs.get("cr3")
