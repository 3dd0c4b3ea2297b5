"""FileDevice and open_device: existing file or block device, O_DIRECT where possible, clear errors."""

from __future__ import annotations

import os

import pytest

from progdump.device import DeviceError, FileDevice
from progdump.devmodel import open_device


def test_file_device_writes_in_place_and_flushes(tmp_path):
    p = tmp_path / "dev.img"
    p.write_bytes(b"\xaa" * (1 << 20))
    d = FileDevice(str(p))
    assert d.size == 1 << 20 and d.sector_size == 512
    d.write(4096, b"x" * 8192)
    d.flush()
    t1 = d.clock()
    assert t1 >= 0 and d.clock() >= t1
    d.close()
    data = p.read_bytes()
    assert data[4096 : 4096 + 8192] == b"x" * 8192 and data[:4096] == b"\xaa" * 4096 and len(data) == 1 << 20


def test_file_device_unaligned_and_past_end_refused(tmp_path):
    p = tmp_path / "dev.img"
    p.write_bytes(bytes(64 << 10))
    with FileDevice(str(p)) as d:
        with pytest.raises(DeviceError, match="aligned"):
            d.write(100, b"x" * 512)
        with pytest.raises(DeviceError, match="past the end"):
            d.write(63 << 10, b"x" * 2048)


def test_file_device_large_write_through_direct_buffer(tmp_path):
    p = tmp_path / "dev.img"
    p.write_bytes(bytes(16 << 20))
    payload = os.urandom(FileDevice.BUFFER + 8192)
    with FileDevice(str(p)) as d:
        d.write(512, payload)
        d.flush()
    assert p.read_bytes()[512 : 512 + len(payload)] == payload


@pytest.mark.parametrize("case", ["missing", "dir", "small"])
def test_file_device_errors_are_one_line(tmp_path, case):
    p = tmp_path / "dev.img"
    if case == "dir":
        p.mkdir()
    elif case == "small":
        p.write_bytes(bytes(4096))
    with pytest.raises(DeviceError) as e:
        FileDevice(str(p))
    assert "\n" not in str(e.value) and str(p) in str(e.value)


def test_open_device_model_and_trace(tmp_path):
    p = tmp_path / "dev.img"
    p.write_bytes(bytes(1 << 20))
    d = open_device(str(p))
    assert isinstance(d, FileDevice)
    d.close()
    trace = tmp_path / "t.trace"
    d = open_device(str(p), "nvme", str(trace))
    d.write(0, b"y" * 512)
    d.flush()
    d.mark("layer 0 panic committed")
    d.close()
    assert trace.stat().st_size > 4096
    with pytest.raises(DeviceError, match="unknown device model"):
        open_device(str(p), "no-such-model")
    with pytest.raises(DeviceError, match="trace"):
        open_device(str(p), None, str(trace))
