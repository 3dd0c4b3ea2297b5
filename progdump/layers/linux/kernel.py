"""One frozen Linux kernel: memory, symbols, types, unwinder tables.

Why a context object: every Linux layer needs the same few things (address
translation, kallsyms, BTF, ORC) and each is costly enough to build once.
The constructor does only what every layer needs and raises
:class:`LinuxUnsupported` with a reason when the snapshot is not a usable
Linux one; the rest (BTF, ORC, the log) is built on first use and failures
there are reported by the caller as degradations.
"""

from __future__ import annotations

import struct
from functools import cached_property

from progdump.errors import ProgdumpError
from progdump.layers.linux.btf import Btf, BtfError
from progdump.layers.linux.kallsyms import KallsymsError, SymbolTable, load_kallsyms
from progdump.layers.linux.translate import FaultError, KernelMemory
from progdump.layers.linux.unwind import MemoryBytes, OrcSet, OrcTable
from progdump.layers.linux.vmcoreinfo import Vmcoreinfo, VmcoreinfoMissing
from progdump.snapshot import Snapshot

__all__ = ["LinuxUnsupported", "LinuxKernel"]

MAX_ORC_ENTRIES = 4 << 20


class LinuxUnsupported(ProgdumpError):
    """This snapshot is not one the Linux producer can read; the message says why."""


