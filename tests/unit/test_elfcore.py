"""ELF core reading and writing (progdump.elfcore) on synthetic cores.

The cores here are built byte by byte with ``struct`` (see ``build_core``),
independently of the module's writer, in the layouts QEMU 7.2 and Linux
``/proc/vmcore`` use; hostile variants check that a bad file only ever
raises SnapshotError with a message naming what is wrong.
"""

from __future__ import annotations

import json
import os
import random
import struct

import pytest

from progdump import elfcore
from progdump.elfcore import (
    ElfCoreWriter,
    ElfSegment,
    build_prstatus,
    build_qemu_cpustate,
    load_elf_snapshot,
    parse_prstatus,
    parse_qemu_cpustate,
    save_elf_snapshot,
    snapshot_notes,
)
from progdump.snapshot import (
    NT_PROGDUMP_CONSOLE,
    NT_PROGDUMP_METADATA,
    PAGE_SIZE,
    CpuState,
    MemoryRange,
    Note,
    Snapshot,
    SnapshotError,
)

VMCOREINFO = b"OSRELEASE=6.1.0-test\nPAGESIZE=4096\nKERNELOFFSET=1c000000\nNUMBER(phys_base)=0\n"


# -- a hand-made core builder (independent of ElfCoreWriter) -----------------


def note_bytes(name: bytes, ntype: int, desc: bytes) -> bytes:
    n = name + b"\0"
    return struct.pack("<III", len(n), len(desc), ntype) + n + b"\0" * (-len(n) % 4) + desc + b"\0" * (-len(desc) % 4)


def build_core(
    loads: list[tuple[int, bytes, int]],
    notes: bytes,
    *,
    machine: int = 62,
    qemu72: bool = False,
    vaddr_base: int = 0,
) -> bytes:
    """An ELF64 core: ``loads`` are (paddr, file bytes, memsz).

    ``qemu72`` mimics QEMU 7.2: two section headers at 0x40, program headers
    at 0xc0 and a wrong e_ehsize of 8.
    """
    nph = 1 + len(loads)
    phoff = 0xC0 if qemu72 else 64
    shoff = 0x40 if qemu72 else 0
    note_off = phoff + nph * 56
    data_off = note_off + len(notes)
    out = bytearray()
    out += struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF\x02\x01\x01" + bytes(9),
        4,
        machine,
        1,
        0,
        phoff,
        shoff,
        0,
        8 if qemu72 else 64,
        56,
        nph,
        64,
        2 if qemu72 else 0,
        1 if qemu72 else 0,
    )
    if qemu72:
        out += bytes(0xC0 - len(out))  # section headers (contents irrelevant here)
    phdrs = [struct.pack("<IIQQQQQQ", 4, 0, note_off, 0, 0, len(notes), len(notes), 0)]
    off = data_off
    for paddr, data, memsz in loads:
        vaddr = vaddr_base + paddr if vaddr_base else 0
        phdrs.append(struct.pack("<IIQQQQQQ", 1, 7, off, vaddr, paddr, len(data), memsz, 0))
        off += len(data)
    out += b"".join(phdrs)
    out += notes
    for _, data, _ in loads:
        out += data
    return bytes(out)


def pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def i386_prstatus(eip: int, eax: int) -> bytes:
    buf = bytearray(144)
    struct.pack_into("<I", buf, 24, 1)
    regs = [0] * 17
    regs[6] = eax
    regs[12] = eip
    regs[13] = 0xF000
    struct.pack_into("<17I", buf, 72, *regs)
    return bytes(buf)


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


def write(tmp, name: str, data: bytes) -> str:
    p = tmp / name
    p.write_bytes(data)
    return str(p)


# -- registers ------------------------------------------------------------------


