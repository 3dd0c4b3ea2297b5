"""HMP monitor text parsers (registers, RAM map) against recorded output."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.qemu.hmp import HmpParseError, RamBlock, parse_ram_layout, parse_registers

DATA = Path(__file__).resolve().parent.parent / "testdata" / "console"
GiB = 1 << 30


def test_registers_of_both_cpus() -> None:
    text = (DATA / "hmp-info-registers-2cpu.txt").read_text()
    cpus = parse_registers(text)
    assert len(cpus) == 2
    # values checked against the raw text independently of the parser's regexes
    blocks = text.split("CPU#")[1:]
    for regs, block in zip(cpus, blocks):
        assert regs["rip"] == int(re.search(r"RIP=([0-9a-f]+)", block).group(1), 16)
        assert regs["cr3"] == int(re.search(r"CR3=([0-9a-f]+)", block).group(1), 16)
        assert regs["r8"] == int(re.search(r"R8 =([0-9a-f]+)", block).group(1), 16)
        assert regs["efer"] == int(re.search(r"EFER=([0-9a-f]+)", block).group(1), 16)
        assert regs["gs_base"] == int(re.search(r"GS =\w+ ([0-9a-f]+)", block).group(1), 16)
        assert regs["cs"] == 0x10 and regs["ss"] == 0x18
        assert regs["cr0"] & 0x80000001 == 0x80000001  # paging + protected mode
        assert regs["efer"] & 0x500 == 0x500  # long mode active
        assert regs["rip"] >= 0xFFFF800000000000
    assert cpus[0]["rip"] == 0xFFFFFFFFC04E8FB9
    assert cpus[1]["cr3"] == 0x10032C000
    assert cpus[1]["halted"] == 1


def test_registers_fpu_block_ignored() -> None:
    text = (DATA / "hmp-info-registers-2cpu.txt").read_text()
    cpus = parse_registers(text)
    assert not any(k.startswith(("fpr", "xmm")) for k in cpus[0])


@pytest.mark.parametrize(
    "text, msg",
    [
        ("", "no 'CPU#n'"),
        ("CPU#0\nRAX=0000000000000000\n", "missing"),
        ("CPU#1\nRIP=0\n", "out of order"),
    ],
)
def test_registers_bad_input(text: str, msg: str) -> None:
    with pytest.raises(HmpParseError, match=msg):
        parse_registers(text)


def test_registers_oversize_rejected() -> None:
    with pytest.raises(HmpParseError, match="exceeds"):
        parse_registers("CPU#0\n" + "x" * (5 << 20))


def test_ram_layout_4g_split() -> None:
    text = (DATA / "hmp-info-mtree-f-4g.txt").read_text()
    blocks = parse_ram_layout(text, "pdram")
    assert blocks == [
        RamBlock(0, 0xC3000, 0),
        RamBlock(0xE8000, 0x8000, 0xE8000),
        RamBlock(0x100000, 2 * GiB - 0x100000, 0x100000),
        RamBlock(4 * GiB, 2 * GiB, 2 * GiB),
    ]
    assert sum(b.size for b in blocks) == 4 * GiB - (0x100000 - 0xC3000 - 0x8000)


def test_ram_layout_wrong_backend() -> None:
    text = (DATA / "hmp-info-mtree-f-4g.txt").read_text()
    with pytest.raises(HmpParseError, match="no RAM"):
        parse_ram_layout(text, "other")


def test_ram_layout_merges_contiguous_and_aligns() -> None:
    text = (
        "FlatView #0\n"
        ' AS "memory", root: system\n'
        " Root memory region: system\n"
        "  0000000000000000-0000000000000fff (prio 0, ram): mem\n"
        "  0000000000001000-0000000000001fff (prio 0, ram): mem @0000000000001000\n"
        "  0000000000002800-0000000000004fff (prio 0, ram): mem @0000000000002800\n"
        "  0000000000010000-000000000001ffff (prio 0, ram): mem @0000000000020000\n"
    )
    assert parse_ram_layout(text, "mem") == [
        RamBlock(0, 0x2000, 0),
        RamBlock(0x3000, 0x2000, 0x3000),
        RamBlock(0x10000, 0x10000, 0x20000),
    ]


def test_ram_layout_needs_memory_view() -> None:
    with pytest.raises(HmpParseError, match="no flat view"):
        parse_ram_layout('FlatView #0\n AS "I/O", root: io\n', "mem")
