"""Typed access to VMCOREINFO, the kernel's own description of itself.

Why: VMCOREINFO is the only debug information a real dump path has. The
kernel publishes symbol addresses (``SYMBOL(x)``), structure sizes
(``SIZE(x)``), member offsets (``OFFSET(x.y)``), array lengths
(``LENGTH(x)``) and constants (``NUMBER(x)``) as text. The note is untrusted
input: every lookup either returns a well-formed integer or raises
:class:`VmcoreinfoMissing` naming the field, so a caller can degrade with a
stated reason.
"""

from __future__ import annotations

from progdump.errors import ProgdumpError
from progdump.snapshot import parse_vmcoreinfo

__all__ = ["Vmcoreinfo", "VmcoreinfoMissing"]

_U64 = (1 << 64) - 1


class VmcoreinfoMissing(ProgdumpError):
    """A VMCOREINFO field is absent or malformed; the message names it."""


class Vmcoreinfo:
    """Parsed ``KEY=VALUE`` lines with typed getters.

    ``SYMBOL`` values and ``KERNELOFFSET`` are hexadecimal (no ``0x``), the
    others decimal and possibly negative (``NUMBER(phys_base)=-69206016``),
    exactly as ``kernel/crash_core.c`` prints them.
    """

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.fields = parse_vmcoreinfo(raw)

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def text(self, key: str) -> str:
        try:
            return self.fields[key]
        except KeyError:
            raise VmcoreinfoMissing(f"VMCOREINFO has no {key}") from None

    def _int(self, key: str, base: int) -> int:
        v = self.text(key).strip()
        if not v or len(v) > 24:
            raise VmcoreinfoMissing(f"VMCOREINFO {key}={v!r} is not a number")
        try:
            return int(v, base)
        except ValueError:
            raise VmcoreinfoMissing(f"VMCOREINFO {key}={v!r} is not a number") from None

    def symbol(self, name: str) -> int:
        """``SYMBOL(name)``: a kernel virtual address."""
        v = self._int(f"SYMBOL({name})", 16)
        if not 0 <= v <= _U64:
            raise VmcoreinfoMissing(f"VMCOREINFO SYMBOL({name}) out of range")
        return v

    def offset(self, member: str) -> int:
        v = self._int(f"OFFSET({member})", 10)
        if not 0 <= v < 1 << 24:
            raise VmcoreinfoMissing(f"VMCOREINFO OFFSET({member})={v} out of range")
        return v

    def size(self, type_: str) -> int:
        v = self._int(f"SIZE({type_})", 10)
        if not 0 < v < 1 << 24:
            raise VmcoreinfoMissing(f"VMCOREINFO SIZE({type_})={v} out of range")
        return v

    def length(self, name: str) -> int:
        v = self._int(f"LENGTH({name})", 10)
        if not 0 < v < 1 << 32:
            raise VmcoreinfoMissing(f"VMCOREINFO LENGTH({name})={v} out of range")
        return v

    def number(self, name: str) -> int:
        return self._int(f"NUMBER({name})", 10)

    def kerneloffset(self) -> int:
        """KASLR slide of the kernel text (0 when the kernel prints none)."""
        if "KERNELOFFSET" not in self.fields:
            return 0
        return self._int("KERNELOFFSET", 16)

    def osrelease(self) -> str:
        return self.text("OSRELEASE")[:64]
