"""Cores progdump writes open in the field's tools: drgn, gdb, crash.

What each needs (checked here, see also progdump/elfcore.py):

* drgn (0.3): treats an ELF core with a ``VMCOREINFO`` note as a Linux kernel
  and adds each PT_LOAD at ``p_paddr`` as physical memory. Without VMCOREINFO,
  a core whose ``p_vaddr`` are all 0 (QEMU ``paging: false``, and ours) is
  refused with "unrecognized QEMU memory dump": the same for QEMU's own core.
* gdb: any ET_CORE with program headers; NT_PRSTATUS gives the threads.
* crash: reads the ELF header, then the program headers at offset 64 (it does
  not honour ``e_phoff``: QEMU 7.2's own cores fail), sizes the headers from
  the first PT_LOAD's ``p_offset``, and finds VMCOREINFO among the notes.

Each test skips with the reason when its tool is missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from progdump.elfcore import build_prstatus, load_elf_snapshot, save_elf_snapshot
from progdump.snapshot import PAGE_SIZE, CpuState, MemoryRange, Note, Snapshot

OSRELEASE = "6.1.0-progdump-test"
VMCOREINFO = (
    f"OSRELEASE={OSRELEASE}\nPAGESIZE=4096\nKERNELOFFSET=0\nSYMBOL(swapper_pg_dir)=ffffffff82a0a000\n"
    "NUMBER(phys_base)=0\nNUMBER(pgtable_l5_enabled)=0\n"
).encode()
PLANT_ADDR = 0x123000
PLANT = b"progdump tool check ".ljust(PAGE_SIZE, b".")


def synthetic_core(path, *, vmcoreinfo: bool) -> None:
    """A small kernel-like core: 2 CPUs with cr3, two RAM ranges, a planted page."""
    low = bytearray(4 << 20)
    low[PLANT_ADDR : PLANT_ADDR + PAGE_SIZE] = PLANT
    high = bytes(range(256)) * (PAGE_SIZE // 256) * 4
    regs = [{"rip": 0xFFFFFFFF81000000 + i, "rsp": 0xFFFFC90000000000, "cr3": 0x10A000} for i in range(2)]
    s = Snapshot(
        ranges=[MemoryRange(0, len(low), memoryview(bytes(low))), MemoryRange(1 << 32, len(high), memoryview(high))],
        cpus=[CpuState(i, r, build_prstatus(r, pid=i + 1)) for i, r in enumerate(regs)],
        notes=[Note("VMCOREINFO", 0, VMCOREINFO)] if vmcoreinfo else [],
    )
    save_elf_snapshot(s, path)


def need(tool: str) -> str:
    exe = shutil.which(tool)
    if exe is None:
        pytest.skip(f"{tool} is not installed")
    return exe


def drgn_module():
    try:
        import drgn
    except ImportError:
        pytest.skip("drgn (PyPI drgn) is not installed")
    return drgn


def test_drgn_opens_our_core_as_a_kernel(tmp_path):
    drgn = drgn_module()
    core = tmp_path / "vmcore"
    synthetic_core(core, vmcoreinfo=True)
    prog = drgn.Program()
    prog.set_core_dump(str(core))
    assert prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL
    assert prog.platform.arch == drgn.Architecture.X86_64
    assert prog.read(PLANT_ADDR, PAGE_SIZE, True) == PLANT
    assert prog.read(1 << 32, 256, True) == bytes(range(256))


def test_drgn_without_vmcoreinfo_refuses_ours_as_it_does_qemus(tmp_path, qemu_elf_core):
    drgn = drgn_module()
    core = tmp_path / "vmcore"
    synthetic_core(core, vmcoreinfo=False)
    messages = []
    for path in (core, qemu_elf_core.path):
        with pytest.raises(ValueError) as e:
            drgn.Program().set_core_dump(str(path))
        messages.append(str(e.value))
    assert "vmcoreinfo" in messages[0] and messages[0] == messages[1]


def test_drgn_opens_qemu_core_resaved_with_vmcoreinfo(tmp_path, qemu_elf_core):
    drgn = drgn_module()
    out = tmp_path / "vmcore"
    with load_elf_snapshot(qemu_elf_core.path) as s:
        s.notes.append(Note("VMCOREINFO", 0, VMCOREINFO))
        save_elf_snapshot(s, out)
    prog = drgn.Program()
    prog.set_core_dump(str(out))
    assert prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL
    for addr, data in qemu_elf_core.plants.items():
        assert prog.read(addr, len(data), True) == data


def test_gdb_reads_segments_and_registers(tmp_path):
    gdb = need("gdb")
    core = tmp_path / "vmcore"
    synthetic_core(core, vmcoreinfo=True)
    out = subprocess.run(
        [gdb, "-batch", "-nx", "-ex", "info files", "-ex", "info threads", "-ex", "p/x $rip", "-c", str(core)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    ).stdout  # fmt: skip
    assert "file type elf64-x86-64" in out, out
    assert set(re.findall(r"is (load\d+)", out)) == {"load1", "load2"}, out
    assert len(re.findall(r"LWP [12]\b", out)) >= 2, out  # one thread per NT_PRSTATUS
    assert re.search(r"\$1 = 0xffffffff8100000[01]", out), out


def test_crash_reads_our_header_and_vmcoreinfo(tmp_path):
    crash = need("crash")
    core = tmp_path / "vmcore"
    synthetic_core(core, vmcoreinfo=True)
    res = subprocess.run(
        [crash, "--osrelease", str(core)], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    assert res.stdout.strip() == OSRELEASE, (res.stdout, res.stderr)
