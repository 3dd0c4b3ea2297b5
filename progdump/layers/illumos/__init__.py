"""The illumos producer: layers 0 and 1 of an illumos (OmniOS) guest.

It accepts a snapshot that carries an illumos manifest note
(:mod:`progdump.layers.illumos.manifest`, gathered over SSH before the panic).
What each layer holds, and from where:

* layer 0 (``panic``): the console report (panic CPU, thread, message, trap,
  frames as printed: :mod:`.console`), ``panicbuf`` decoded (message and the
  registers ``panic_saveregs`` recorded: :mod:`.panicbuf`) and raw, the
  message log from ``log_recentq`` (:mod:`.msglog`), ``panic_thread``, the
  manifest itself. Kernel virtual addresses are translated by an x86-64
  page-table walk from the panicking CPU's CR3 (illumos maps the kernel in
  every address space; it has no KASLR, but nothing here assumes that).
* layer 1 (``tasks``): the thread list from ``allthreads`` with pids and
  command names, and every thread's kernel stack pages.
* memory layers: **no page classes** (kernel/cache/user/free would need the
  illumos page_t and vnode walk, not done): every page goes to the last
  layer in physical order, and the layer notes say so.

Never raises on a strange snapshot: what cannot be read is a note.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from progdump.layers.base import Artifact, LayerContent, Producer
from progdump.layers.illumos.console import parse_illumos
from progdump.layers.illumos.manifest import Manifest, ManifestError, manifest_from_snapshot
from progdump.layers.illumos.msglog import LogOffsets, format_log, read_recent_log
from progdump.layers.illumos.panicbuf import PANICBUFSIZE, PanicbufError, decode_panicbuf
from progdump.layers.illumos.threads import walk_threads

if TYPE_CHECKING:
    from progdump.layers.linux.translate import KernelMemory
from progdump.layers.registry import ProducerEntry, register_producer
from progdump.snapshot import Snapshot

__all__ = ["IllumosProducer", "accepts"]

MAX_STACK_PAGES = 16  # per thread, in layer 1


def accepts(snapshot: Snapshot) -> str | None:
    """None when the snapshot carries a readable illumos manifest note, else why not."""
    try:
        m = manifest_from_snapshot(snapshot)
    except ManifestError as e:
        return f"illumos manifest unreadable: {e}"
    return None if m is not None else "no illumos manifest note"


class IllumosProducer(Producer):
    name = "illumos"

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__(snapshot)
        m = manifest_from_snapshot(snapshot)
        if m is None:
            raise ManifestError("no illumos manifest note")
        self.m: Manifest = m
        self.report = parse_illumos(snapshot.console_tail)
        self.mem: KernelMemory | None = None
        self.mem_cpu: int | None = None
        self._init_memory()

    def _init_memory(self) -> None:
        from progdump.layers.linux.translate import KernelMemory  # noqa: PLC0415 - the x86-64 walk is OS-neutral

        cpus = sorted(self.snapshot.cpus, key=lambda c: (c.index != self.report.panic_cpu, c.index))
        for c in cpus:
            cr3 = c.regs.get("cr3")
            if cr3:
                self.mem = KernelMemory(
                    self.snapshot, phys_base=0, pgd=cr3 & 0x000FFFFFFFFFF000, levels=4, image_size=0
                )
                self.mem_cpu = c.index
                return
        self.degraded.append("no CPU with CR3 in the snapshot: kernel memory not readable (console only)")

    def _read(self, va: int, n: int) -> bytes:
        if self.mem is None:
            raise ValueError("kernel memory not readable")
        return self.mem.read(va, n)

    def _sym(self, name: str) -> int:
        if name not in self.m.symbols:
            raise KeyError(f"manifest has no symbol {name}")
        return self.m.symbols[name]

    # -- layer 0 --------------------------------------------------------------------
    def panic(self) -> LayerContent:
        t0 = time.perf_counter()
        notes: list[str] = []
        d: dict = {
            "producer": "illumos",
            "console": self.report.full(),
            "release": self.m.release,
            "translation_cpu": self.mem_cpu,
        }
        raw = b""
        try:
            raw = self._read(self._sym("panicbuf"), PANICBUFSIZE)
            pd = decode_panicbuf(raw)
            d["panicbuf"] = {
                "version": pd.version,
                "uuid": pd.uuid,
                "message": pd.message,
                "registers": {k: f"{v:#x}" for k, v in pd.registers},
            }
        except (KeyError, ValueError, PanicbufError, Exception) as e:  # noqa: BLE001
            notes.append(f"panicbuf: {type(e).__name__}: {e}")
            d["panicbuf"] = None
        try:
            d["panic_thread"] = f"{int.from_bytes(self._read(self._sym('panic_thread'), 8), 'little'):#x}"
        except Exception as e:  # noqa: BLE001
            notes.append(f"panic_thread: {e}")
        msgs: list = []
        try:
            off, defaulted = LogOffsets.from_manifest(self.m.offsets)
            if defaulted:
                notes.append("message log: header offsets used for " + ", ".join(defaulted))
            msgs, lnotes = read_recent_log(self._read, self._sym("log_recentq"), off)
            notes += [f"message log: {n}" for n in lnotes]
        except Exception as e:  # noqa: BLE001
            notes.append(f"message log: {e}")
        msg = (d.get("panicbuf") or {}).get("message") or self.report.message
        d["panic_message"] = msg
        d["panic_message_source"] = (
            "panicbuf" if (d.get("panicbuf") or {}).get("message") else "the console" if self.report.message else None
        )
        d["log_messages"] = len(msgs)
        text = _render_panic(d, msgs)
        arts = [
            Artifact("panic.txt", text.encode()),
            Artifact("panic.json", json.dumps(d, indent=1, sort_keys=True, default=str).encode()),
            Artifact("msgbuf.txt", format_log(msgs).encode()),
            Artifact("illumos-manifest.json", json.dumps(self.m.to_json(), indent=1).encode()),
        ]
        if raw:
            arts.append(Artifact("panicbuf.bin", raw))
        d["seconds"] = time.perf_counter() - t0
        for n in notes:
            if n not in self.degraded:
                self.degraded.append(n)
        return LayerContent(
            artifacts=arts,
            notes=["memory: no page classes for illumos; all pages in the last layer, in physical order"],
        )

    # -- layer 1 --------------------------------------------------------------------
    def tasks(self) -> LayerContent:
        try:
            threads, notes = walk_threads(self._read, self._sym("allthreads"), self.m.offsets)
        except Exception as e:  # noqa: BLE001
            return LayerContent(notes=[f"thread list: {e}"])
        rows = [
            {
                "addr": f"{t.addr:#x}",
                "tid": t.tid,
                "state": t.state,
                "pri": t.pri,
                "pid": t.pid,
                "comm": t.comm,
                "stack": [f"{t.stkbase:#x}", f"{t.stk:#x}"],
            }
            for t in threads
        ]
        lines = [f"{'THREAD':>18} {'TID':>6} {'STATE':>8} {'PRI':>4} {'PID':>7} COMM"]
        lines += [
            f"{t.addr:018x} {t.tid:>6} {t.state:>8} {t.pri:>4} {t.pid if t.pid is not None else '-':>7} {t.comm}"
            for t in threads
        ]
        stacks = [(t.stkbase, t.stk) for t in threads if 0 < t.stk - t.stkbase <= MAX_STACK_PAGES * 4096]
        return LayerContent(
            artifacts=[
                Artifact("threads.json", json.dumps(rows, indent=1).encode()),
                Artifact("threads.txt", ("\n".join(lines) + "\n").encode()),
            ],
            page_runs=self._stack_runs(stacks),
            notes=notes + [f"{len(threads)} threads; stack pages of {len(stacks)}"],
        )

    def _stack_runs(self, stacks: list[tuple[int, int]]) -> Callable[[], Iterator[tuple[int, int]]]:
        def runs() -> Iterator[tuple[int, int]]:
            if self.mem is None:
                return
            for lo, hi in stacks:
                va = lo & ~0xFFF
                while va < hi:
                    try:
                        pa, _ = self.mem.to_phys(va)
                    except Exception:  # noqa: BLE001 - an unmapped stack page is skipped
                        va += 4096
                        continue
                    if self.snapshot.has_phys(pa & ~0xFFF, 4096):
                        yield pa >> 12, 1
                    va += 4096

        return runs


def _render_panic(d: dict, msgs: list) -> str:
    c = d["console"]
    L = ["progdump layer 0 (illumos producer)", ""]
    L.append(f"panic: {d.get('panic_message') or '(unknown)'}  [from {d.get('panic_message_source') or 'nowhere'}]")
    L.append(f"release: {d.get('release') or '?'}")
    L.append(f"panic cpu: {c.get('panic_cpu')}  thread: {c.get('thread') or d.get('panic_thread') or '?'}")
    if c.get("trap"):
        t = c["trap"]
        L.append(f"trap: type={t['type']} ({t.get('name') or '?'}) rp={t['rp']} addr={t['addr']}")
    pb = d.get("panicbuf")
    if pb:
        L += ["", "registers (panicbuf):"]
        regs = list(pb["registers"].items())
        for i in range(0, len(regs), 3):
            L.append("  " + "  ".join(f"{k:>7}: {int(v, 16):016x}" for k, v in regs[i : i + 3]))
    if c.get("frames"):
        L += ["", "stack (as the console printed it):"] + [f"  {f}" for f in c["frames"]]
    L += ["", f"message log ({len(msgs)} messages from log_recentq), last 40:"]
    L += [f"  {m.text}" for m in msgs[-40:]]
    return "\n".join(L) + "\n"


register_producer(
    ProducerEntry(
        name="illumos",
        accepts=accepts,
        factory=IllumosProducer,
        priority=20,
        preload=(
            "progdump.layers.illumos.console",
            "progdump.layers.illumos.manifest",
            "progdump.layers.illumos.msglog",
            "progdump.layers.illumos.panicbuf",
            "progdump.layers.illumos.threads",
            "progdump.layers.linux.translate",
        ),
    )
)
