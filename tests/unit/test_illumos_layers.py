"""illumos decoders on byte images laid out as the illumos headers define them.

No OmniOS image exists here, so these are the only tests of the illumos
producer: every structure below is built field by field at the offsets the
cited header gives (LP64, little-endian), and the expected values are the
ones the test wrote, never the decoder's output. The manifest parser reads
mdb output written by hand from the format strings in mdb's source
(``usr/src/cmd/mdb/common/mdb/mdb_cmds.c``: ``cmd_offsetof``, ``cmd_sizeof``).
The ksyms reader is checked against pyelftools on an object gcc compiled.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from progdump.elfcore import load_elf_snapshot, save_elf_snapshot
from progdump.layers import build_layers, select_producer
from progdump.layers.illumos import IllumosProducer
from progdump.layers.illumos.manifest import (
    Manifest,
    ManifestError,
    ksyms_symbols,
    manifest_from_snapshot,
    manifest_note,
    mdb_script,
    parse_mdb_output,
)
from progdump.layers.illumos.msglog import LogOffsets, read_recent_log
from progdump.layers.illumos.panicbuf import PanicbufError, decode_panicbuf
from progdump.layers.illumos.threads import walk_threads
from progdump.snapshot import CpuState, MemoryRange, Snapshot

# ---- panic_data_t (usr/src/uts/common/sys/panic.h) ---------------------------------------
PD_VERSION, PD_MSGOFF, PD_UUID, PD_NVDATA = 0, 4, 8, 48  # uint32, uint32, char[37], panic_nv_t[] (8-aligned)
PNV_NAME, PNV_VALUE, PNV_SIZE = 0, 16, 24  # char pnv_name[PANICNVNAMELEN=16]; uint64_t pnv_value


def make_panicbuf(
    regs: list[tuple[str, int]], msg: bytes, uuid: bytes = b"5e4a3b6c-0000-4000-8000-123456789abc", version: int = 2
) -> bytes:
    buf = bytearray(8192)  # PANICBUFSIZE
    msgoff = PD_NVDATA + len(regs) * PNV_SIZE  # PANICNVSET: end of pd_nvdata[]
    struct.pack_into("<II", buf, PD_VERSION, version, msgoff)
    buf[PD_UUID : PD_UUID + len(uuid)] = uuid
    for i, (name, value) in enumerate(regs):
        o = PD_NVDATA + i * PNV_SIZE
        buf[o + PNV_NAME : o + PNV_NAME + len(name)] = name.encode()
        struct.pack_into("<Q", buf, o + PNV_VALUE, value)
    buf[msgoff : msgoff + len(msg)] = msg + b"\0"
    return bytes(buf)


REGS = [("rdi", 0), ("rsi", 0x10), ("rip", 0xFFFFFFFFFB887480), ("rsp", 0xFFFFFE000C416D48), ("trapno", 0xE)]
MSG = b'BAD TRAP: type=e (#pf Page fault) rp=fffffe000c416c50 addr=0 occurred in module "unix"'


def test_panicbuf_decodes_what_was_laid_out():
    pd = decode_panicbuf(make_panicbuf(REGS, MSG))
    assert pd.version == 2 and pd.msgoff == 48 + 5 * 24
    assert pd.uuid == "5e4a3b6c-0000-4000-8000-123456789abc"
    assert pd.registers == REGS
    assert pd.message == MSG.decode()


@pytest.mark.parametrize(
    "mutate, why",
    [
        (lambda b: bytes(8192), "empty"),
        (lambda b: struct.pack("<I", 3) + b[4:], "pd_version 3"),
        (lambda b: b[:4] + struct.pack("<I", 9000) + b[8:], "outside"),
        (lambda b: b[:4] + struct.pack("<I", 50) + b[8:], "whole panic_nv_t"),
        (lambda b: b[:48] + b"\x01\x02" + b[50:], "printable"),
        (lambda b: b[:40], "shorter"),
    ],
)
def test_panicbuf_refuses_garbage(mutate, why):
    with pytest.raises(PanicbufError, match=why):
        decode_panicbuf(mutate(make_panicbuf(REGS, MSG)))


# ---- sparse kernel memory for the walkers -----------------------------------------------
class Mem:
    def __init__(self) -> None:
        self.blobs: dict[int, bytes] = {}

    def put(self, va: int, data: bytes) -> None:
        self.blobs[va] = data

    def read(self, va: int, n: int) -> bytes:
        for base, data in self.blobs.items():
            if base <= va and va + n <= base + len(data):
                return data[va - base : va - base + n]
        raise ValueError(f"fault at {va:#x}")


# queue_t (sys/stream.h): q_qinfo @0, q_first @8.  msgb: b_next @0, b_prev @8, b_cont @16, b_rptr @24, b_wptr @32.
# log_ctl_t (sys/strlog.h): mid @0, sid @2, level @4, flags @6, ltime @8, ttime @12, seq_no @16, pri @20.
def mblk(nxt: int, cont: int, rptr: int, wptr: int) -> bytes:
    b = bytearray(72)
    struct.pack_into("<Q", b, 0, nxt)
    struct.pack_into("<Q", b, 16, cont)
    struct.pack_into("<Q", b, 24, rptr)
    struct.pack_into("<Q", b, 32, wptr)
    return bytes(b)


def log_ctl(seq: int, ttime: int, level: int, flags: int) -> bytes:
    b = bytearray(24)
    b[4] = level
    struct.pack_into("<H", b, 6, flags)  # short flags: SL_PANICMSG (0x8000) is its sign bit
    struct.pack_into("<i", b, 12, ttime)
    struct.pack_into("<i", b, 16, seq)
    return bytes(b)


LOGQ_SYM, QUEUE, HEAP = 0xFFFFFFFFFBC50008, 0xFFFFFE0000200000, 0xFFFFFE0000300000
TEXTS = [b"NOTICE: vioif0 link up, 1000 Mbps, full duplex\n", b"panic message one\n", b"last words\n"]


def build_log(mem: Mem, texts=TEXTS, loop: bool = False) -> None:
    mem.put(LOGQ_SYM, struct.pack("<Q", QUEUE))
    q = bytearray(256)
    struct.pack_into("<Q", q, 8, HEAP)  # q_first
    mem.put(QUEUE, bytes(q))
    for i, t in enumerate(texts):
        m, c, lc, txt = HEAP + i * 0x400, HEAP + i * 0x400 + 0x80, HEAP + i * 0x400 + 0x100, HEAP + i * 0x400 + 0x200
        nxt = HEAP + (i + 1) * 0x400 if i + 1 < len(texts) else (HEAP if loop else 0)
        mem.put(m, mblk(nxt, c, lc, lc + 24))
        mem.put(c, mblk(0, 0, txt, txt + len(t) + 1))
        mem.put(lc, log_ctl(100 + i, 1764900000 + i, 5, 0x8000 if i == 1 else 0x10))
        mem.put(txt, t + b"\0")


def test_message_log_walk():
    mem = Mem()
    build_log(mem)
    msgs, notes = read_recent_log(mem.read, LOGQ_SYM)
    assert [m.text for m in msgs] == [
        "NOTICE: vioif0 link up, 1000 Mbps, full duplex",
        "panic message one",
        "last words",
    ]
    assert [m.seq_no for m in msgs] == [100, 101, 102]
    assert [m.ttime for m in msgs] == [1764900000, 1764900001, 1764900002]
    assert msgs[1].flags == 0x8000 and msgs[0].level == 5
    assert notes == []


def test_message_log_loop_and_fault_end_the_walk():
    mem = Mem()
    build_log(mem, loop=True)
    msgs, notes = read_recent_log(mem.read, LOGQ_SYM)
    assert len(msgs) == 3 and any("loops" in n for n in notes)
    mem2 = Mem()
    build_log(mem2)
    del mem2.blobs[HEAP + 0x400 + 0x200]  # second message's text page gone
    msgs, notes = read_recent_log(mem2.read, LOGQ_SYM)
    assert [m.text for m in msgs] == ["NOTICE: vioif0 link up, 1000 Mbps, full duplex"]
    assert any("unreadable" in n for n in notes)
    assert read_recent_log(Mem().read, LOGQ_SYM)[0] == []


def test_log_offsets_from_manifest_override_headers():
    off, defaulted = LogOffsets.from_manifest({"queue_t.q_first": 16, "mblk_t.b_next": 0})
    assert off.q_first == 16 and "mblk_t.b_cont" in defaulted and "queue_t.q_first" not in defaulted


# ---- the thread ring (offsets only from the manifest; values chosen by the test) --------
TOFF = {
    "kthread_t.t_next": 0x20,
    "kthread_t.t_stk": 0x0,
    "kthread_t.t_stkbase": 0x1A8,
    "kthread_t.t_state": 0x12C,
    "kthread_t.t_tid": 0x1B0,
    "kthread_t.t_pri": 0x130,
    "kthread_t.t_procp": 0x190,
    "proc_t.p_pidp": 0x98,
    "proc_t.p_user": 0x500,
    "user_t.u_comm": 0x20,
    "struct pid.pid_id": 4,
}
ALLTHREADS, T0, P0, PID0 = 0xFFFFFFFFFBC60000, 0xFFFFFE0001000000, 0xFFFFFE0002000000, 0xFFFFFE0003000000


def build_threads(mem: Mem, n: int = 3) -> None:
    mem.put(ALLTHREADS, struct.pack("<Q", T0))
    for i in range(n):
        t = bytearray(0x200)
        struct.pack_into("<Q", t, 0x20, T0 + ((i + 1) % n) * 0x1000)
        struct.pack_into("<Q", t, 0x0, 0xFFFFFE0010006000 + i * 0x10000)
        struct.pack_into("<Q", t, 0x1A8, 0xFFFFFE0010001000 + i * 0x10000)
        struct.pack_into("<H", t, 0x12C, (1, 2, 4)[i % 3])
        struct.pack_into("<I", t, 0x1B0, 7 + i)
        struct.pack_into("<h", t, 0x130, 60 + i)
        struct.pack_into("<Q", t, 0x190, P0)
        mem.put(T0 + i * 0x1000, bytes(t))
    p = bytearray(0x600)
    struct.pack_into("<Q", p, 0x98, PID0)
    p[0x520 : 0x520 + 6] = b"sched\0"
    mem.put(P0, bytes(p))
    mem.put(PID0, struct.pack("<II", 0, 0))


def test_thread_ring():
    mem = Mem()
    build_threads(mem)
    ths, notes = walk_threads(mem.read, ALLTHREADS, TOFF)
    assert [t.tid for t in ths] == [7, 8, 9]
    assert [t.state for t in ths] == ["sleep", "run", "onproc"]
    assert [t.pri for t in ths] == [60, 61, 62]
    assert {(t.pid, t.comm) for t in ths} == {(0, "sched")}
    assert ths[1].stk - ths[1].stkbase == 0x5000 and notes == []
    assert walk_threads(mem.read, ALLTHREADS, {k: v for k, v in TOFF.items() if k != "kthread_t.t_tid"})[0] == []


# ---- the manifest ----------------------------------------------------------------------
RECORDED_MDB = """\
== progdump illumos manifest v1
== uname
SunOS omnios 5.11 omnios-r151054-4b3f0d1a2b i86pc i386 i86pc
== pagesize
4096
== offsetof kthread_t t_next
offsetof (kthread_t, t_next) = 0x20, sizeof (...->t_next) = 8
== offsetof kthread_t t_state
offsetof (kthread_t, t_state) = 0x12c, sizeof (...->t_state) = 2
== offsetof proc_t p_nosuch
mdb: failed to find member p_nosuch of type proc_t
== sizeof kthread_t
sizeof (kthread_t) = 0xa08
== sizeof log_ctl_t
sizeof (log_ctl_t) = 0x18
== end
"""


def test_mdb_manifest_parser():
    m = parse_mdb_output(RECORDED_MDB)
    assert m.release.startswith("SunOS omnios 5.11 omnios-r151054")
    assert m.offsets == {"kthread_t.t_next": 0x20, "kthread_t.t_state": 0x12C}
    assert m.sizes == {"kthread_t": 0xA08, "log_ctl_t": 24}
    assert m.page_size == 4096
    assert m.errors == ["offsetof proc_t p_nosuch: mdb: failed to find member p_nosuch of type proc_t"]


@pytest.mark.parametrize(
    "text, why",
    [
        ("junk\n== end\n", "does not start"),
        (RECORDED_MDB.replace("== end\n", ""), "cut short"),
        (RECORDED_MDB.replace("= 0x20,", "= 0x7fffffff,"), "plausible"),
        (RECORDED_MDB.replace("4096", "65536"), "pagesize"),
        ("x" * (2 << 20), "exceeds"),
    ],
)
def test_mdb_manifest_parser_refuses(text, why):
    with pytest.raises(ManifestError, match=why):
        parse_mdb_output(text)


def test_mdb_script_asks_for_every_offset():
    s = mdb_script()
    assert "echo '::offsetof kthread_t t_next' | mdb -k" in s and s.rstrip().endswith("echo '== end'")


def test_manifest_note_round_trip_and_hostile_json():
    m = Manifest(symbols={"panicbuf": 0xFFFFFFFFFBC3A000}, offsets={"kthread_t.t_next": 32}, release="r")
    s = Snapshot(ranges=[], notes=[manifest_note(m)])
    back = manifest_from_snapshot(s)
    assert back is not None and back.symbols == m.symbols and back.offsets == m.offsets
    for doc in (
        {"os": "linux"},
        {"os": "illumos", "version": 2},
        {"os": "illumos", "version": 1, "symbols": {"a": "zz"}},
        {"os": "illumos", "version": 1, "offsets": {"x;rm": 1}},
    ):
        bad = Snapshot(ranges=[], notes=[manifest_note(m)])
        bad.notes[0] = type(bad.notes[0])(bad.notes[0].name, bad.notes[0].type, json.dumps(doc).encode())
        with pytest.raises(ManifestError):
            manifest_from_snapshot(bad)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed: no ELF object to compare ksyms reading on")
def test_ksyms_reader_agrees_with_pyelftools(tmp_path: Path):
    elftools = pytest.importorskip("elftools.elf.elffile", reason="pyelftools (test extra) not installed")
    src = tmp_path / "k.c"
    src.write_text(
        "char panicbuf[8192]; void *panic_thread; static void *log_recentq; int f(void){return !!log_recentq;}\n"
        "long allthreads = 5;\n"
    )
    obj = tmp_path / "k.o"
    subprocess.run(["gcc", "-c", "-O0", "-o", str(obj), str(src)], check=True)
    with open(obj, "rb") as f:
        ef = elftools.ELFFile(f)
        theirs = {}
        for sym in ef.get_section_by_name(".symtab").iter_symbols():
            if sym.name and sym.name not in theirs:
                theirs[sym.name] = sym["st_value"]
    ours = ksyms_symbols(obj.read_bytes(), None)
    assert ours == theirs
    assert set(ksyms_symbols(obj.read_bytes())) >= {"panicbuf", "panic_thread", "log_recentq", "allthreads"}
    with pytest.raises(ManifestError):
        ksyms_symbols(b"\x7fELF" + b"\x01" * 60)


# ---- the producer on a snapshot with real x86-64 page tables ----------------------------
PANICBUF = 0xFFFFFFFFFBC3A000


class PhysBuilder:
    """Guest-physical memory with a 4-level page table (PTE present|write, 4 KiB pages)."""

    def __init__(self, size: int = 4 << 20) -> None:
        self.mem = bytearray(size)
        self.next_table = 0x1000
        self.pml4 = self.alloc()
        self.next_data = 0x100000

    def alloc(self) -> int:
        pa = self.next_table
        self.next_table += 0x1000
        return pa

    def _table(self, table: int, index: int) -> int:
        (e,) = struct.unpack_from("<Q", self.mem, table + index * 8)
        if not e & 1:
            e = self.alloc() | 3
            struct.pack_into("<Q", self.mem, table + index * 8, e)
        return e & ~0xFFF

    def map_page(self, va: int) -> int:
        t = self.pml4
        for shift in (39, 30, 21):
            t = self._table(t, (va >> shift) & 0x1FF)
        (e,) = struct.unpack_from("<Q", self.mem, t + ((va >> 12) & 0x1FF) * 8)
        if e & 1:
            return e & ~0xFFF
        pa = self.next_data
        self.next_data += 0x1000
        struct.pack_into("<Q", self.mem, t + ((va >> 12) & 0x1FF) * 8, pa | 3)
        return pa

    def write(self, va: int, data: bytes) -> None:
        for i in range(0, len(data)):
            if i == 0 or (va + i) & 0xFFF == 0:
                pa = self.map_page((va + i) & ~0xFFF)
            self.mem[pa + ((va + i) & 0xFFF)] = data[i]


def illumos_snapshot(console: bytes, with_cr3: bool = True) -> Snapshot:
    pb = PhysBuilder()
    pb.write(PANICBUF, make_panicbuf(REGS, MSG))
    mem = Mem()
    build_log(mem)
    build_threads(mem)
    for va, data in mem.blobs.items():
        pb.write(va, data)
    for i in range(3):  # the threads' stacks: 5 pages each
        for p in range(5):
            pb.write(0xFFFFFE0010001000 + i * 0x10000 + p * 0x1000, b"S" * 16)
    pb.write(0xFFFFFFFFFBC70000, struct.pack("<Q", T0))  # panic_thread
    m = Manifest(
        symbols={
            "panicbuf": PANICBUF,
            "log_recentq": LOGQ_SYM,
            "allthreads": ALLTHREADS,
            "panic_thread": 0xFFFFFFFFFBC70000,
        },
        offsets=dict(TOFF),
        release="SunOS omnios 5.11 test",
    )
    regs = {"rip": 0xFFFFFFFFFB887480, "rsp": 0xFFFFFE000C416D48}
    if with_cr3:
        regs["cr3"] = pb.pml4
    return Snapshot(
        ranges=[MemoryRange(0, len(pb.mem), memoryview(bytes(pb.mem)))],
        cpus=[CpuState(0, regs)],
        notes=[manifest_note(m)],
        console_tail=console,
        metadata={"os": "illumos"},
    )


CONSOLE = (
    b"omnios console login: \n\npanic[cpu0]/thread=fffffe0001000000: " + MSG + b"\n\n"
    b"fffffe000c416a80 unix:die+c6 ()\nfffffe000c416b90 unix:trap+e61 ()\n"
)


def test_producer_layers_0_and_1():
    snap = illumos_snapshot(CONSOLE)
    p = select_producer(snap)
    assert isinstance(p, IllumosProducer), p.degraded
    layers = build_layers(snap, "progressive", p)
    arts0 = {a.name: a.data for a in layers[0][1].artifacts}
    d = json.loads(arts0["panic.json"])
    assert d["panic_message"] == MSG.decode() and d["panic_message_source"] == "panicbuf"
    assert d["panicbuf"]["registers"]["rip"] == "0xfffffffffb887480"
    assert d["console"]["frames"] == ["unix:die+c6", "unix:trap+e61"]
    assert d["panic_thread"] == f"{T0:#x}"
    assert arts0["msgbuf.txt"].decode().splitlines()[1] == "panic message one  [panic]"
    assert arts0["panicbuf.bin"][:4] == struct.pack("<I", 2)
    assert any("no page classes" in n for n in layers[0][1].notes)
    t_arts = {a.name: a.data for spec, c in layers for a in c.artifacts if spec.name == "tasks"}
    rows = json.loads(t_arts["threads.json"])
    assert [r["tid"] for r in rows] == [7, 8, 9] and rows[0]["comm"] == "sched"
    tasks = next(c for spec, c in layers if spec.name == "tasks")
    assert len(list(tasks.page_runs())) == 15  # 3 threads x 5 stack pages, each mapped to its own frame


def test_producer_without_cr3_falls_back_to_the_console():
    p = select_producer(illumos_snapshot(CONSOLE, with_cr3=False))
    assert isinstance(p, IllumosProducer)
    c = p.panic()
    d = json.loads(next(a.data for a in c.artifacts if a.name == "panic.json"))
    assert d["panic_message"] == MSG.decode() and d["panic_message_source"] == "the console"
    assert any("CR3" in n for n in p.degraded)


def test_no_manifest_no_illumos_producer():
    snap = illumos_snapshot(CONSOLE)
    snap.notes = []
    assert select_producer(snap).name != "illumos"


def test_manifest_survives_the_elf_core(tmp_path: Path):
    snap = illumos_snapshot(CONSOLE)
    save_elf_snapshot(snap, tmp_path / "core.elf")
    back = load_elf_snapshot(tmp_path / "core.elf")
    try:
        assert manifest_from_snapshot(back).symbols["panicbuf"] == PANICBUF  # type: ignore[union-attr]
        assert select_producer(back).name == "illumos"
    finally:
        back.close()
