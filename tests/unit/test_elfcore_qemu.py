"""The ELF loader and writer against a real QEMU ``dump-guest-memory`` core.

The core comes from the session fixture ``qemu_elf_core`` (tests/qemu_core.py):
a paused q35 guest (64 MiB, 2 vCPUs, never booted) with known bytes planted
in its RAM. Skipped, with the reason, where QEMU is not installed.
"""

from __future__ import annotations

import struct

from progdump.elfcore import load_elf_snapshot, save_elf_snapshot
from progdump.snapshot import PAGE_SIZE


def test_planted_bytes_at_their_physical_addresses(qemu_elf_core):
    with load_elf_snapshot(qemu_elf_core.path) as s:
        assert qemu_elf_core.plants
        for addr, data in qemu_elf_core.plants.items():
            assert s.read_phys(addr, len(data)) == data, hex(addr)
        # All of low RAM is there (q35 maps 64 MiB from 0), and the BIOS flash below 4 GiB.
        assert all(s.has_phys(a) for a in range(0, qemu_elf_core.mem_bytes, PAGE_SIZE))
        assert s.has_phys(0xFFFFF000, PAGE_SIZE)
        assert s.load_warnings == []


def test_qemu_header_quirk_is_handled(qemu_elf_core):
    head = qemu_elf_core.path.read_bytes()[:64]
    (e_phoff,) = struct.unpack_from("<Q", head, 32)
    # QEMU 7.2 puts program headers after its section headers; we read e_phoff whatever it is.
    if qemu_elf_core.qemu_version.startswith("7.2."):
        assert e_phoff == 0xC0
    with load_elf_snapshot(qemu_elf_core.path) as s:
        assert s.total_bytes >= qemu_elf_core.mem_bytes


def test_cpu_registers_at_reset(qemu_elf_core):
    with load_elf_snapshot(qemu_elf_core.path) as s:
        assert len(s.cpus) == qemu_elf_core.smp
        for cpu in s.cpus:
            r = cpu.regs
            # x86 reset state: CS selector 0xf000 with base 0xffff0000, IP 0xfff0 (the reset vector
            # at 0xfffffff0), CR0 = 0x60000010 (CD, NW, ET), paging off, cr3 0.
            assert r["rip"] == 0xFFF0
            assert r["cs"] == 0xF000 and r["cs_base"] == 0xFFFF0000
            assert r["cr0"] == 0x60000010 and r["cr3"] == 0
            assert r["rflags"] == 0x2
            assert cpu.prstatus is not None  # raw NT_PRSTATUS kept (i386 layout: real mode)
        # The reset vector holds SeaBIOS's far jump (opcode 0xea).
        assert s.read_phys(0xFFFFFFF0, 1) == b"\xea"


def test_round_trip_of_qemu_core(qemu_elf_core, tmp_path):
    out = tmp_path / "ours.elf"
    with load_elf_snapshot(qemu_elf_core.path) as s:
        save_elf_snapshot(s, out)
        with load_elf_snapshot(out) as t:
            assert t.cpus == s.cpus and t.notes == s.notes
            for addr, data in qemu_elf_core.plants.items():
                assert t.read_phys(addr, len(data)) == data
            for r in s.ranges:
                for off in range(0, r.size, 1 << 20):
                    n = min(1 << 20, r.size - off)
                    assert t.read_phys(r.phys_start + off, n) == bytes(r.buffer[off : off + n])
    # Mostly-zero guest RAM: our core is sparse (zero tails and holes take no file space).
    assert out.stat().st_blocks * 512 < qemu_elf_core.mem_bytes // 4
