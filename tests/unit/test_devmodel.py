"""The modelled device: models load, timing follows the model, the cache dies with the writer.

Most tests drive the device with a fake clock (``now``/``sleep`` injected) and a
memory-backed inner device, so timing is exact; one test uses real sleeps and
checks only that host time never runs ahead of the model by more than the
measured pacing lateness (no timing assertions beyond that).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from progdump.device import DeviceError, DumpDevice
from progdump.devmodel import (
    F_FAILED,
    K_DESTAGE,
    K_FLUSH,
    K_MARK,
    K_WRITE,
    DeviceModel,
    FaultRegion,
    ModelledDevice,
    load_models,
    parse_models,
)


class MemDevice(DumpDevice):
    """A fake inner device in memory (unit tests only)."""

    def __init__(self, size: int, sector: int = 512) -> None:
        self.buf = bytearray(size)
        self.size = size
        self.sector_size = sector
        self.path = "mem"
        self.flushes = 0

    def write(self, offset, data):
        self.buf[offset : offset + len(data)] = data

    def flush(self):
        self.flushes += 1

    def clock(self):
        return 0.0

    def close(self):
        pass


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def now(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        assert s >= 0
        self.t += s


def _model(**kw) -> DeviceModel:
    base = dict(name="t", bandwidth=1e6, latency=1e-3, seek=5e-3, flush=10e-3, cache=8192, sector_size=512)
    base.update(kw)
    return DeviceModel(**base)


def test_shipped_models_have_required_names_and_sane_values():
    models = load_models()
    for name in ("nvme", "sata-ssd", "hdd", "iscsi-1g", "slow"):
        m = models[name]
        assert m.bandwidth > 0 and m.flush >= 0 and m.cache > 0 and m.sector_size >= 512
    assert models["slow"].bandwidth < 10e6  # "a few MB/s"
    assert models["nvme"].bandwidth > models["sata-ssd"].bandwidth > models["iscsi-1g"].bandwidth
    assert models["nvme-failing"].faults and models["nvme-failing"].bandwidth == models["nvme"].bandwidth


def test_every_model_value_has_a_source_comment():
    from importlib import resources

    text = resources.files("progdump").joinpath("device-models.toml").read_text()
    for line in text.splitlines():
        s = line.strip()
        if (
            s
            and not s.startswith(("#", "["))
            and "=" in s
            and s.split("=")[0].strip() not in ("description", "base", "seek_ms")
        ):
            assert "#" in s, f"value without a source comment: {s}"


def test_parse_models_errors_name_the_model():
    with pytest.raises(ValueError, match="'x'.*missing"):
        parse_models("[x]\nbandwidth_mb_s = 1\n")
    with pytest.raises(ValueError, match="sector_size"):
        parse_models("[x]\nbandwidth_mb_s=1\nlatency_us=1\nflush_ms=1\ncache_mib=1\nsector_size=1000\n")
    with pytest.raises(ValueError, match="unknown base"):
        parse_models("[x]\nbase='nope'\n")


def test_write_and_flush_timing_follow_the_model():
    clk = FakeClock()
    inner = MemDevice(1 << 20)
    dev = ModelledDevice(inner, _model(), now=clk.now, sleep=clk.sleep)
    dev.write(0, b"a" * 4096)  # first write: not sequential -> seek
    assert dev.clock() == pytest.approx(1e-3 + 5e-3 + 4096 / 1e6)
    t1 = dev.clock()
    dev.write(4096, b"b" * 4096)  # sequential: no seek
    assert dev.clock() - t1 == pytest.approx(1e-3 + 4096 / 1e6)
    t2 = dev.clock()
    dev.flush()
    assert dev.clock() - t2 == pytest.approx(10e-3)
    # pacing: host time (fake) caught up with modelled time exactly
    assert clk.t - 100.0 == pytest.approx(dev.clock())
    # writer CPU time passes on the modelled clock too
    clk.t += 0.5
    t3 = dev.clock()
    dev.write(8192, b"c" * 512)
    assert dev.clock() == pytest.approx(t3 + 1e-3 + 512 / 1e6)


def test_cache_is_volatile_until_flush_and_destages_oldest_first_when_full():
    clk = FakeClock()
    inner = MemDevice(1 << 20)
    dev = ModelledDevice(inner, _model(cache=8192), now=clk.now, sleep=clk.sleep)
    dev.write(0, b"1" * 4096)
    dev.write(4096, b"2" * 4096)
    assert inner.buf[:8192] == bytes(8192)  # all in the volatile cache
    assert dev.cached_bytes == 8192
    dev.write(8192, b"3" * 4096)  # over the cache size: the oldest write destages
    assert inner.buf[:4096] == b"1" * 4096 and inner.buf[4096:12288] == bytes(8192)
    dev.flush()
    assert inner.buf[:12288] == b"1" * 4096 + b"2" * 4096 + b"3" * 4096
    assert dev.cached_bytes == 0
    dev.write(0, b"4" * 512)
    dev.abandon()  # power loss: the unflushed write never reaches the media
    assert inner.buf[:512] == b"1" * 512


def test_alignment_bounds_and_faults():
    clk = FakeClock()
    inner = MemDevice(1 << 20)
    m = _model(faults=(FaultRegion(0.5, 4096),), error=0.2)
    dev = ModelledDevice(inner, m, now=clk.now, sleep=clk.sleep)
    with pytest.raises(DeviceError, match="aligned"):
        dev.write(100, b"x" * 512)
    with pytest.raises(DeviceError, match="past the end"):
        dev.write((1 << 20) - 512, b"x" * 1024)
    t = dev.clock()
    with pytest.raises(DeviceError, match="I/O error"):
        dev.write(512 * 1024, b"x" * 512)
    assert dev.clock() - t == pytest.approx(1e-3 + 0.2)
    dev.write(512 * 1024 + 4096, b"y" * 512)  # past the bad region: fine
    dev.close()
    assert inner.buf[512 * 1024 : 512 * 1024 + 512] == bytes(512)
    assert inner.buf[512 * 1024 + 4096 : 512 * 1024 + 4608] == b"y" * 512


def test_trace_records_writes_flushes_marks_and_destages(tmp_path):
    from harness.crashsim.trace import read_trace

    clk = FakeClock()
    inner = MemDevice(1 << 20)
    m = _model(cache=4096, faults=(FaultRegion(0.75, 4096),))
    dev = ModelledDevice(inner, m, str(tmp_path / "t"), now=clk.now, sleep=clk.sleep)
    dev.write(0, b"a" * 4096)
    dev.write(4096, b"b" * 4096)  # destages seq 0
    dev.mark("layer 0 panic")
    dev.flush()
    with pytest.raises(DeviceError):
        dev.write(768 * 1024, b"z" * 512)
    dev.close()
    tr = read_trace(str(tmp_path / "t"))
    kinds = [(r.kind, r.seq) for r in tr.records]
    assert kinds[:5] == [(K_WRITE, 0), (K_WRITE, 1), (K_DESTAGE, 0), (K_MARK, 2), (K_DESTAGE, 1)]
    assert (K_FLUSH, 3) in kinds
    w = tr.writes[1]
    assert tr.data(w) == b"b" * 4096 and w.t_complete > w.t_submit
    failed = [r for r in tr.records if r.kind == K_WRITE and r.flags & F_FAILED]
    assert len(failed) == 1 and failed[0].offset == 768 * 1024
    assert tr.marks[0].label == "layer 0 panic"
    assert tr.header["model"]["name"] == "t" and not tr.truncated


def test_killed_writer_loses_its_cache_and_trace_stays_readable(tmp_path):
    """A real child process, SIGKILLed: what was not destaged never reaches the file."""
    from harness.crashsim.trace import read_trace
    from progdump.device import DumpDevice

    img = tmp_path / "img"
    img.write_bytes(bytes(1 << 20))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: write through a modelled device, report, then wait to be killed
        try:
            os.close(r)

            class FileDev(DumpDevice):
                def __init__(self, p):
                    self.fd = os.open(p, os.O_RDWR)
                    self.size = 1 << 20
                    self.path = str(p)

                def write(self, off, data):
                    os.pwrite(self.fd, data, off)

                def flush(self):
                    pass

                def clock(self):
                    return 0.0

                def close(self):
                    os.close(self.fd)

            dev = ModelledDevice(
                FileDev(img), _model(bandwidth=1e9, latency=0, seek=0, flush=0, cache=1 << 16), str(tmp_path / "tr")
            )
            dev.write(0, b"F" * 4096)
            dev.flush()
            dev.write(4096, b"U" * 4096)  # acknowledged, only in the cache
            os.write(w, b"k")
            time.sleep(30)
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"k"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    data = img.read_bytes()
    assert data[:4096] == b"F" * 4096
    assert data[4096:8192] == bytes(4096)  # lost with the writer
    tr = read_trace(str(tmp_path / "tr"))
    assert [w.seq for w in tr.writes] == [0, 2]
    assert tr.destaged_seqs() == {0}


def test_real_time_pacing_tracks_the_model():
    """Real sleeps: host time ends at or after modelled time; lateness is measured, not asserted."""
    inner = MemDevice(1 << 22)
    dev = ModelledDevice(inner, _model(bandwidth=50e6, latency=2e-3, flush=5e-3, cache=1 << 20))
    t0 = time.monotonic()
    for i in range(8):
        dev.write(i * 65536, bytes(65536))
    dev.flush()
    host = time.monotonic() - t0
    modelled = 8 * (2e-3 + 65536 / 50e6) + 5e-3 + 5e-3  # + one seek for the first write
    assert host >= modelled * 0.999
    assert dev.clock() >= modelled * 0.999
    assert dev.stats.writes == 8 and dev.stats.flushes == 1 and dev.stats.sleeps >= 1
    assert dev.stats.max_late_s >= 0.0
