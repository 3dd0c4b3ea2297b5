"""Kernel pages by what they hold: slab caches, page tables, stacks, vmalloc, modules, image, mem_map, per-CPU.

Why: on a fileserver nearly all memory is kernel memory (ZFS's ARC is slab
caches), so "kernel" as one layer is nearly the whole dump. A debugger needs
the kernel's *structures* (tasks, stacks, page tables, the slab and module
metadata, the log), not the bulk file data the caches hold. Everything here
comes from the frozen guest and what it publishes, no debug info:

* slab pages: ``PG_slab`` (VMCOREINFO) on the head page; the cache from the
  ``struct slab`` that overlays ``struct page`` (``slab.slab_cache``, BTF),
  checked against the kernel's ``slab_caches`` list (each cache's name from
  ``kmem_cache.name``); a pointer to no listed cache counts as an unknown
  cache. Tail pages take their head's cache.
* page tables: ``page_type`` (in ``_mapcount``) says ``PG_table``. The bit
  is not published; VMCOREINFO gives ``PG_buddy`` and ``PG_offline``
  (``PAGE_{BUDDY,OFFLINE}_MAPCOUNT_VALUE``), and from 4.20 to 6.8 the
  kernel allocates PG_buddy, PG_offline, PG_table as consecutive bits: the
  table bit is used only when the first two are consecutive, else no page
  is called a page table (noted).
* kernel stacks: every task's ``stack`` (the task list, as layer 1 walks it).
* vmalloc areas: the ``vmap_area_list``; each busy area's ``vm_struct``
  gives its pages (``pages``/``nr_pages``) and the caller that asked
  (``caller``, symbolized: the owner). Areas holding a module's core
  layout are MODULE.
* the kernel image: text, rodata, data, bss and brk (``_text``..``_etext``,
  ``__start_rodata``..``__end_rodata``, ``_sdata``..``_edata``,
  ``__bss_start``..``__bss_stop``, ``__brk_base``..``_end``) through the
  image mapping, marked last: the init sections and the gaps between
  sections are freed after boot and reused by everything above.
* ``mem_map``: the physical pages behind ``vmemmap`` for present pfns.
* per-CPU: the first chunk, ``pcpu_base_addr`` for ``pcpu_nr_units *
  pcpu_unit_size`` bytes (later chunks are vmalloc areas, owner
  ``pcpu_*``), marked after stacks and vmalloc areas: each unit's unused
  tail goes back to the page allocator, and stacks land there.

Work is vectorised (numpy over raw ``struct page`` bytes and over each
area's page array); every list walk is bounded and a broken piece becomes a
note and fewer pages of that kind (they stay KERNEL, OTHER: still kept).
"""

from __future__ import annotations

import time

from progdump.layers.base import KernelKind, KernelMap, PageClassMap
from progdump.layers.linux.btf import BtfError
from progdump.layers.linux.kernel import LinuxKernel
from progdump.layers.linux.modules import list_entries
from progdump.layers.linux.pages import PAGE_TYPE_BASE, PageFlags
from progdump.layers.linux.translate import FaultError
from progdump.snapshot import PAGE_SIZE, SnapshotError

__all__ = ["build_kernel_map", "table_bit", "MAX_CACHES", "MAX_VMAP_AREAS"]

MAX_CACHES = 8192
MAX_VMAP_AREAS = 1 << 20
MAX_CACHE_NAME = 64
PERCPU_MAX = 1 << 30
#: the parts of the kernel image the kernel keeps after boot (init text/data and the
#: alignment gaps between sections are freed to the page allocator)
IMAGE_SECTIONS = (
    ("_text", "_etext"),
    ("__start_rodata", "__end_rodata"),
    ("_sdata", "_edata"),
    ("__bss_start", "__bss_stop"),
    ("__brk_base", "_end"),
)


def table_bit(vi) -> int | None:  # type: ignore[no-untyped-def]
    """``PG_table``'s bit in ``page_type``, or None when the published values do not allow deriving it."""
    try:
        buddy = ~vi.number("PAGE_BUDDY_MAPCOUNT_VALUE") & 0x0FFFFFFF
        offline = ~vi.number("PAGE_OFFLINE_MAPCOUNT_VALUE") & 0x0FFFFFFF
    except Exception:
        return None
    if buddy and buddy & (buddy - 1) == 0 and offline == buddy << 1:
        return offline << 1
    return None