class LinuxKernel:
    def __init__(self, snapshot: Snapshot) -> None:
        raw = snapshot.vmcoreinfo_raw
        if raw is None:
            raise LinuxUnsupported("no VMCOREINFO note")
        self.snapshot = snapshot
        self.vi = Vmcoreinfo(raw)
        self.notes: list[str] = []
        self.module_notes: list[str] = []
        self._modules: list | None = None
        vi = self.vi
        try:
            self.release = vi.osrelease()
            page_size = vi.number("PAGESIZE") if "NUMBER(PAGESIZE)" in vi else int(vi.text("PAGESIZE"))
            if page_size != 4096:
                raise LinuxUnsupported(f"PAGESIZE={vi.text('PAGESIZE')} (only 4096 is supported)")
            phys_base = vi.number("phys_base")
            levels = 5 if ("NUMBER(pgtable_l5_enabled)" in vi and vi.number("pgtable_l5_enabled")) else 4
            sme = vi.number("sme_mask") if "NUMBER(sme_mask)" in vi else 0
            top = vi.symbol("init_top_pgt") if "SYMBOL(init_top_pgt)" in vi else vi.symbol("swapper_pg_dir")
        except (VmcoreinfoMissing, ValueError) as e:
            raise LinuxUnsupported(f"VMCOREINFO unusable for x86-64 Linux: {e}") from None
        self.mem = KernelMemory(snapshot, phys_base, 0, levels, sme)
        pgd = self.mem.image_to_phys(top)
        if pgd is None or not snapshot.has_phys(pgd, 4096):
            raise LinuxUnsupported(f"top page table {top:#x} (phys {pgd}) not in the snapshot; phys_base wrong?")
        self.mem.pgd = pgd
        try:
            self.syms: SymbolTable = load_kallsyms(self.mem, vi)
        except (KallsymsError, FaultError, VmcoreinfoMissing) as e:
            raise LinuxUnsupported(f"no kernel symbols: {e}") from None
        # cross-check: kallsyms and VMCOREINFO must agree on a published symbol
        for name in ("_stext", "init_uts_ns"):
            a = self.syms.address(name)
            if f"SYMBOL({name})" in vi and a is not None and a != vi.symbol(name):
                raise LinuxUnsupported(f"kallsyms {name}={a:#x} disagrees with VMCOREINFO {vi.symbol(name):#x}")
        pob = self.syms.address("page_offset_base")
        try:
            if pob is None:
                raise FaultError("no page_offset_base symbol")
            self.mem.page_offset_base = self.mem.u64(pob)
        except FaultError as e:
            self.notes.append(f"direct map base unknown ({e}); using page-table walks")

    # -- lazily built -----------------------------------------------------------
    @cached_property
    def btf(self) -> Btf:
        a, b = self.syms.address("__start_BTF"), self.syms.address("__stop_BTF")
        if a is None or b is None or not 0 < b - a <= 64 << 20:
            raise BtfError("kernel has no in-memory BTF (__start_BTF/__stop_BTF not in kallsyms)")
        try:
            return Btf(self.mem.read(a, b - a))
        except FaultError as e:
            raise BtfError(f"BTF unreadable: {e}") from None

    @cached_property
    def orc(self) -> OrcSet:
        """vmlinux's ORC table; :meth:`load_modules` adds the modules' tables."""
        return OrcSet(self._vmlinux_orc())

    def load_modules(self) -> list:
        """Read the module list once; add module symbols and ORC tables (failures noted)."""
        if self._modules is not None:
            return self._modules
        from progdump.layers.linux.modules import module_orc, module_symbols, read_modules  # noqa: PLC0415

        self._modules = []
        try:
            mods, notes = read_modules(self)
        except Exception as e:
            self.module_notes.append(f"module list unavailable: {type(e).__name__}: {e}")
            return self._modules
        self.module_notes += notes
        self._modules = mods
        try:
            orc: OrcSet | None = self.orc
        except Exception:
            orc = None
        found = []
        for m in mods:
            try:
                found.append((m.name, module_symbols(self, m), m.base, m.size, m.text_size))
            except Exception as e:
                self.module_notes.append(f"module {m.name}: symbols unreadable: {type(e).__name__}: {e}")
            if orc is not None:
                try:
                    t = module_orc(self, m)
                    if t is not None:
                        orc.add(m.base, m.base + (m.text_size or m.size), t)
                except Exception as e:
                    self.module_notes.append(f"module {m.name}: ORC unreadable: {type(e).__name__}: {e}")
        self.syms.add_modules(found)
        return self._modules

    def _vmlinux_orc(self) -> OrcTable:
        s = self.syms
        a, b, e = (s.address(n) for n in ("__start_orc_unwind_ip", "__stop_orc_unwind_ip", "__start_orc_unwind"))
        if a is None or b is None or e is None or not 0 < b - a <= 4 * MAX_ORC_ENTRIES:
            raise ValueError("no ORC tables in kallsyms (kernel built without UNWINDER_ORC?)")
        try:
            layout = [(m.name, m.bit_offset, m.bitfield_size) for m in self.btf.members(self.btf.find("orc_entry"))]
            want = [("sp_offset", 0, 0), ("bp_offset", 16, 0), ("sp_reg", 32, 4), ("bp_reg", 36, 4), ("type", 40, 2)]
            if layout[:5] != want:
                raise ValueError(f"struct orc_entry layout {layout} is not the one this unwinder knows")
        except BtfError:
            pass  # no BTF: trust the 6.1 layout, the unwinder sanity-checks each step
        n = (b - a) // 4
        ips = self.mem.read(a, 4 * n)
        if not self.mem.readable(e, 6 * n):
            self.mem.read(e, 6 * n)  # raises, saying where
        return OrcTable(a, ips, MemoryBytes(self.mem, e, 6 * n))  # entries are read as the unwinder asks

    def percpu_offset(self, cpu: int) -> int:
        a = self.syms.address("__per_cpu_offset")
        if a is None:
            raise FaultError("no __per_cpu_offset symbol")
        return self.mem.u64(a + 8 * cpu)

    def uts(self) -> dict[str, str]:
        """``init_uts_ns.name`` fields (struct new_utsname: 6 x 65 bytes)."""
        base = self.vi.symbol("init_uts_ns") + (
            self.vi.offset("uts_namespace.name") if "OFFSET(uts_namespace.name)" in self.vi else 4
        )
        raw = self.mem.read(base, 65 * 6)
        keys = ("sysname", "nodename", "release", "version", "machine", "domainname")
        return {k: raw[65 * i : 65 * (i + 1)].split(b"\0")[0].decode("utf-8", "replace") for i, k in enumerate(keys)}

    def u64s(self, va: int, n: int) -> tuple[int, ...]:
        return struct.unpack(f"<{n}Q", self.mem.read(va, 8 * n))
