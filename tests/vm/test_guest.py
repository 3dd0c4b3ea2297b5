"""The Linux stand-in under real QEMU: boot, panic, capture, reset, no leaks.

Slow (TCG boots take ~3 s each); skips, saying why, without QEMU or the
image. Figures live in bench/guest_timings.py; nothing here asserts a time.
"""

from __future__ import annotations

import gc
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness.qemu.capture import COMPARED_REGS, dump_elf
from progdump.elfcore import load_elf_snapshot
from progdump.snapshot import PAGE_SIZE, Snapshot

pytestmark = pytest.mark.vm


def find_in_ram(snap: Snapshot, needle: bytes) -> int | None:
    """Guest-physical address of the first occurrence of ``needle`` (within one range)."""
    for r in snap.ranges:
        i = bytes(r.buffer).find(needle)
        if i >= 0:
            return r.phys_start + i
    return None


def find_full_page(snap: Snapshot, page: bytes) -> int | None:
    """Guest-physical address of a page-aligned page equal to ``page``."""
    assert len(page) == PAGE_SIZE
    for r in snap.ranges:
        data = bytes(r.buffer)
        i = data.find(page)
        while i >= 0:
            aligned = -(-i // PAGE_SIZE) * PAGE_SIZE
            if data[aligned : aligned + PAGE_SIZE] == page:
                return r.phys_start + aligned
            i = data.find(page, aligned + 1)
    return None


def check_markers(snap: Snapshot, markers: dict[str, Any]) -> None:
    anon = markers["anon_unit"].encode()
    cache = markers["cache_unit"].encode()
    assert len(anon) == 32 and len(cache) == 32
    assert find_in_ram(snap, anon * 64) is not None, "anonymous-memory marker not in RAM"
    assert find_full_page(snap, cache * (PAGE_SIZE // 32)) is not None, "page-cache marker page not in RAM"
    assert find_in_ram(snap, markers["kmsg"].encode()) is not None, "kernel-log marker not in RAM"
    assert find_in_ram(snap, b"pdmarker\x00") is not None, "marker task's comm not in RAM"


def check_registers(snap: Snapshot) -> None:
    vmci = snap.vmcoreinfo
    assert vmci is not None, "no VMCOREINFO note (qemu_fw_cfg not loaded?)"
    stext = int(vmci["SYMBOL(_stext)"], 16)
    for cpu in snap.cpus:
        r = cpu.regs
        assert stext <= r["rip"] < stext + (64 << 20), f"CPU {cpu.index}: RIP {r['rip']:#x} not in kernel text"
        assert r["cr3"] and r["cr3"] % PAGE_SIZE == 0 and snap.has_phys(r["cr3"] & ~0xFFF, PAGE_SIZE)
        assert r["cr0"] & 0x80000001 == 0x80000001
        assert r["efer"] & 0x500 == 0x500
        assert r["cs"] == 0x10
        assert cpu.prstatus is not None and len(cpu.prstatus) == 336


@pytest.fixture(scope="module")
def session(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One booted 512 MiB guest shared by the tests below (each resets after its panic)."""
    request.getfixturevalue("linux_guest")
    from harness.controller import GuestSession

    work = tmp_path_factory.mktemp("guest")
    s = GuestSession("linux", mem_mib=512, dump_disk=work / "dump.img", workdir=work)
    with s:
        s.boot()
        yield s


def _ready(s: Any) -> None:
    if s.call(s.m.status()) != "running":
        s.reset()


def test_boot_to_ready(session: Any) -> None:
    _ready(session)
    assert re.fullmatch(r"[0-9a-f]{16}", session.boot_id)
    assert session.markers["nonce"] == session.boot_id
    assert session.timings["boot"] > 0
    r = session.run(
        "cat /proc/sys/kernel/panic_on_oops /proc/sys/kernel/unknown_nmi_panic; "
        "cat /sys/block/vda/serial; echo; test -d /sys/firmware/qemu_fw_cfg/by_name/etc/vmcoreinfo"
    )
    assert r.status == 0, r.text
    assert r.text.split()[:3] == ["1", "1", "pddump"]
    bad = session.run("exit 7")
    assert bad.status == 7
    # sockets and RAM file live in private 0700 directories, removed once connected/opened
    m = session.machine
    assert not m.rundir.sock_dir.exists() and m.rundir.shm_dir is not None and not m.rundir.shm_dir.exists()
    assert m.config.ram_file is not None and not m.config.ram_file.exists()
    from harness.qemu.machine import RunDir

    rd = RunDir(shm=True)
    try:
        assert os.stat(rd.sock_dir).st_mode & 0o777 == 0o700
        assert rd.shm_dir is not None and os.stat(rd.shm_dir).st_mode & 0o777 == 0o700
    finally:
        rd.remove()
    assert m.ram_fd is not None and os.fstat(m.ram_fd).st_size == 512 << 20
    assert session.accel in ("tcg", "kvm") and session.accel_reason


def test_sysrq_panic_capture(session: Any, tmp_path: Path) -> None:
    _ready(session)
    markers = dict(session.markers)
    p = session.panic("sysrq")
    assert p.status == "paused"
    assert p.panic_string == "sysrq triggered crash"
    assert p.console_complete
    assert p.event_ns >= p.trigger_ns - 10**9
    with session.capture() as snap:
        assert snap.metadata["capture_method"] == "shared-memory-backend"
        assert snap.metadata["panic_event_ns"] == p.event_ns
        assert snap.metadata["os"] == "linux" and snap.metadata["ram_bytes"] == 512 << 20
        assert snap.metadata["release"] == snap.vmcoreinfo["OSRELEASE"] == markers["release"]
        assert snap.metadata["capture_warnings"] == []
        assert snap.total_bytes > 500 << 20
        check_markers(snap, markers)
        assert find_in_ram(snap, b"Kernel panic - not syncing: sysrq triggered crash") is not None
        # the in-memory log holds the panic's last line too (panic=none + stop after it)
        assert find_in_ram(snap, b"---[ end Kernel panic - not syncing: sysrq triggered crash ]---") is not None
        # the console tail ends with the panic's last line (panic=none, stop after that line)
        assert snap.console_tail.rstrip().endswith(b"---[ end Kernel panic - not syncing: sysrq triggered crash ]---")
        check_registers(snap)

        # registers and bytes equal to QEMU's own dump-guest-memory ELF
        elf = tmp_path / "full.elf"
        session.call(dump_elf(session.m, elf))
        with load_elf_snapshot(elf) as ref:
            assert len(ref.cpus) == len(snap.cpus)
            for a, b in zip(snap.cpus, ref.cpus):
                for name in COMPARED_REGS:
                    assert a.regs[name] == b.regs[name], f"CPU {a.index} {name}"
                assert a.prstatus == b.prstatus
            for r in snap.ranges:
                assert ref.read_phys(r.phys_start, r.size) == bytes(r.buffer), f"range {r.phys_start:#x}"
        os.chmod(elf, 0o600)
        elf.unlink()

        # the pmemsave fallback gives the same bytes
        with session.capture("pmemsave") as slow:
            assert slow.metadata["capture_method"] == "qmp-pmemsave"
            assert [(r.phys_start, r.size) for r in slow.ranges] == [(r.phys_start, r.size) for r in snap.ranges]
            for a, b in zip(snap.ranges, slow.ranges):
                assert a.buffer == b.buffer, f"range {a.phys_start:#x} differs"
    session.reset()


def test_nmi_panic(session: Any) -> None:
    _ready(session)
    markers = dict(session.markers)
    p = session.panic("nmi")
    assert p.status == "paused"
    assert p.panic_string == "NMI: Not continuing"
    with session.capture() as snap:
        check_markers(snap, markers)
        check_registers(snap)
        assert find_in_ram(snap, b"---[ end Kernel panic - not syncing: NMI: Not continuing ]---") is not None
        assert snap.console_tail.rstrip().endswith(b"---[ end Kernel panic - not syncing: NMI: Not continuing ]---")
        # the dump-guest-memory fallback gives the same bytes as the shared view
        with session.capture("elf") as viaelf:
            assert viaelf.metadata["capture_method"] == "qmp-dump-guest-memory"
            assert viaelf.vmcoreinfo == snap.vmcoreinfo
            for r in snap.ranges:
                assert viaelf.read_phys(r.phys_start, r.size) == bytes(r.buffer), f"range {r.phys_start:#x}"
    session.reset()


def test_oops_panic(session: Any) -> None:
    if "oops" not in session.profile.triggers:
        pytest.skip("guest image has no pdoops module: " + str(session.profile.manifest.get("oops_module")))
    _ready(session)
    p = session.panic("oops")
    assert p.status == "paused"
    assert p.panic_string == "Fatal exception"
    assert "BUG: kernel NULL pointer dereference" in session.console_text
    assert "RIP: 0010:pdoops_write" in session.console_text
    with session.capture() as snap:
        check_registers(snap)
        assert find_in_ram(snap, b"BUG: kernel NULL pointer dereference") is not None
    session.reset()


def test_hung_task_panic(session: Any) -> None:
    _ready(session)
    p = session.panic("hung-task")
    assert p.status == "paused"
    assert p.panic_string == "hung_task: blocked tasks"
    assert "blocked for more than" in session.console_text
    session.reset()


def test_reset_reboots_and_preserves_open_snapshot(session: Any) -> None:
    _ready(session)
    before = dict(session.markers)
    session.panic("sysrq")
    snap = session.capture()
    try:
        b = session.reset()
        assert b.boot_id != before["nonce"]
        assert session.run("echo again").text == "again\n"
        # the snapshot was copied before the reset: old markers still there, new ones not
        assert find_in_ram(snap, before["anon_unit"].encode() * 64) is not None
        assert find_in_ram(snap, session.markers["anon_unit"].encode() * 8) is None
    finally:
        snap.close()


def test_hotplug_disk(session: Any, tmp_path: Path) -> None:
    _ready(session)
    img = tmp_path / "extra.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
        f.write(b"PD-HOTPLUG-DISK")
    session.add_disk(img, "extra1", bus="scsi", serial="pdextra")
    r = session.run(
        "for i in 1 2 3 4 5 6 7 8 9 10; do ls /dev/sd? >/dev/null 2>&1 && break; sleep 0.2; done; head -c 15 /dev/sda"
    )
    assert r.text == "PD-HOTPLUG-DISK", r.text
    session.remove_disk("extra1")
    assert session.run("ls /dev/sda").status != 0
    # virtio-blk into a pcie-root-port (q35's root bus takes no hot-plug)
    session.add_disk(img, "extra2", bus="virtio", serial="pdextra2")
    r = session.run(
        "for i in $(seq 1 50); do [ -e /dev/vdb ] && break; sleep 0.1; done; "
        "cat /sys/block/vdb/serial; echo; head -c 15 /dev/vdb"
    )
    assert r.text == "pdextra2\nPD-HOTPLUG-DISK", r.text
    session.remove_disk("extra2")
    assert session.run("ls /dev/vdb").status != 0


def test_ssh_reachable(guest_session: Callable[..., Any]) -> None:
    pytest.importorskip("paramiko")
    s = guest_session(mem_mib=256, ssh=True)
    s.boot()
    client = s.ssh_client()
    try:
        _, out, _ = client.exec_command("cat /proc/sys/kernel/hostname")
        assert out.read().decode().strip() == "pdguest"
    finally:
        client.close()


def _children() -> set[int]:
    me = os.getpid()
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == me:
                    out.add(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _fds() -> dict[str, str]:
    """Open descriptors and what each points at (the name helps when the test fails)."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


def test_cycles_leak_nothing(guest_session: Callable[..., Any]) -> None:
    # An earlier test's unreachable objects may close their descriptors at any
    # collection during this test; collect first, and count only descriptors
    # this test's cycles opened and left open (a closed one is not a leak).
    gc.collect()
    fds0 = _fds()
    threads0 = set(threading.enumerate())
    children0 = _children()
    dirs = []
    pids = []
    for _ in range(2):
        s = guest_session(mem_mib=256)
        s.boot()
        m = s.machine
        dirs += [m.rundir.sock_dir, m.rundir.shm_dir]
        pids.append(m.pid)
        for trig in ("sysrq", "nmi"):
            s.panic(trig)
            with s.capture() as snap:
                assert snap.total_bytes > 200 << 20
            s.reset()
        s.close()
    assert _children() == children0
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"QEMU {pid} still exists"
    for d in dirs:
        assert d is not None and not d.exists(), f"{d} left behind"
    gc.collect()
    leaked = {fd: target for fd, target in _fds().items() if fds0.get(fd) != target}
    assert leaked == {}, f"descriptors left open: {leaked}"
    assert set(threading.enumerate()) - threads0 == set(), "threads left running"


def _meminfo_kb(s: Any) -> dict[str, int]:
    out = {}
    for line in s.run("cat /proc/meminfo").text.splitlines():
        k, _, v = line.partition(":")
        out[k] = int(v.split()[0])
    return out


def test_workloads_fill_their_layers(session: Any) -> None:
    _ready(session)
    before = _meminfo_kb(session)
    session.workload("pagecache", 16)
    session.workload("anon", 16)
    session.workload("slab", 4000)
    after = _meminfo_kb(session)
    assert after["Cached"] - before["Cached"] >= 15 * 1024
    assert after["AnonPages"] - before["AnonPages"] >= 15 * 1024
    assert after["Slab"] > before["Slab"]
    with pytest.raises(ValueError):
        session.workload("swap", 1)


def test_4g_guest_high_memory_matches_qemu(guest_session: Callable[..., Any], tmp_path: Path) -> None:
    """RAM above the q35 low-memory split (at 4 GiB+) is mapped at the right file offset."""
    s = guest_session(mem_mib=4096)
    s.boot()
    s.workload("anon", 64)
    s.panic("sysrq")
    with s.capture() as snap:
        high = [r for r in snap.ranges if r.phys_start >= 4 << 30]
        assert high and high[0].phys_start == 4 << 30
        assert snap.total_bytes >= (4 << 30) - (1 << 20)
        n = 64 * 1024
        nonzero_high = 0
        for r in snap.ranges:
            if r.size < n:
                continue
            # the ends and middle, plus the first few non-zero chunks (zero pages would
            # match whatever the offset, so they alone prove nothing)
            addrs = [r.phys_start, r.phys_start + (r.size // 2 & ~0xFFF), r.phys_end - n]
            for off in range(0, r.size - n, 1 << 20):
                if len(addrs) >= 8:
                    break
                if any(r.buffer[off : off + n]):
                    addrs.append(r.phys_start + off)
            for addr in addrs:
                out = tmp_path / f"p{addr:x}"
                s.call(s.m.execute("pmemsave", {"val": addr, "size": n, "filename": str(out)}))
                data = out.read_bytes()
                assert data == snap.read_phys(addr, n), f"bytes at {addr:#x} differ"
                if addr >= 4 << 30 and any(data):
                    nonzero_high += 1
        assert nonzero_high >= 1, "no non-zero memory above 4 GiB was compared"
        check_registers(snap)


def test_hotplug_network_block_device(session: Any, tmp_path: Path) -> None:
    """Generic hot-plug: a LUN served over NBD by qemu-nbd, as an iSCSI LUN would be."""
    import shutil
    import subprocess
    import time as _time

    if shutil.which("qemu-nbd") is None:
        pytest.skip("qemu-nbd not installed (qemu-utils)")
    _ready(session)
    img = tmp_path / "nbd.img"
    with open(img, "wb") as f:
        f.truncate(4 << 20)
        f.write(b"PD-NBD-LUN")
    sock = tmp_path / "nbd.sock"
    srv = subprocess.Popen(
        ["qemu-nbd", "--persistent", "--format=raw", f"--socket={sock}", str(img)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if sock.exists():
                break
            _time.sleep(0.05)
        session.hotplug(
            [{"driver": "nbd", "node-name": "nbd0", "server": {"type": "unix", "path": str(sock)}}],
            {"driver": "scsi-hd", "id": "lun0", "drive": "nbd0", "bus": "scsi0.0"},
        )
        r = session.run("for i in $(seq 1 50); do [ -e /dev/sda ] && break; sleep 0.1; done; head -c 10 /dev/sda")
        assert r.text == "PD-NBD-LUN", r.text
        session.unplug("lun0")
        assert session.run("ls /dev/sda").status != 0
    finally:
        srv.terminate()
        srv.wait(10)


def test_two_vcpus_registers_equal_elf_notes(guest_session: Callable[..., Any], tmp_path: Path) -> None:
    """Every vCPU's registers (HMP) equal QEMU's ELF CPU notes, and are sane."""
    s = guest_session(mem_mib=256, smp=2)
    s.boot()
    p = s.panic("nmi")
    assert p.status == "paused"
    with s.capture() as snap:
        assert len(snap.cpus) == 2
        check_registers(snap)
        elf = tmp_path / "full.elf"
        s.call(dump_elf(s.m, elf))
        with load_elf_snapshot(elf) as ref:
            assert len(ref.cpus) == 2
            for a, b in zip(snap.cpus, ref.cpus):
                for name in COMPARED_REGS:
                    assert a.regs[name] == b.regs[name], f"CPU {a.index} {name}"
        os.chmod(elf, 0o600)
        elf.unlink()


def test_qemu_killed_gives_clear_errors(guest_session: Callable[..., Any]) -> None:
    """If QEMU dies under us, every step says so (QemuExited), and close() still cleans up."""
    import signal

    from harness.errors import QemuExited

    s = guest_session(mem_mib=256)
    s.boot()
    m = s.machine
    os.kill(m.pid, signal.SIGKILL)
    with pytest.raises(QemuExited, match="QEMU exited"):
        s.run("echo hi", timeout=20)
    with pytest.raises(QemuExited):
        s.panic("nmi")
    with pytest.raises(QemuExited):
        s.capture()
    s.close()
    assert not m.rundir.sock_dir.exists()
    assert m.ram_fd is None


def test_knobs_set_sysctls(guest_session: Callable[..., Any]) -> None:
    s = guest_session(mem_mib=256, knobs={"panic_print": "0x1", "hung_task_timeout": "7", "softlockup_panic": "1"})
    s.boot()
    r = s.run(
        "cat /proc/sys/kernel/panic_print /proc/sys/kernel/hung_task_timeout_secs "
        "/proc/sys/kernel/softlockup_panic /proc/sys/kernel/hung_task_panic"
    )
    assert r.text.split() == ["1", "7", "1", "0"]
    with pytest.raises(ValueError):
        guest_session(mem_mib=256, knobs={"nonsense": "1"}).boot()


def test_qemu_dies_with_a_killed_controller(linux_guest: None, tmp_path: Path) -> None:
    """SIGKILL the controller process: PR_SET_PDEATHSIG takes QEMU down with it."""
    import signal
    import subprocess
    import sys
    import time as _time

    code = (
        "import sys, time\n"
        "from harness.controller import GuestSession\n"
        f"s = GuestSession(mem_mib=256, workdir={str(tmp_path)!r})\n"
        "s.start(); s.boot()\n"
        "print(s.machine.pid, s.machine.rundir.sock_dir, s.machine.rundir.shm_dir, flush=True)\n"
        "time.sleep(600)\n"
    )
    repo = Path(__file__).resolve().parent.parent.parent
    env = dict(os.environ, PYTHONPATH=str(repo))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, cwd=repo)
    try:
        assert child.stdout is not None
        fields = child.stdout.readline().split()
        assert len(fields) == 3 and fields[0].isdigit(), "controller did not report a QEMU pid"
        qemu = int(fields[0])
        assert os.path.exists(f"/proc/{qemu}")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    for _ in range(100):
        if not os.path.exists(f"/proc/{qemu}"):
            break
        _time.sleep(0.1)
    assert not os.path.exists(f"/proc/{qemu}"), f"QEMU {qemu} outlived its controller"
    assert (tmp_path / "console.log").stat().st_size > 0
    for d in fields[1:]:
        assert not os.path.exists(d), f"{d!r} left behind by a killed controller"


def test_capture_without_shared_ram(guest_session: Callable[..., Any]) -> None:
    """RAM not on a shared backend (what the fallbacks exist for): capture() takes pmemsave, the
    RAM layout comes from QEMU's own RAM region, and the markers and panic string are in it."""
    s = guest_session(mem_mib=512, shared_ram=False)
    s.boot()
    markers = dict(s.markers)
    s.panic("sysrq")
    with s.capture() as snap:
        assert snap.metadata["capture_method"] == "qmp-pmemsave"
        assert snap.total_bytes > 500 << 20
        assert snap.metadata["release"] == markers["release"]
        check_markers(snap, markers)
        assert find_in_ram(snap, b"Kernel panic - not syncing: sysrq triggered crash") is not None
        check_registers(snap)
        with s.capture("elf") as ref:  # QEMU's own dump-guest-memory of the same frozen guest
            for r in snap.ranges:
                assert ref.read_phys(r.phys_start, r.size) == bytes(r.buffer), f"range {r.phys_start:#x} differs"