def test_prstatus_x86_64_register_order():
    regs = {n: 0x1000 + i for i, n in enumerate(elfcore.USER_REGS64)}
    raw = build_prstatus(regs, pid=7)
    assert len(raw) == 336
    assert struct.unpack_from("<I", raw, 32)[0] == 7
    # pr_reg starts at 112 with r15; rip is the 17th slot, eflags the 19th.
    assert struct.unpack_from("<Q", raw, 112)[0] == regs["r15"]
    assert struct.unpack_from("<Q", raw, 112 + 16 * 8)[0] == regs["rip"]
    assert struct.unpack_from("<Q", raw, 112 + 18 * 8)[0] == regs["rflags"]
    assert parse_prstatus(raw) == regs


def test_prstatus_i386_and_bad_size():
    regs = parse_prstatus(i386_prstatus(0xFFF0, 0x1234))
    assert regs["rip"] == 0xFFF0 and regs["rax"] == 0x1234 and regs["cs"] == 0xF000
    with pytest.raises(SnapshotError, match="neither x86-64"):
        parse_prstatus(b"\0" * 100)


def test_qemu_cpustate_layout_and_round_trip():
    regs = {"rax": 1, "rsp": 2, "rbp": 3, "r15": 4, "rip": 5, "rflags": 6, "cs": 0x10, "cs_base": 0,
            "cs_limit": 0xFFFFFFFF, "cs_flags": 0xA09B00, "fs_base": 0x7F00, "gs_base": 0xFFFF888000000000,
            "gdt_base": 0xFFFFFE0000001000, "gdt_limit": 0x7F, "cr0": 0x80050033, "cr2": 0x77, "cr3": 0x1A0A000,
            "cr4": 0x3506F0, "kernel_gs_base": 0x99}  # fmt: skip
    raw = build_qemu_cpustate(regs)
    assert len(raw) == 440
    assert struct.unpack_from("<II", raw, 0) == (1, 440)
    # rsp and rbp are 7th and 8th u64 in QEMU's order (rax rbx rcx rdx rsi rdi rsp rbp).
    assert struct.unpack_from("<QQ", raw, 8 + 6 * 8) == (2, 3)
    # cr[5] after 18 u64 and ten 24-byte segments; cr3 is cr[3].
    cr_off = 8 + 18 * 8 + 10 * 24
    assert struct.unpack_from("<5Q", raw, cr_off) == (0x80050033, 0, 0x77, 0x1A0A000, 0x3506F0)
    back = parse_qemu_cpustate(raw)
    for k, v in regs.items():
        assert back[k] == v, k
    # Without kernel_gs_base (an older QEMU's size): parsed, key absent.
    short = raw[:432]
    short = struct.pack("<II", 1, 432) + short[8:]
    assert "kernel_gs_base" not in parse_qemu_cpustate(short)
    with pytest.raises(SnapshotError, match="shorter"):
        parse_qemu_cpustate(raw[:100])


# -- QEMU 7.2 layout -------------------------------------------------------------


def test_loads_qemu72_layout_with_cpu_notes(tmp):
    low = pattern(0xA0000, 1)
    high = pattern(0x40000, 2)
    qregs = {"rip": 0xFFF0, "cr0": 0x60000010, "cr3": 0x1234000, "cs": 0xF000, "cs_base": 0xFFFF0000}
    notes = note_bytes(b"CORE", 1, i386_prstatus(0xFFF0, 0)) + note_bytes(b"QEMU", 0, build_qemu_cpustate(qregs))
    notes += note_bytes(b"VMCOREINFO", 0, VMCOREINFO)
    path = write(tmp, "q.elf", build_core([(0, low, len(low)), (0xFFFC0000, high, len(high))], notes, machine=3,
                                          qemu72=True))  # fmt: skip
    with load_elf_snapshot(path) as s:
        assert [(r.phys_start, r.size) for r in s.ranges] == [(0, 0xA0000), (0xFFFC0000, 0x40000)]
        assert s.read_phys(0x1000, 64) == low[0x1000:0x1040]
        assert s.read_phys(0xFFFFFFF0, 16) == high[-16:]
        assert len(s.cpus) == 1
        cpu = s.cpus[0]
        assert cpu.regs["rip"] == 0xFFF0 and cpu.regs["cr3"] == 0x1234000 and cpu.regs["cs_base"] == 0xFFFF0000
        assert cpu.prstatus is not None and len(cpu.prstatus) == 144
        assert s.vmcoreinfo["OSRELEASE"] == "6.1.0-test"
        assert [n.name for n in s.notes] == ["VMCOREINFO"]
        assert s.load_warnings == []
        # Memory is a view of the mapped file, not a copy.
        assert isinstance(s.ranges[0].buffer, memoryview) and s.ranges[0].buffer.readonly


