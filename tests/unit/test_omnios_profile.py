"""The omnios guest profile without an OmniOS image: refusal, command line, overlay, seed, SSH pin, fetch.

What these cannot show (no image here): that an OmniOS cloud image boots with
this command line, reads this seed and answers SSH. docs/OMNIOS.md says so.
Independent checks: qemu-img reads the overlay's backing file, mtools (if
installed) reads the seed, the FAT fields are the ones the FAT specification
fixes, the fetch test serves a stand-in "image" over file:// (a fake, said so).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import BootError, ImageMissing
from harness.guests import get_profile
from harness.guests import omnios as om
from harness.guests.nocloud import FatError, fat12_image, user_data, write_seed

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "guest-images" / "omnios"))
import fetch as omfetch  # noqa: E402


def _no_image_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMNIOS_IMAGE", "GUEST")}
    return env


def _skip_if_image_fetched() -> None:
    if om.FETCHED_MANIFEST.exists():
        pytest.skip(f"an OmniOS image was fetched here ({om.FETCHED_MANIFEST}): the refusal cannot be shown")


# ---- refusal without an image ------------------------------------------------------------
def test_image_missing_is_one_line_naming_the_variable(monkeypatch, tmp_path):
    monkeypatch.setattr(om, "FETCHED_MANIFEST", tmp_path / "none.json")
    with pytest.raises(ImageMissing) as e:
        om.image_path({})
    assert "OMNIOS_IMAGE" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ImageMissing, match="not a readable file"):
        om.image_path({"OMNIOS_IMAGE": str(tmp_path / "absent.qcow2")})


@pytest.mark.parametrize(
    "argv, extra_env",
    [
        (["-m", "harness", "boot", "--guest", "omnios"], {}),
        (["-m", "harness", "capture", "--guest", "omnios", "--show-command"], {}),
        (["-m", "harness", "panic"], {"GUEST": "omnios"}),
        (["-m", "harness.scenario", "run", "omnios-uadmin"], {}),
        (["-m", "harness.scenario", "run", "sysrq-panic"], {"GUEST": "omnios"}),
    ],
)
def test_cli_refuses_in_one_line(argv, extra_env):
    _skip_if_image_fetched()
    r = subprocess.run(
        [sys.executable, *argv],
        cwd=REPO,
        env={**_no_image_env(), **extra_env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert "OMNIOS_IMAGE" in lines[0] and "Traceback" not in lines[0]


def test_scenario_refuses_a_trigger_the_guest_lacks(tmp_path):
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    r = subprocess.run(
        [sys.executable, "-m", "harness.scenario", "run", "sysrq-panic"],
        cwd=REPO,
        env={**_no_image_env(), "GUEST": "omnios", "OMNIOS_IMAGE": str(base)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "trigger 'sysrq' is not one of guest omnios's (uadmin, dtrace, nmi)" in r.stderr


# ---- the command line -------------------------------------------------------------------
def test_extra_args_are_what_the_image_needs(tmp_path):
    a = om.qemu_extra_args(tmp_path / "o.qcow2", tmp_path / "s.img", 2222)
    devs = [a[i + 1] for i, x in enumerate(a) if x == "-device"]
    assert devs[0] == "virtio-blk-pci,drive=omroot,id=omroot,bootindex=0"  # root first, SeaBIOS boots it
    assert "virtio-blk-pci,drive=omseed,id=omseed" in devs
    net = a[a.index("-netdev") + 1]
    assert net == "user,id=omnet,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22"
    assert any("read-only=on" in x and "omseed" in x for x in a)
    with pytest.raises(ValueError):
        om.qemu_extra_args(Path("/tmp/a,b"), tmp_path / "s", 22)


@pytest.fixture
def base_image(tmp_path, monkeypatch) -> Path:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed (make setup installs qemu-utils)")
    base = tmp_path / "omnios-stand-in.qcow2"  # an empty qcow2 standing in for the image: never booted here
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    monkeypatch.setenv("OMNIOS_IMAGE", str(base))
    return base


def test_session_command_line_and_overlay(tmp_path, base_image):
    from harness.controller import GuestSession

    prof = om.OmniosGuest(run_dir=tmp_path / "run")
    s = GuestSession(profile=prof, dump_disk=tmp_path / "dump.img", accel="tcg", workdir=tmp_path / "w")
    argv = s.command_line()
    joined = " ".join(argv)
    assert "-kernel" not in argv and "q35,accel=tcg" in joined
    assert "virtio-blk-pci,drive=pddump-fmt,id=pddump,serial=pddump" in argv  # the dump disk, second virtio disk
    assert f"filename={tmp_path / 'run' / 'overlay.qcow2'}" in joined
    assert argv.index("-serial") > 0 and "hostfwd=tcp:127.0.0.1:" in joined and "restrict=on" in joined
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(tmp_path / "run" / "overlay.qcow2")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert info["format"] == "qcow2" and info["backing-filename"] == str(base_image.resolve())
    assert info["backing-filename-format"] == "qcow2"
    pub = (tmp_path / "run" / "id_ed25519.pub").read_text()
    assert pub.startswith("ssh-ed25519 ") and (tmp_path / "run" / "id_ed25519").stat().st_mode & 0o077 == 0
    assert prof.triggers == ("uadmin", "dtrace", "nmi") and prof.panic_detection == "console"
    with pytest.raises(ValueError, match="no guest knobs"):
        prof.boot_spec({"panic_print": "1"})


def test_profile_is_registered():
    assert type(get_profile("omnios")).__name__ == "OmniosGuest"


def test_console_patterns_on_recorded_lines():
    p = om.OmniosGuest()
    ready = p.ready_patterns()[0].regex
    m = ready.search(b"runnervmg1sw1.local console login: ")  # mxmlnkn/mfusepy#36, an r151056 serial console
    assert m and m.group(1) == b"runnervmg1sw1.local"
    start, end = p.panic_patterns()
    m = start.regex.search(
        b"panic[cpu0]/thread=fffffe09186d6be0: BAD TRAP: type=e (#pf Page fault) rp=fffffe000c416c50 addr=0"
    )
    assert m and m.group(1).startswith(b"BAD TRAP: type=e")
    assert end.regex.search(b"skipping system dump - no dump device configured")
    assert p.ready_patterns()[1].failure and p.ready_patterns()[1].regex.search(b"panic[cpu0]/thread=ff: x")


# ---- the seed --------------------------------------------------------------------------
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHsomekeymaterialonlyfortests progdump-controller"


def test_seed_fields_per_the_fat_spec(tmp_path):
    img = write_seed(tmp_path / "seed.img", KEY, "iid-7").read_bytes()
    assert len(img) == 1474560 and img[510:512] == b"\x55\xaa"
    assert struct.unpack_from("<HBHBHHBH", img, 11) == (512, 1, 1, 2, 224, 2880, 0xF0, 9)
    assert img[38] == 0x29 and img[43:54] == b"CIDATA     " and img[54:62] == b"FAT12   "
    assert img[19 * 512 : 19 * 512 + 11] == b"CIDATA     " and img[19 * 512 + 11] == 0x08  # root dir: volume label
    assert img[512:515] == b"\xf0\xff\xff" and img[512 : 512 + 4608] == img[5120 : 5120 + 4608]  # media byte, two FATs


@pytest.mark.skipif(
    shutil.which("mtype") is None,
    reason="mtools not installed (make setup installs it): the seed is not read back by an independent FAT reader",
)
def test_seed_read_back_by_mtools(tmp_path):
    seed = write_seed(tmp_path / "seed.img", KEY, "iid-7")
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    ud = subprocess.run(["mtype", "-i", str(seed), "::user-data"], capture_output=True, check=True, env=env).stdout
    md = subprocess.run(["mtype", "-i", str(seed), "::meta-data"], capture_output=True, check=True, env=env).stdout
    assert ud.startswith(b"#cloud-config\n") and KEY.encode() in ud and b"nmi=panic" in ud
    assert md == b"instance-id: iid-7\nlocal-hostname: omnios\n"
    label = subprocess.run(["mlabel", "-s", "-i", str(seed), "::"], capture_output=True, text=True, env=env).stdout
    assert "CIDATA" in label
    big = fat12_image({"user-data": b"x" * 300_000, "meta-data": b"m"})
    (tmp_path / "big.img").write_bytes(big)
    out = subprocess.run(
        ["mtype", "-i", str(tmp_path / "big.img"), "::user-data"], capture_output=True, check=True, env=env
    ).stdout
    assert out == b"x" * 300_000  # a cluster chain of 586 clusters


def test_seed_refuses_what_cannot_be_stored():
    with pytest.raises(FatError):
        fat12_image({"user-data": b"x" * 2_000_000})
    with pytest.raises(ValueError):
        user_data("ssh-ed25519 AAAA\nrm -rf /")


# ---- the SSH host key pin ---------------------------------------------------------------
def test_ssh_pin_waits_for_a_stable_key_then_holds_it(tmp_path):
    pin = om.SshPin(tmp_path / "pin")
    assert not pin.observe("ssh-ed25519", "AAAA-first-boot-key")  # cloud-init replaces it
    assert not pin.observe("ssh-ed25519", "BBBB-final")
    assert not pin.observe("ssh-ed25519", "BBBB-final")
    assert pin.observe("ssh-ed25519", "BBBB-final")
    assert (tmp_path / "pin").read_text() == "ssh-ed25519 BBBB-final\n"
    again = om.SshPin(tmp_path / "pin")  # survives a reset (same run dir)
    assert again.observe("ssh-ed25519", "BBBB-final")
    with pytest.raises(BootError, match="host key changed"):
        again.observe("ssh-ed25519", "CCCC-intruder")


# ---- fetching an image -------------------------------------------------------------------
def test_image_url_and_sidecar():
    assert omfetch.image_url("r151058") == "https://downloads.omnios.org/media/r151058/omnios-r151058.cloud.qcow2"
    assert omfetch.image_url("r151056", directory="stable").endswith("/media/stable/omnios-r151056.cloud.qcow2")
    with pytest.raises(omfetch.FetchError):
        omfetch.image_url("../../etc")
    h = "ab" * 32
    assert omfetch.parse_sha256_sidecar(h + "\n", "x.qcow2") == h
    assert omfetch.parse_sha256_sidecar(f"{'cd' * 32}  other\n{h}  x.qcow2\n", "x.qcow2") == h
    assert omfetch.parse_sha256_sidecar(f"SHA256 (x.qcow2) = {h.upper()}\n", "x.qcow2") == h
    for bad in ("", "nothex\n", f"{h}  other.qcow2\n"):
        with pytest.raises(omfetch.FetchError):
            omfetch.parse_sha256_sidecar(bad, "x.qcow2")


def test_fetch_verifies_the_published_hash(tmp_path):
    # a stand-in "image" served over file:// (fake data; the https path is the same code)
    media = tmp_path / "media" / "r151058"
    media.mkdir(parents=True)
    data = b"QFI\xfb" + os.urandom(300_000)
    (media / "omnios-r151058.cloud.qcow2").write_bytes(data)
    (media / "omnios-r151058.cloud.qcow2.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    out = tmp_path / "out"
    dest = omfetch.fetch("r151058", out, f"file://{tmp_path / 'media'}", log=lambda s: None)
    assert dest.read_bytes() == data
    man = json.loads((out / "manifest.json").read_text())
    assert man["sha256"] == hashlib.sha256(data).hexdigest() and man["path"] == dest.name
    (media / "omnios-r151058.cloud.qcow2.sha256").write_text("00" * 32 + "\n")
    dest.unlink()
    with pytest.raises(omfetch.FetchError, match="does not match"):
        omfetch.fetch("r151058", out, f"file://{tmp_path / 'media'}", log=lambda s: None)
    assert not dest.exists() and not list(out.glob("*.part"))
    with pytest.raises(omfetch.FetchError, match="cannot fetch"):
        omfetch.fetch("r151056", out, f"file://{tmp_path / 'media'}", log=lambda s: None)


class _Cmds:
    """A test-only stand-in for the SSH command runner: records each command and answers from a table."""

    def __init__(self, answers: dict[str, tuple[int, str]]) -> None:
        self.answers = answers
        self.ran: list[str] = []

    async def __call__(self, machine, cmd, timeout):
        from harness.qemu.cmdchan import CommandResult

        self.ran.append(cmd)
        status, text = self.answers.get(cmd, (127, "not found"))
        return CommandResult(status, text.encode(), 0.0)


def _prepare(answers: dict[str, tuple[int, str]], trigger: str) -> tuple[list[str], BaseException | None]:
    import asyncio
    from types import SimpleNamespace

    prof = om.OmniosGuest()
    cmds = _Cmds(answers)
    prof.run_command = cmds  # type: ignore[method-assign]
    machine = SimpleNamespace(t=SimpleNamespace(command=30.0))
    try:
        asyncio.run(prof.prepare_trigger(trigger, machine))
        return cmds.ran, None
    except Exception as e:  # noqa: BLE001 - returned for the test to check
        return cmds.ran, e


MDB_NMI = "echo 'nmi_action::print' | mdb -k"


def test_the_guests_own_dump_is_turned_off_before_every_trigger():
    for trig in ("uadmin", "dtrace"):
        ran, err = _prepare({"dumpadm -d none": (0, "")}, trig)
        assert err is None and ran == ["dumpadm -d none"]
    ran, err = _prepare({"dumpadm -d none": (1, "dumpadm: permission denied")}, "uadmin")
    assert isinstance(err, om.PanicError) and "dumpadm -d none failed" in str(err) and "permission denied" in str(err)


def test_nmi_needs_the_running_kernel_to_panic_on_nmi():
    ok = {"dumpadm -d none": (0, ""), MDB_NMI: (0, "NMI_ACTION_PANIC\n")}
    ran, err = _prepare(ok, "nmi")
    assert err is None and ran == ["dumpadm -d none", MDB_NMI]
    # first boot: the loader file is written but the kernel still has the default
    ran, err = _prepare({"dumpadm -d none": (0, ""), MDB_NMI: (0, "NMI_ACTION_UNSET\n")}, "nmi")
    assert isinstance(err, om.PanicError) and "NMI_ACTION_UNSET" in str(err) and "after a reboot" in str(err)
    ran, err = _prepare({"dumpadm -d none": (0, ""), MDB_NMI: (1, "mdb: failed to open kmem")}, "nmi")
    assert isinstance(err, om.PanicError) and "unreadable" in str(err)


def test_nmi_action_parser_takes_only_the_enum_name():
    assert om.nmi_action_from_mdb("NMI_ACTION_PANIC\n") == "NMI_ACTION_PANIC"
    assert om.nmi_action_from_mdb("0t2 (NMI_ACTION_KMDB)") == "NMI_ACTION_KMDB"
    assert om.nmi_action_from_mdb("mdb: no symbol nmi_action") is None
    assert om.nmi_action_from_mdb("x" * 10000 + "NMI_ACTION_PANIC") is None  # bounded read