def read_slab_caches(k: LinuxKernel) -> tuple[dict[int, str], list[str]]:
    """``slab_caches`` list: kmem_cache address -> name (bounded)."""
    btf = k.btf
    head = k.syms.address("slab_caches")
    if head is None:
        return {}, ["no slab_caches symbol"]
    o_list, o_name = btf.offsetof("kmem_cache", "list"), btf.offsetof("kmem_cache", "name")
    entries, why = list_entries(k.mem, head, MAX_CACHES)
    notes = [f"slab cache list: {why}"] if why else []
    out: dict[int, str] = {}
    for e in entries:
        c = e - o_list
        try:
            name = k.mem.cstring(k.mem.u64(c + o_name), MAX_CACHE_NAME)
        except FaultError:
            name = ""
        out[c] = "".join(ch if ch.isprintable() else "?" for ch in name) or f"cache@{c:#x}"
    return out, notes


def _mark_range(np, kinds, base_pfn: int, pa: int, length: int, kind: KernelKind, only_other: bool = True) -> int:  # type: ignore[no-untyped-def]
    lo = max(pa // PAGE_SIZE - base_pfn, 0)
    hi = min(-(-(pa + length) // PAGE_SIZE) - base_pfn, len(kinds))
    if hi <= lo:
        return 0
    seg = kinds[lo:hi]
    if only_other:
        sel = seg == int(KernelKind.OTHER)
        seg[sel] = int(kind)
        return int(sel.sum())
    seg[:] = int(kind)
    return hi - lo


def _mark_va(np, k: LinuxKernel, kinds, base_pfn: int, va: int, length: int, kind: KernelKind) -> int:  # type: ignore[no-untyped-def]
    n = 0
    for _cva, pa, ln in k.mem.chunks(va, length):
        n += _mark_range(np, kinds, base_pfn, pa, ln, kind)
    return n


def build_kernel_map(
    k: LinuxKernel, pcm: PageClassMap, tasks_stacks: list[int] | None = None
) -> tuple[KernelMap, dict[str, float]]:
    """The kernel map over ``pcm``'s pfns, and timings (seconds). Raises only when nothing can be done."""
    import numpy as np  # noqa: PLC0415

    t0 = time.perf_counter()
    snap = k.snapshot
    pf = PageFlags(k.vi)
    notes: list[str] = []
    base_pfn, npages = pcm.base_pfn, len(pcm.classes)
    kinds = np.zeros(npages, dtype=np.uint8)
    cache_ids = np.zeros(npages, dtype=np.uint16)
    vb_sym = k.syms.address("vmemmap_base")
    if vb_sym is None:
        raise ValueError("no vmemmap_base symbol")
    vmemmap = k.mem.u64(vb_sym)
    # -- slab caches and struct-page kinds -------------------------------------------------
    caches: dict[int, str] = {}
    o_slab_cache = None
    try:
        caches, cn = read_slab_caches(k)
        notes += cn
        o_slab_cache = k.btf.offsetof("slab", "slab_cache")
        if o_slab_cache % 8 or o_slab_cache + 8 > pf.size:
            raise BtfError(f"slab.slab_cache at {o_slab_cache} outside struct page")
    except (BtfError, FaultError) as e:
        notes.append(f"slab caches unknown: {e}")
    cache_addrs = np.array(sorted(caches), dtype=np.uint64)
    names = [caches[int(a)] for a in cache_addrs]
    tbit = table_bit(k.vi)
    if tbit is None:
        notes.append("PG_table bit not derivable from VMCOREINFO: page tables stay OTHER")
    head_va = np.zeros(npages, dtype=np.uint64)
    memmap_pages = 0
    unknown_cache = 0
    for first, n in snap.pfn_runs():
        va = vmemmap + first * pf.size
        try:
            pieces = list(k.mem.chunks(va, n * pf.size))
        except FaultError:
            continue  # build_page_classes already noted it
        for cva, pa, ln in pieces:
            cnt = ln // pf.size
            i = first + (cva - va) // pf.size - base_pfn
            if i < 0 or i + cnt > npages:
                continue
            try:
                raw = snap.view_phys(pa, cnt * pf.size)
            except SnapshotError:
                continue
            memmap_pages += _mark_range(np, kinds, base_pfn, pa, ln, KernelKind.MEM_MAP, only_other=False)
            words = np.frombuffer(raw, dtype="<u8").reshape(-1, pf.size // 8)
            flags = words[:, pf.o_flags // 8]
            head = words[:, pf.o_head // 8]
            mc = np.frombuffer(raw, dtype="<u4").reshape(-1, pf.size // 4)[:, pf.o_mapcount // 4]
            seg = kinds[i : i + cnt]
            slab = ((flags >> np.uint64(pf.pg_slab)) & np.uint64(1)) != 0
            if tbit is not None:
                table = (mc & np.uint32(PAGE_TYPE_BASE | tbit)) == np.uint32(PAGE_TYPE_BASE)
                seg[table & ~slab & (seg == 0)] = int(KernelKind.PAGE_TABLE)
            seg[slab] = int(KernelKind.SLAB)
            if o_slab_cache is not None and len(cache_addrs):
                ptr = words[:, o_slab_cache // 8][slab]
                j = np.searchsorted(cache_addrs, ptr)
                jc = np.minimum(j, len(cache_addrs) - 1)
                known = cache_addrs[jc] == ptr
                ids = np.where(known, jc + 1, 0).astype(np.uint16)
                unknown_cache += int((~known).sum())
                cache_ids[i : i + cnt][slab] = ids
            head_va[i : i + cnt] = np.where((head & np.uint64(1)) != 0, head - np.uint64(1), np.uint64(0))
    t1 = time.perf_counter()
    # tail pages of a slab take their head's kind and cache
    tails = np.nonzero(head_va)[0]
    if tails.size:
        hp = ((head_va[tails] - np.uint64(vmemmap)) // np.uint64(pf.size)).astype(np.int64) - base_pfn
        ok = (hp >= 0) & (hp < npages)
        sel, hi = tails[ok], hp[ok]
        slab_head = kinds[hi] == int(KernelKind.SLAB)
        kinds[sel[slab_head]] = int(KernelKind.SLAB)
        cache_ids[sel[slab_head]] = cache_ids[hi[slab_head]]
    if unknown_cache:
        notes.append(f"{unknown_cache} slab pages point at no listed kmem_cache: cache unknown")
    t2 = time.perf_counter()
    # -- task stacks, modules, vmalloc areas --------------------------------------------------
    stack_n = 0
    for st in tasks_stacks or []:
        try:
            stack_n += _mark_va(np, k, kinds, base_pfn, st, 4 * PAGE_SIZE, KernelKind.STACK)
        except FaultError:
            pass
    owners: dict[str, int] = {}
    try:
        owners = _vmalloc(np, k, kinds, base_pfn, vmemmap, pf.size, notes)
    except (BtfError, FaultError, ValueError) as e:
        notes.append(f"vmalloc areas unknown: {e}")
    # -- per-CPU areas, after stacks and vmalloc areas ----------------------------------------
    # The embedding allocator gives each unit's unused tail back to the page allocator
    # (mm/percpu.c, pcpu_embed_first_chunk), so kernel stacks and vmalloc pages can sit inside
    # the first chunk's span; marking it first called those stacks per-CPU memory.
    try:
        base = k.mem.u64(_sym(k, "pcpu_base_addr"))
        unit = k.mem.s32(_sym(k, "pcpu_unit_size"))
        units = k.mem.s32(_sym(k, "pcpu_nr_units"))
        if not (0 < unit and 0 < units and unit * units <= PERCPU_MAX):
            raise ValueError(f"per-CPU first chunk {units} x {unit} bytes")
        _mark_va(np, k, kinds, base_pfn, base, unit * units, KernelKind.PERCPU)
    except (FaultError, ValueError) as e:
        notes.append(f"per-CPU areas unknown: {e}")
    # the kernel image last, section by section: its freed parts (init, alignment gaps) are
    # reused by the page allocator, and what reuses them was marked above
    image_n = 0
    for a_name, b_name in IMAGE_SECTIONS:
        a, b = k.syms.address(a_name), k.syms.address(b_name)
        if a is None or b is None or not 0 <= b - a <= 1 << 30:
            notes.append(f"kernel image section {a_name}..{b_name} unknown")
            continue
        ipa = k.mem.image_to_phys(a)
        if ipa is not None:
            image_n += _mark_range(np, kinds, base_pfn, ipa, b - a, KernelKind.IMAGE)
    t3 = time.perf_counter()
    km = KernelMap(
        base_pfn, bytearray(kinds.tobytes()), bytearray(cache_ids.astype("<u2").tobytes()), names, owners, notes
    )
    return km, {
        "struct_pages_s": t1 - t0,
        "ranges_s": t2 - t1,
        "vmalloc_s": t3 - t2,
        "total_s": t3 - t0,
        "memmap_pages": float(memmap_pages),
        "stack_pages": float(stack_n),
    }


def _sym(k: LinuxKernel, name: str) -> int:
    a = k.syms.address(name)
    if a is None:
        raise ValueError(f"no {name} symbol")
    return a


def _vmalloc(
    np, k: LinuxKernel, kinds, base_pfn: int, vmemmap: int, page_size: int, notes: list[str]
) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Mark every busy vmalloc area's pages VMALLOC (MODULE for modules); pages per owner."""
    btf = k.btf
    o = btf.offsetof
    o_list, o_start, o_end, o_vm = (
        o("vmap_area", "list"),
        o("vmap_area", "va_start"),
        o("vmap_area", "va_end"),
        o("vmap_area", "vm"),
    )
    o_pages, o_nr, o_caller = o("vm_struct", "pages"), o("vm_struct", "nr_pages"), o("vm_struct", "caller")
    mods = []
    try:
        mods = [(m.base, m.base + max(m.size, 1)) for m in k.load_modules()]
    except Exception as e:  # noqa: BLE001 - the module list is optional here
        notes.append(f"module ranges unknown: {type(e).__name__}: {e}")
    entries, why = list_entries(k.mem, _sym(k, "vmap_area_list"), MAX_VMAP_AREAS)
    if why:
        notes.append(f"vmalloc areas: {why}")
    owners: dict[str, int] = {}
    total = len(kinds)
    bad = 0
    for ent in entries:
        va = ent - o_list
        try:
            start, end, vm = k.mem.u64(va + o_start), k.mem.u64(va + o_end), k.mem.u64(va + o_vm)
            if not vm or not start < end:
                continue
            nr = k.mem.u32(vm + o_nr)
            if nr == 0:
                continue  # ioremap and friends: no pages of ours
            if nr > total or nr * PAGE_SIZE > end - start:
                bad += 1
                continue
            ptrs = np.frombuffer(k.mem.read(k.mem.u64(vm + o_pages), 8 * nr), dtype="<u8")
            caller = k.mem.u64(vm + o_caller)
        except FaultError:
            bad += 1
            continue
        is_module = any(start <= b < end for b, _ in mods)
        kind = KernelKind.MODULE if is_module else KernelKind.VMALLOC
        pfn = (ptrs - np.uint64(vmemmap)) // np.uint64(page_size)
        idx = pfn.astype(np.int64) - base_pfn
        idx = idx[(ptrs >= np.uint64(vmemmap)) & (idx >= 0) & (idx < total)]
        free = idx[kinds[idx] == int(KernelKind.OTHER)]
        kinds[free] = int(kind)
        hit = k.syms.lookup(caller) if caller else None
        owner = "module" if is_module else (hit[0].name if hit else f"{caller:#x}")
        owners[owner] = owners.get(owner, 0) + int(free.size)
    if bad:
        notes.append(f"{bad} vmalloc areas unreadable or inconsistent: their pages stay OTHER")
    return dict(sorted(((o, n) for o, n in owners.items() if n), key=lambda kv: -kv[1]))