# -- /proc/vmcore layout ---------------------------------------------------------


def test_loads_proc_vmcore_layout_with_overlapping_kernel_text(tmp):
    ram = pattern(0x200000, 3)
    regs = {n: i + 1 for i, n in enumerate(elfcore.USER_REGS64)}
    notes = note_bytes(b"CORE", 1, build_prstatus(regs, 100)) + note_bytes(b"CORE", 1, build_prstatus({}, 101))
    notes += note_bytes(b"VMCOREINFO", 0, VMCOREINFO) + bytes(64)  # zero padding ends the notes
    # A RAM segment at direct-map vaddr, then a kernel-text segment repeating 1 MiB of it.
    loads = [(0x100000, ram, len(ram)), (0x200000, ram[0x100000:0x200000], 0x100000)]
    path = write(tmp, "v.elf", build_core(loads, notes, vaddr_base=0xFFFF888000000000))
    with load_elf_snapshot(path) as s:
        assert [(r.phys_start, r.size) for r in s.ranges] == [(0x100000, 0x200000)]
        assert any("inside earlier segments" in w for w in s.load_warnings)
        assert s.read_phys(0x280000, 32) == ram[0x180000:0x180020]
        assert len(s.cpus) == 2
        assert s.cpus[0].regs == {n: i + 1 for i, n in enumerate(elfcore.USER_REGS64)}
        assert "rflags" in s.cpus[0].regs and "eflags" not in s.cpus[0].regs
        assert s.cpus[1].index == 1
        assert s.vmcoreinfo_raw == VMCOREINFO


def test_partial_overlap_is_clipped(tmp):
    a = pattern(0x3000, 4)
    b = pattern(0x3000, 5)
    path = write(tmp, "o.elf", build_core([(0x0, a, 0x3000), (0x2000, b, 0x3000)], b""))
    with load_elf_snapshot(path) as s:
        assert [(r.phys_start, r.size) for r in s.ranges] == [(0, 0x3000), (0x3000, 0x2000)]
        assert s.read_phys(0x2000, PAGE_SIZE) == a[0x2000:]
        assert s.read_phys(0x3000, 0x2000) == b[0x1000:]
        assert any("clipped" in w for w in s.load_warnings)


def test_many_overlaps_give_bounded_warnings(tmp):
    # Like a paging:true dump: the same physical page mapped by many PT_LOADs.
    page = pattern(PAGE_SIZE, 12)
    path = write(tmp, "m.elf", build_core([(0x5000, page, PAGE_SIZE)] * 500, b""))
    with load_elf_snapshot(path) as s:
        assert [(r.phys_start, r.size) for r in s.ranges] == [(0x5000, PAGE_SIZE)]
        assert len(s.load_warnings) == 65 and "499" not in s.load_warnings[-1]
        assert s.load_warnings[-1].startswith("... and 435 more")


def test_unaligned_segment_rounded_inwards(tmp):
    data = pattern(0x3000, 6)
    path = write(tmp, "u.elf", build_core([(0x10800, data, 0x3000)], b""))
    with load_elf_snapshot(path) as s:
        assert [(r.phys_start, r.size) for r in s.ranges] == [(0x11000, 0x2000)]
        assert s.read_phys(0x11000, 16) == data[0x800:0x810]
        assert any("not page aligned" in w for w in s.load_warnings)


