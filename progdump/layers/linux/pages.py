"""Page classes from ``mem_map`` (vmemmap) and page flags, as makedumpfile does.

Why: layers 2-4 split memory the way makedumpfile's dump levels do, so layer
2 alone opens in a debugger. Everything comes from the frozen kernel: the
``struct page`` array at ``vmemmap_base`` (SPARSEMEM_VMEMMAP, x86-64),
``SIZE(page)``/``OFFSET(page.*)`` and the page-flag numbers in VMCOREINFO.

Classification of one page (head pages; tail pages of compound pages take
their head's class, as makedumpfile treats a compound page as one unit):

* FREE: a buddy block head (``page_type`` in ``_mapcount`` says PG_buddy,
  from ``PAGE_BUDDY_MAPCOUNT_VALUE``) and the ``2^order`` pages it covers
  (``order`` in ``private``);
* USER: ``mapping & PAGE_MAPPING_ANON`` (anonymous and KSM pages);
* CACHE: not slab, not anon, and on an LRU list or with a plain (untagged)
  ``mapping``: page cache, ramfs/tmpfs, buffer pages;
* KERNEL: everything else with a readable ``struct page``; UNKNOWN where the
  ``struct page`` is not in the snapshot (kept in layer 2: keep when unsure).

No page is classed ZERO (makedumpfile's ``-d 1``): an all-zero kernel page
stays KERNEL, in layer 2, where the writer stores it as a zero marker at no
cost. Taking it out of layer 2 would punch holes in kernel structures that
tools read wholesale (makedumpfile reads the whole printk descriptor array,
mostly zero on a young system, and fails on a hole).

Work is vectorised with numpy over the raw ``struct page`` bytes (one view
per physically contiguous piece of vmemmap), never a Python loop per page.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from progdump.layers.base import PageClass, PageClassMap
from progdump.layers.linux.kernel import LinuxKernel
from progdump.layers.linux.translate import FaultError
from progdump.snapshot import PAGE_SIZE, SnapshotError

__all__ = ["PageFlags", "classify_struct_pages", "build_page_classes", "vmemmap_from_mem_section", "raw_page_classes"]

PAGE_MAPPING_ANON = 1
PAGE_MAPPING_MOVABLE = 2
PAGE_TYPE_BASE = 0xF0000000
SLICE_PAGES = 32768  # struct pages classified at once: 2 MiB of them, ~10 MiB of numpy temporaries
COVER_WINDOW = 1 << 18  # pages per window when marking free blocks (2 MiB of int64 running counts)


class PageFlags:
    """Bit numbers and offsets from VMCOREINFO (raises VmcoreinfoMissing)."""

    def __init__(self, vi) -> None:  # type: ignore[no-untyped-def]
        self.size = vi.size("page")
        self.o_flags = vi.offset("page.flags")
        self.o_mapping = vi.offset("page.mapping")
        self.o_mapcount = vi.offset("page._mapcount")
        self.o_private = vi.offset("page.private")
        self.o_head = vi.offset("page.compound_head")
        self.pg_lru = vi.number("PG_lru")
        self.pg_slab = vi.number("PG_slab")
        self.buddy_value = vi.number("PAGE_BUDDY_MAPCOUNT_VALUE") & 0xFFFFFFFF
        self.max_order = vi.length("zone.free_area") - 1 if "LENGTH(zone.free_area)" in vi else 10
        for o in (self.o_flags, self.o_mapping, self.o_private, self.o_head):
            if o % 8 or o + 8 > self.size:
                raise ValueError(f"struct page offset {o} unusable (size {self.size})")
        if self.o_mapcount % 4 or self.o_mapcount + 4 > self.size or self.size % 8:
            raise ValueError("struct page _mapcount offset/size unusable")
        # page_type bit that marks buddy pages (cleared in the value)
        self.buddy_bit = ~self.buddy_value & 0x0FFFFFFF


def classify_struct_pages(np, raw, pf: PageFlags):  # type: ignore[no-untyped-def]
    """Classes (uint8 array) and tail-page head indices for ``n`` raw ``struct page``s.

    Pure over bytes: unit tests hand it arrays built from the documented
    layout. Returns ``(cls, buddy_order, head_va)`` where ``buddy_order`` is
    -1 except on buddy heads and ``head_va`` is 0 except on tail pages.
    """
    words = np.frombuffer(raw, dtype="<u8").reshape(-1, pf.size // 8)
    flags = words[:, pf.o_flags // 8]
    mapping = words[:, pf.o_mapping // 8]
    private = words[:, pf.o_private // 8]
    head = words[:, pf.o_head // 8]
    mc = np.frombuffer(raw, dtype="<u4").reshape(-1, pf.size // 4)[:, pf.o_mapcount // 4]
    n = words.shape[0]
    cls = np.full(n, int(PageClass.KERNEL), dtype=np.uint8)
    slab = (flags >> np.uint64(pf.pg_slab)) & np.uint64(1)
    lru = (flags >> np.uint64(pf.pg_lru)) & np.uint64(1)
    low = mapping & np.uint64(3)
    anon = (low & np.uint64(PAGE_MAPPING_ANON)) != 0
    plain_mapping = (mapping != 0) & (low == 0)
    cache = (slab == 0) & ~anon & ((lru != 0) | plain_mapping)
    cls[cache] = int(PageClass.CACHE)
    cls[anon & (slab == 0)] = int(PageClass.USER)
    buddy = (mc & np.uint32(PAGE_TYPE_BASE | pf.buddy_bit)) == np.uint32(PAGE_TYPE_BASE)
    order = np.where(buddy & (private <= np.uint64(pf.max_order)), private, np.uint64(0)).astype(np.int64)
    order[~buddy] = -1
    cls[buddy] = int(PageClass.FREE)
    is_tail = (head & np.uint64(1)) != 0
    head_va = np.where(is_tail, head - np.uint64(1), np.uint64(0))
    return cls, order, head_va


MAX_SECTION_ROOTS = 1 << 16  # LENGTH(mem_section) is NR_SECTION_ROOTS: 2048 for 46 physical address bits
SECTION_HAS_MEM_MAP = 2
MAX_SECTIONS_CHECKED = 64


def vmemmap_from_mem_section(mem, vi) -> int:  # type: ignore[no-untyped-def]
    """``vmemmap_base`` from VMCOREINFO's ``mem_section`` (SPARSEMEM_EXTREME), without kallsyms.

    Why: a plan that writes the kernel pages right after a raw layer 0 would
    otherwise load kallsyms (30-300 ms) for one symbol. Each present section's
    ``section_mem_map`` holds ``sparse_encode_mem_map(mem_map, nr)``, that is
    ``mem_map - section_nr_to_pfn(nr)`` with flag bits in its low bits (at most
    ``SECTION_MAP_LAST_BIT`` = 6 of them); under SPARSEMEM_VMEMMAP ``mem_map``
    is ``vmemmap + start pfn``, so every section decodes to ``vmemmap`` itself
    (page aligned: the low 12 bits are cleared). makedumpfile reads the same
    table to find ``mem_map`` without a vmlinux. The sections checked must all
    agree and the value must be a kernel address, else ValueError says why.
    """
    root = vi.symbol("mem_section")
    nroots = vi.length("mem_section")
    ssize = vi.size("mem_section")
    off = vi.offset("mem_section.section_mem_map")
    if not 0 < nroots <= MAX_SECTION_ROOTS or not 8 <= ssize <= PAGE_SIZE or off % 8 or off + 8 > ssize:
        raise ValueError(f"mem_section layout unusable (LENGTH {nroots}, SIZE {ssize}, OFFSET {off})")
    per_root = PAGE_SIZE // ssize
    roots = mem.read(root, 8 * nroots)
    found: set[int] = set()
    seen = 0
    for r in range(nroots):
        ptr = int.from_bytes(roots[8 * r : 8 * r + 8], "little")
        if not ptr:
            continue
        table = mem.read(ptr, per_root * ssize)
        for i in range(per_root):
            smm = int.from_bytes(table[i * ssize + off : i * ssize + off + 8], "little")
            if smm & SECTION_HAS_MEM_MAP:
                found.add(smm & ~(PAGE_SIZE - 1))
                seen += 1
                if seen >= MAX_SECTIONS_CHECKED:
                    break
        if seen >= MAX_SECTIONS_CHECKED:
            break
    if not found:
        raise ValueError("no present section with a mem_map in mem_section")
    if len(found) > 1:
        raise ValueError(f"mem_section sections disagree on vmemmap ({', '.join(hex(v) for v in sorted(found)[:4])})")
    vmemmap = found.pop()
    if vmemmap < 0xFFFF800000000000:
        raise ValueError(f"mem_section decodes to {vmemmap:#x}, not a kernel address (not SPARSEMEM_VMEMMAP?)")
    return vmemmap


@dataclass
class _MinimalKernel:
    """What :func:`build_page_classes` reads: the snapshot, VMCOREINFO, kernel memory."""

    snapshot: object
    vi: object
    mem: object


def raw_page_classes(snapshot) -> tuple[PageClassMap, list[str]]:  # type: ignore[no-untyped-def]
    """Page classes from VMCOREINFO alone (page tables, ``mem_section``, ``mem_map``): no kallsyms.

    The Linux registry entry offers it so a plan can write the kernel pages
    before any producer is chosen (plan ``raw-kernel``, issue 13). Raises
    (ValueError, FaultError, ...) when the snapshot lacks something; the
    caller then classifies through the full producer.
    """
    from progdump.layers.linux.rawpanic import minimal_memory  # noqa: PLC0415

    mem, vi = minimal_memory(snapshot)
    vmemmap = vmemmap_from_mem_section(mem, vi)
    pcm, notes, _ = build_page_classes(_MinimalKernel(snapshot, vi, mem), vmemmap)  # type: ignore[arg-type]
    return pcm, ["page classes from VMCOREINFO's mem_section (no kallsyms)", *notes]


def build_page_classes(k: LinuxKernel, vmemmap: int | None = None) -> tuple[PageClassMap, list[str], dict[str, float]]:
    """The map over every pfn in the snapshot, notes, and timings (seconds).

    ``vmemmap``: the base of the ``struct page`` array when already known (else
    read from the ``vmemmap_base`` symbol through ``k.syms``).
    """
    import numpy as np  # noqa: PLC0415 (optional dependency: the caller degrades without it)

    t0 = time.perf_counter()
    snap = k.snapshot
    pf = PageFlags(k.vi)
    notes: list[str] = []
    if vmemmap is None:
        vb_sym = k.syms.address("vmemmap_base")
        if vb_sym is None:
            raise ValueError("no vmemmap_base symbol (kernel without SPARSEMEM_VMEMMAP?)")
        vmemmap = k.mem.u64(vb_sym)
    if not runs_ok(snap):
        raise ValueError("snapshot has no memory")
    base_pfn = snap.ranges[0].phys_start // PAGE_SIZE
    end_pfn = snap.ranges[-1].phys_end // PAGE_SIZE
    npages = end_pfn - base_pfn
    cls = np.full(npages, int(PageClass.UNKNOWN), dtype=np.uint8)
    # Buddy heads and tail pages are kept sparse (per slice, only where they are), never as a
    # per-page array: 1 byte a page (the classes) is all that grows with the guest's RAM (issue 13).
    buddy_idx: list = []  # indices of buddy heads with order > 0, and their orders
    buddy_ord: list = []
    tail_start: list = []  # runs of tail pages sharing one head: first index, length, head index
    tail_len: list = []  # (-1 as head: outside memory)
    tail_head: list = []
    missing = 0
    t_read = 0.0
    vm = np.uint64(vmemmap)
    psize = np.uint64(pf.size)
    for first, n in snap.pfn_runs():
        va = vmemmap + first * pf.size
        pfn = first
        try:
            pieces = list(k.mem.chunks(va, n * pf.size))
        except FaultError as e:
            missing += n
            notes.append(f"struct pages of pfn {first:#x}+{n}: {e}")
            continue
        for cva, pa, ln in pieces:
            cnt = ln // pf.size
            pfn = first + (cva - va) // pf.size
            # in slices, each slice's struct pages dropped from the mapping once classified: the
            # temporaries and the resident mapping stay bounded whatever the guest's RAM (R-WR-4)
            for s0 in range(0, cnt, SLICE_PAGES):
                m = min(SLICE_PAGES, cnt - s0)
                try:
                    t = time.perf_counter()
                    raw = snap.view_phys(pa + s0 * pf.size, m * pf.size)
                    t_read += time.perf_counter() - t
                except SnapshotError:
                    missing += m
                    continue
                c, o, h = classify_struct_pages(np, raw, pf)
                i = pfn - base_pfn + s0
                cls[i : i + m] = c
                b = np.nonzero(o > 0)[0]
                if b.size:
                    buddy_idx.append(b + i)
                    buddy_ord.append(o[b].astype(np.int8))
                tl = np.nonzero(h)[0]
                if tl.size:
                    hv = h[tl]
                    hp = (hv - vm) // psize  # wraps to a huge value below vmemmap: refused below
                    ok = (hv >= vm) & (hp < np.uint64(end_pfn)) & (hp >= np.uint64(base_pfn))
                    gi = tl.astype(np.int64) + i
                    hidx = np.where(ok, hp.astype(np.int64) - base_pfn, -1)
                    # one entry per run of consecutive tails with one head (a compound page)
                    brk = np.flatnonzero((np.diff(gi) != 1) | (np.diff(hidx) != 0)) + 1
                    starts = np.concatenate(([0], brk))
                    tail_start.append(gi[starts])
                    tail_len.append(np.diff(np.concatenate((starts, [gi.size]))))
                    tail_head.append(hidx[starts])
                del c, o, h, raw
                snap.release_phys(pa + s0 * pf.size, m * pf.size)
    t1 = time.perf_counter()
    # buddy blocks: mark the 2^order pages after each head free (a running count of open blocks,
    # summed window by window so no per-page temporary wider than a byte is ever whole)
    if buddy_idx:
        heads = np.concatenate(buddy_idx)
        ends = np.minimum(heads + (np.int64(1) << np.concatenate(buddy_ord).astype(np.int64)), npages)
        span = np.zeros(npages + 1, dtype=np.int8)  # |value| <= 12: one head, at most 11 ends (orders)
        np.add.at(span, heads, 1)
        np.add.at(span, ends, -1)
        carry = 0
        for w in range(0, npages, COVER_WINDOW):
            open_blocks = np.cumsum(span[w : min(w + COVER_WINDOW, npages)], dtype=np.int64) + carry
            cls[w : w + COVER_WINDOW][open_blocks > 0] = int(PageClass.FREE)
            carry = int(open_blocks[-1])
        del span, heads, ends
    # tail pages take their head's class (the heads' classes read once, before any tail changes)
    if tail_start:
        rs = np.concatenate(tail_start)
        rl = np.concatenate(tail_len)
        rh = np.concatenate(tail_head)
        bad = rh < 0
        if bad.any():
            notes.append(f"{int(rl[bad].sum())} tail pages point at heads outside memory: left as they were")
            rs, rl, rh = rs[~bad], rl[~bad], rh[~bad]
        if rs.size > 1 and (np.diff(rs) < 0).any():  # slices came out of pfn order: sort the runs
            o = np.argsort(rs, kind="stable")
            rs, rl, rh = rs[o], rl[o], rh[o]
        head_cls = cls[rh]
        ends = rs + rl
        for w in range(0, npages, COVER_WINDOW):
            we = min(w + COVER_WINDOW, npages)
            r0 = int(np.searchsorted(ends, w, side="right"))
            r1 = int(np.searchsorted(rs, we, side="left"))
            if r0 >= r1:
                continue
            a = np.maximum(rs[r0:r1], w)
            cnt = np.minimum(ends[r0:r1], we) - a
            first = np.cumsum(cnt) - cnt
            idx = np.repeat(a - first, cnt) + np.arange(int(cnt.sum()), dtype=np.int64)
            inherit = np.repeat(head_cls[r0:r1], cnt)
            # a tail inside a free block stays free; otherwise it takes the head's class
            change = cls[idx] != int(PageClass.FREE)
            cls[idx[change]] = inherit[change]
    t2 = time.perf_counter()
    t3 = time.perf_counter()
    if missing:
        notes.append(f"{missing} pages have no readable struct page: UNKNOWN (kept in the kernel layer)")
    pcm = PageClassMap(base_pfn, 0)
    pcm.classes = bytearray(cls)  # one copy (tobytes() would make two)
    del cls
    timings = {"struct_pages_s": t1 - t0, "buddy_tail_s": t2 - t1, "total_s": t3 - t0, "pages": float(npages)}
    return pcm, notes, timings


def runs_ok(snap) -> bool:  # type: ignore[no-untyped-def]
    return bool(snap.ranges)
