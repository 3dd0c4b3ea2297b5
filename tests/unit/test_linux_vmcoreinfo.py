"""VMCOREINFO typed access, and the Linux producer refusing snapshots it cannot read."""

from __future__ import annotations

import pytest
from test_linux_image import Image

from progdump.layers import select_producer
from progdump.layers.linux import LinuxProducer, LinuxUnsupported
from progdump.layers.linux.vmcoreinfo import Vmcoreinfo, VmcoreinfoMissing
from progdump.snapshot import Note

VI = b"""OSRELEASE=6.1.0-56-cloud-amd64
PAGESIZE=4096
SYMBOL(init_top_pgt)=ffffffff9fa10000
OFFSET(page.flags)=0
SIZE(page)=64
LENGTH(zone.free_area)=11
NUMBER(phys_base)=-69206016
NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)=-129
KERNELOFFSET=1d000000
SYMBOL(bad)=xyz
OFFSET(huge.member)=99999999999
"""


def test_typed_getters() -> None:
    v = Vmcoreinfo(VI)
    assert v.symbol("init_top_pgt") == 0xFFFFFFFF9FA10000
    assert v.number("phys_base") == -69206016
    assert v.size("page") == 64 and v.offset("page.flags") == 0 and v.length("zone.free_area") == 11
    assert v.kerneloffset() == 0x1D000000
    assert v.osrelease() == "6.1.0-56-cloud-amd64"


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda v: v.symbol("prb"), "SYMBOL(prb)"),
        (lambda v: v.symbol("bad"), "SYMBOL(bad)"),
        (lambda v: v.offset("huge.member"), "OFFSET(huge.member)"),
        (lambda v: v.size("nothere"), "SIZE(nothere)"),
    ],
)
def test_missing_or_malformed_fields_are_named(call, field) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(VmcoreinfoMissing, match=field.replace("(", r"\(").replace(")", r"\)")):
        call(Vmcoreinfo(VI))


def snapshot_with(vi: bytes | None):  # type: ignore[no-untyped-def]
    img = Image()
    notes = [Note("VMCOREINFO", 0, vi)] if vi is not None else []
    return img.snapshot(notes=notes)


@pytest.mark.parametrize(
    "vi, reason",
    [
        (None, "no VMCOREINFO"),
        (VI.replace(b"PAGESIZE=4096", b"PAGESIZE=65536"), "PAGESIZE"),
        (VI.replace(b"PAGESIZE=4096", b"NUMBER(PAGESIZE)=65536"), "PAGESIZE"),
        (VI.replace(b"PAGESIZE=4096", b"NUMBER(PAGESIZE)=4096"), "top page table"),  # 4096 accepted: refused later
        (VI.replace(b"NUMBER(phys_base)=-69206016", b"NUMBER(phys_base)=junk"), "phys_base"),
        (VI, "top page table"),  # init_top_pgt lands outside this 16 MiB image
        (VI.replace(b"NUMBER(phys_base)=-69206016", b"NUMBER(phys_base)=-530579456"), "kallsyms"),
    ],
)
def test_producer_refuses_with_reason(vi: bytes | None, reason: str) -> None:
    snap = snapshot_with(vi)
    with pytest.raises(LinuxUnsupported, match=reason):
        LinuxProducer(snap)
    if vi is not None:
        p = select_producer(snap)
        assert p.name == "generic" and reason in p.degraded[0]