def test_memsz_beyond_filesz_reads_zero_including_partial_page(tmp):
    data = pattern(0x1800, 7)  # one and a half pages of file bytes, then zero fill
    path = write(tmp, "z.elf", build_core([(0x0, data, 0x5000), (0x5000, b"\xff" * 0x1000, 0x1000)], b""))
    with load_elf_snapshot(path) as s:
        assert s.total_bytes == 0x6000
        assert s.read_phys(0, 0x1800) == data
        # The zero fill of the partial page must not show the next segment's file bytes.
        assert s.read_phys(0x1800, 0x3800) == bytes(0x3800)
        assert s.read_phys(0x5000, 0x1000) == b"\xff" * 0x1000


# -- hostile and broken files --------------------------------------------------------


def small_core() -> bytes:
    notes = note_bytes(b"CORE", 1, build_prstatus({"rip": 1}, 1)) + note_bytes(b"VMCOREINFO", 0, VMCOREINFO)
    return build_core([(0, pattern(0x2000, 8), 0x2000), (0x4000, pattern(0x1000, 9), 0x1000)], notes)


def expect_error(tmp, data: bytes, match: str) -> None:
    path = write(tmp, "bad.elf", data)
    with pytest.raises(SnapshotError, match=match):
        load_elf_snapshot(path)


def patch(data: bytes, off: int, fmt: str, *vals) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, off, *vals)
    return bytes(b)


def test_missing_and_empty_file(tmp):
    with pytest.raises(SnapshotError, match="cannot open"):
        load_elf_snapshot(tmp / "nope.elf")
    expect_error(tmp, b"", "empty file")


def test_bad_identity(tmp):
    good = small_core()
    expect_error(tmp, good[:40], "too short")
    expect_error(tmp, b"MZ" + good[2:], "not an ELF file")
    expect_error(tmp, patch(good, 4, "<B", 1), "ELFCLASS64")
    expect_error(tmp, patch(good, 5, "<B", 2), "little endian")
    expect_error(tmp, patch(good, 16, "<H", 2), "ET_CORE")
    expect_error(tmp, patch(good, 18, "<H", 183), "machine 183")
    expect_error(tmp, patch(good, 54, "<H", 32), "e_phentsize")


def test_huge_phnum_and_phoff(tmp):
    good = small_core()
    expect_error(tmp, patch(good, 56, "<H", 0xFFFE), "outside the file")
    expect_error(tmp, patch(good, 32, "<Q", 1 << 62), "outside the file")
    expect_error(tmp, patch(good, 56, "<H", 0), "no program headers")
    # PN_XNUM without a section header, and with one claiming 2**32-1 headers.
    expect_error(tmp, patch(good, 56, "<H", 0xFFFF), "PN_XNUM")
    xn = patch(good, 56, "<H", 0xFFFF)
    xn = patch(xn, 40, "<Q", len(xn)) + struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0xFFFFFFFF, 0, 0)
    expect_error(tmp, xn, "exceed the limit")


def test_notes_running_past_segment(tmp):
    good = small_core()
    note_off = 64 + 3 * 56
    expect_error(tmp, patch(good, note_off + 4, "<I", 0xFFFFFFFF), r"note 0 .* run past the segment end")
    expect_error(tmp, patch(good, note_off, "<I", 4000), "name size 4000")
    # Second note's descriptor size runs past.
    second = note_off + 12 + 8 + 336
    expect_error(tmp, patch(good, second + 4, "<I", 1 << 20), r"note 1 .* run past")
    # The PT_NOTE segment itself runs past EOF, or is absurdly large.
    expect_error(tmp, patch(good, 64 + 32, "<Q", 1 << 30), "exceed the limit|past the end of the file")
    expect_error(tmp, patch(good, 64 + 32, "<Q", len(good)), "past the end of the file")


def test_pt_load_beyond_eof_and_bad_sizes(tmp):
    good = small_core()
    ph1 = 64 + 56
    expect_error(tmp, patch(good, ph1 + 8, "<Q", len(good)), r"PT_LOAD\[1\].*past the end of the file")
    expect_error(tmp, patch(good, ph1 + 32, "<Q", 0x3000), r"p_filesz .* exceeds p_memsz")
    expect_error(tmp, patch(good, ph1 + 24, "<Q", (1 << 64) - 0x1000), "physical address space")
    # Truncated file: the last segment's bytes are missing.
    expect_error(tmp, good[:-100], r"PT_LOAD\[2\].*truncated core")


def test_truncated_at_every_length_never_tracebacks(tmp):
    good = small_core()
    path = tmp / "t.elf"
    for n in list(range(0, 700)) + list(range(700, len(good), 97)):
        path.write_bytes(good[:n])
        # every cut loses part of the header, the program headers or the last
        # segment's bytes: each must be refused as a SnapshotError, nothing else
        with pytest.raises(SnapshotError):
            load_elf_snapshot(path).close()


def test_random_header_corruption_never_tracebacks(tmp):
    good = small_core()
    rng = random.Random(1234)
    path = tmp / "c.elf"
    for _ in range(1500):
        b = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(0, 64 + 3 * 56 + 600)
            b[pos] = rng.randrange(256)
        path.write_bytes(bytes(b))
        try:
            load_elf_snapshot(path).close()
        except SnapshotError as e:
            assert str(e)


def test_garbage_files(tmp):
    rng = random.Random(99)
    path = tmp / "g.elf"
    for n in (1, 63, 64, 65, 4096, 100000):
        path.write_bytes(rng.randbytes(n))
        with pytest.raises(SnapshotError):
            load_elf_snapshot(path)
    # An ELF header in front of garbage.
    path.write_bytes(small_core()[:64] + rng.randbytes(5000))
    try:
        load_elf_snapshot(path).close()
    except SnapshotError:
        pass


def test_bad_progdump_notes_are_ignored_with_warning(tmp):
    notes = note_bytes(b"PROGDUMP", 0x50440002, b"{not json") + note_bytes(b"PROGDUMP", 0x50440003, b"[1, 2]")
    notes += note_bytes(b"CORE", 1, build_prstatus({"rip": 0x42}, 1))
    path = write(tmp, "p.elf", build_core([(0, bytes(0x1000), 0x1000)], notes))
    with load_elf_snapshot(path) as s:
        assert s.metadata == {}
        assert s.cpus[0].regs["rip"] == 0x42  # fell back to NT_PRSTATUS
        assert any("metadata note ignored" in w for w in s.load_warnings)
        assert any("CPU registers note ignored" in w for w in s.load_warnings)


@pytest.mark.parametrize(
    "doc",
    [
        b'[{"index": 0, "regs": {"rip": -1}}]',
        b'[{"index": 0, "regs": {"rip": 18446744073709551616}}]',
        b'[{"index": "0", "regs": {}}]',
        b'[{"index": 0, "regs": {"rip": true}}]',
        b"[" * 100000,
        b'[{"index": 0, "regs": {}, "prstatus": "zz"}]',
    ],  # fmt: skip
)
def test_hostile_cpu_registers_note_falls_back_to_prstatus(tmp, doc):
    notes = note_bytes(b"PROGDUMP", 0x50440003, doc) + note_bytes(b"CORE", 1, build_prstatus({"rip": 0x42}, 1))
    path = write(tmp, "h.elf", build_core([(0, bytes(0x1000), 0x1000)], notes))
    with load_elf_snapshot(path) as s:
        assert [c.regs["rip"] for c in s.cpus] == [0x42]
        assert any("CPU registers note ignored" in w for w in s.load_warnings)


# -- writing and round trip ------------------------------------------------------


def make_snapshot(tmp) -> Snapshot:
    """Three ranges with data, zero runs inside and at the end, in one backing file."""
    rng = random.Random(5)
    a = bytearray(rng.randbytes(64 * PAGE_SIZE))
    a[10 * PAGE_SIZE : 40 * PAGE_SIZE] = bytes(30 * PAGE_SIZE)  # zero run inside (sparse hole)
    a[60 * PAGE_SIZE :] = bytes(4 * PAGE_SIZE)  # zero tail -> memsz > filesz
    b = bytes(8 * PAGE_SIZE)  # all zero
    c = rng.randbytes(3 * PAGE_SIZE)
    backing = tmp / "ram.bin"
    backing.write_bytes(bytes(a) + b + c)
    raw64 = build_prstatus({"rip": 0xFFFFFFFF81000000, "rsp": 0xFFFFC90000003E58}, pid=1)
    cpus = [
        CpuState(0, parse_prstatus(raw64) | {"cr3": 0x10A000, "cr0": 0x80050033, "efer": 0xD01}, raw64),
        CpuState(1, {"rip": 0xFFFFFFFF81000100, "rflags": 0x246}, None),
        CpuState(2, parse_prstatus(i386_prstatus(0xFFF0, 7)), i386_prstatus(0xFFF0, 7)),
    ]
    notes = [Note("VMCOREINFO", 0, VMCOREINFO), Note("CORE", 3, b"prpsinfo-ish"), Note("Xen", 0x2000001, b"x" * 5)]
    return Snapshot.from_file_ranges(
        backing,
        [(0x100000, 0, len(a)), (0x200000, len(a), len(b)), (0x1_0000_0000, len(a) + len(b), len(c))],
        cpus=cpus,
        notes=notes,
        console_tail=b"[  1.0] Kernel panic - not syncing: test\n",
        metadata={"os": "linux", "release": "6.1.0-test", "ram_bytes": 75 * PAGE_SIZE, "nested": {"a": [1, 2]}},
    )


def coverage(s: Snapshot) -> list[tuple[int, int]]:
    """Covered physical extents, adjacent ranges merged (a loader may split a
    segment into its file part and its zero fill)."""
    out: list[list[int]] = []
    for r in s.ranges:
        if out and out[-1][1] == r.phys_start:
            out[-1][1] = r.phys_end
        else:
            out.append([r.phys_start, r.phys_end])
    return [(a, b) for a, b in out]


def assert_same_snapshot(a: Snapshot, b: Snapshot) -> None:
    assert coverage(a) == coverage(b)
    for start, end in coverage(a):
        for p in range(start, end, 64 * PAGE_SIZE):
            n = min(64 * PAGE_SIZE, end - p)
            assert a.read_phys(p, n) == b.read_phys(p, n), hex(p)
    assert a.cpus == b.cpus
    assert a.notes == b.notes
    assert a.console_tail == b.console_tail
    assert a.metadata == b.metadata


def test_round_trip(tmp):
    with make_snapshot(tmp) as s:
        out = tmp / "out.elf"
        save_elf_snapshot(s, out)
        with load_elf_snapshot(out) as t:
            assert t.load_warnings == []
            assert_same_snapshot(s, t)
            # And once more: save(load(save(s))) is byte-identical.
            out2 = tmp / "out2.elf"
            save_elf_snapshot(t, out2)
        assert out.read_bytes() == out2.read_bytes()


def test_saved_layout_is_standard(tmp):
    with make_snapshot(tmp) as s:
        out = tmp / "out.elf"
        save_elf_snapshot(s, out)
    data = out.read_bytes()
    ident, etype, machine, _, _, phoff, _, _, ehsize, phentsize, phnum = struct.unpack_from("<16sHHIQQQIHHH", data, 0)
    assert (etype, machine, phoff, ehsize, phentsize, phnum) == (4, 62, 64, 64, 56, 4)
    phdrs = [struct.unpack_from("<IIQQQQQQ", data, 64 + i * 56) for i in range(phnum)]
    assert phdrs[0][0] == 4  # PT_NOTE first
    loads = phdrs[1:]
    assert [p[0] for p in loads] == [1, 1, 1]
    assert [(p[4], p[6]) for p in loads] == [(0x100000, 64 * PAGE_SIZE), (0x200000, 8 * PAGE_SIZE),
                                             (0x1_0000_0000, 3 * PAGE_SIZE)]  # fmt: skip
    assert all(p[3] == 0 for p in loads)  # p_vaddr 0, physical in p_paddr
    assert all(p[2] % PAGE_SIZE == 0 for p in loads)
    assert loads[0][5] == 60 * PAGE_SIZE  # zero tail not in the file
    assert loads[1][5] == 0  # an all-zero range takes no file bytes
    # The inner zero run is a hole: fewer blocks allocated than the file size.
    st = os.stat(out)
    assert st.st_blocks * 512 < st.st_size - 20 * PAGE_SIZE
    # Notes: CORE prstatus x3 (raw x86-64 kept, others synthesised), QEMU for the CPU with cr3.
    notes = elfcore.parse_note_section(data[phdrs[0][2] : phdrs[0][2] + phdrs[0][5]])
    names = [(n.name, n.type) for n in notes]
    assert names[:4] == [("CORE", 1), ("CORE", 1), ("CORE", 1), ("QEMU", 0)]
    assert all(len(n.desc) == 336 for n in notes[:3])
    assert parse_qemu_cpustate(notes[3].desc)["cr3"] == 0x10A000
    assert ("VMCOREINFO", 0) in names and ("PROGDUMP", NT_PROGDUMP_CONSOLE) in names
    meta = [n for n in notes if (n.name, n.type) == ("PROGDUMP", NT_PROGDUMP_METADATA)][0]
    assert json.loads(meta.desc)["release"] == "6.1.0-test"


def test_streaming_writer_chunks_span_segments(tmp):
    segs = [ElfSegment(0, 3 * PAGE_SIZE, 3 * PAGE_SIZE), ElfSegment(0x10000, 4 * PAGE_SIZE, 2 * PAGE_SIZE),
            ElfSegment(0x20000, 2 * PAGE_SIZE, 0), ElfSegment(0x30000, 200 * PAGE_SIZE, 200 * PAGE_SIZE)]  # fmt: skip
    content = pattern(5 * PAGE_SIZE, 11)
    out = tmp / "s.elf"
    with ElfCoreWriter(out, snapshot_notes([CpuState(0, {"rip": 1})]), segs) as w:
        w.write(content[:100])
        w.write(content[100:])  # spans segment 0 and 1
        w.write_zeros(100 * PAGE_SIZE)  # a hole
        w.write(b"\x01" * (100 * PAGE_SIZE))
        assert w.current_segment == 4
    with load_elf_snapshot(out) as s:
        assert s.read_phys(0, 3 * PAGE_SIZE) == content[: 3 * PAGE_SIZE]
        assert s.read_phys(0x10000, 4 * PAGE_SIZE) == content[3 * PAGE_SIZE :] + bytes(2 * PAGE_SIZE)
        assert s.read_phys(0x20000, 2 * PAGE_SIZE) == bytes(2 * PAGE_SIZE)
        assert s.read_phys(0x30000, 100 * PAGE_SIZE) == bytes(100 * PAGE_SIZE)
        assert s.read_phys(0x30000 + 100 * PAGE_SIZE, 100 * PAGE_SIZE) == b"\x01" * (100 * PAGE_SIZE)
        assert not s.has_phys(0x3000)  # a hole between segments: absent, not zero
        assert s.cpus[0].regs == {"rip": 1}


def test_streaming_writer_checks_byte_counts(tmp):
    segs = [ElfSegment(0, PAGE_SIZE, PAGE_SIZE)]
    with pytest.raises(ValueError, match="got 10 of 4096"):
        with ElfCoreWriter(tmp / "a.elf", [], segs) as w:
            w.write(b"x" * 10)
    w = ElfCoreWriter(tmp / "b.elf", [], segs)
    with pytest.raises(ValueError, match="past the last segment"):
        w.write(b"x" * (PAGE_SIZE + 1))
    w.abort()
    with pytest.raises(ValueError, match="overlaps"):
        ElfCoreWriter(tmp / "c.elf", [], [ElfSegment(0, 2 * PAGE_SIZE, 0), ElfSegment(PAGE_SIZE, PAGE_SIZE, 0)])
    with pytest.raises(ValueError, match="filesz > memsz"):
        ElfCoreWriter(tmp / "d.elf", [], [ElfSegment(0, PAGE_SIZE, 2 * PAGE_SIZE)])


def test_many_segments_use_pn_xnum(tmp):
    n = 70000  # more than 65534 program headers
    segs = [ElfSegment(i * 2 * PAGE_SIZE, PAGE_SIZE, PAGE_SIZE if i % 1000 == 0 else 0) for i in range(n)]
    out = tmp / "x.elf"
    with ElfCoreWriter(out, [], segs) as w:
        for i in range(0, n, 1000):
            w.write(struct.pack("<Q", i) * (PAGE_SIZE // 8))
    assert struct.unpack_from("<H", out.read_bytes(), 56)[0] == 0xFFFF
    with load_elf_snapshot(out) as s:
        assert len(s.ranges) == n
        assert s.read_phys(2000 * 2 * PAGE_SIZE, 8) == struct.pack("<Q", 2000)
        assert s.read_phys(2001 * 2 * PAGE_SIZE, 8) == bytes(8)


def test_snapshot_methods_delegate(tmp):
    with make_snapshot(tmp) as s:
        save_elf_snapshot(s, tmp / "m.elf")
    with load_elf_snapshot(tmp / "m.elf") as t:
        assert t.console_tail.startswith(b"[  1.0] Kernel panic")


def test_empty_snapshot_round_trip(tmp):
    s = Snapshot(ranges=[MemoryRange(0, PAGE_SIZE, memoryview(bytes(PAGE_SIZE)))])
    save_elf_snapshot(s, tmp / "e.elf")
    with load_elf_snapshot(tmp / "e.elf") as t:
        assert_same_snapshot(s, t)
        assert t.cpus == [] and t.metadata == {} and t.console_tail == b""


# -- property: any snapshot survives save/load -------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

page_kinds = st.sampled_from(["zero", "data", "ones"])
range_specs = st.lists(
    st.tuples(st.integers(0, 3), st.lists(page_kinds, min_size=1, max_size=6)), min_size=1, max_size=5
)
reg_values = st.integers(0, (1 << 64) - 1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    specs=range_specs,
    regs=st.lists(
        st.dictionaries(st.sampled_from(["rip", "rsp", "cr3", "rflags", "efer", "r9"]), reg_values), max_size=3
    ),  # fmt: skip
    console=st.binary(max_size=200),
    meta=st.dictionaries(st.text(max_size=8), st.one_of(st.integers(-5, 5), st.text(max_size=8)), max_size=3),
)
def test_round_trip_property(tmp_path, specs, regs, console, meta):
    ranges, phys, blob = [], 0, bytearray()
    for gap, kinds in specs:
        phys += gap * PAGE_SIZE  # gap 0 makes adjacent ranges, merged into one PT_LOAD
        for k in kinds:
            blob += {"zero": bytes(PAGE_SIZE), "ones": b"\xff" * PAGE_SIZE}.get(k) or struct.pack(
                "<Q", phys + len(blob)
            ) * (PAGE_SIZE // 8)
        ranges.append(MemoryRange(phys, len(kinds) * PAGE_SIZE, memoryview(bytes(blob[-len(kinds) * PAGE_SIZE :]))))
        phys += len(kinds) * PAGE_SIZE
    s = Snapshot(
        ranges=ranges,
        cpus=[CpuState(i, r) for i, r in enumerate(regs)],
        notes=[Note("VMCOREINFO", 0, VMCOREINFO)],
        console_tail=console,
        metadata=meta,
    )
    out = tmp_path / "p.elf"
    save_elf_snapshot(s, out)
    with load_elf_snapshot(out) as t:
        assert t.load_warnings == []
        assert_same_snapshot(s, t)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_load_and_close_leak_no_file_descriptors(tmp):
    path = write(tmp, "l.elf", small_core())
    zfill = write(tmp, "zf.elf", build_core([(0, pattern(0x1800, 1), 0x5000)], b""))  # file, partial, zero parts
    bad = write(tmp, "bad.elf", patch(small_core(), 64 + 56 + 8, "<Q", 1 << 40))
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        for good in (path, zfill):
            with load_elf_snapshot(good) as s:
                s.read_phys(0, 16)
        with pytest.raises(SnapshotError):
            load_elf_snapshot(bad)
    assert len(os.listdir("/proc/self/fd")) <= before
