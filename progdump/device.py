"""DumpDevice: where the writer puts bytes, and the only way it touches storage.

The writer calls :meth:`DumpDevice.write`, :meth:`DumpDevice.flush`,
:meth:`DumpDevice.mark` and reads :meth:`DumpDevice.clock`; nothing else.
Backends:

* :class:`FileDevice` (this module): an existing regular file or block device,
  O_DIRECT where the platform and alignment allow, ``fdatasync`` for flush.
* the modelled device (:mod:`progdump.devmodel`): bandwidth, latency, flush
  cost, a volatile write cache that is lost with the writer, sector size; it
  paces the writer in real time and records a write trace with MARKs.

Contract for every backend (the writer relies on it):

* ``offset`` and ``len(data)`` are multiples of ``sector_size``; a write past
  ``size`` raises :class:`DeviceError`.
* Data written before a ``flush()`` that returned is durable.
* ``mark(label)`` records a layer boundary in the trace (a no-op elsewhere).
* ``clock()`` is seconds since the device was opened, monotonic; a modelled
  device returns modelled time so figures match the model, not the host.
"""

from __future__ import annotations

import errno as _errno
import mmap as _mmap
import os as _os
import stat as _stat
import time as _time
from abc import ABC, abstractmethod

from progdump.errors import ProgdumpError

__all__ = ["DeviceError", "MediaError", "DumpDevice", "FileDevice", "MIN_DEVICE_SIZE"]


class DeviceError(ProgdumpError):
    """The dump device cannot be used or failed an I/O; the message says which and why."""


class MediaError(DeviceError):
    """One write failed on the medium (EIO): that extent is bad, the device is still usable.

    Why a class of its own: the writer carries on past a bad region (FORMAT.md
    R-WR-7) but must stop on anything else (device gone, closed, misuse).
    ``offset``/``length`` are the failed write's.
    """

    def __init__(self, message: str, offset: int, length: int) -> None:
        super().__init__(message)
        self.offset = offset
        self.length = length


#: errnos of a write that mean "this extent failed", not "the device is gone"
MEDIA_ERRNOS = frozenset(
    {_errno.EIO, _errno.EILSEQ, getattr(_errno, "EBADMSG", _errno.EIO), getattr(_errno, "ENODATA", _errno.EIO)}
)


class DumpDevice(ABC):
    size: int
    sector_size: int = 512
    path: str = ""

    @abstractmethod
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    @abstractmethod
    def flush(self) -> None: ...

    def mark(self, label: str) -> None:
        """Record a layer boundary (used by traced devices; a plain device keeps none)."""
        return None

    @abstractmethod
    def clock(self) -> float: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> DumpDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# FileDevice: an existing regular file or block device

BLKSSZGET = 0x1268  # ioctl: logical sector size of a Linux block device

#: smallest device a dump fits on (two header copies and a few records)
MIN_DEVICE_SIZE = 16 * 1024


class FileDevice(DumpDevice):
    """An existing regular file or block device, written in place.

    Why O_DIRECT: a dump must reach the device, not the host's page cache, and
    should not evict the page cache holding the snapshot it reads. Where the
    file system refuses O_DIRECT (tmpfs) the device is opened without it;
    ``fdatasync`` on :meth:`flush` makes writes durable either way. Writes are
    copied into a page-aligned mmap buffer, which O_DIRECT requires.
    """

    BUFFER = 4 << 20

    def __init__(self, path: str, *, direct: bool = True, min_size: int = MIN_DEVICE_SIZE) -> None:
        self.path = _os.fspath(path)
        try:
            st = _os.stat(self.path)
        except OSError as e:
            raise DeviceError(f"{self.path}: {e.strerror or e}") from None
        if not (_stat.S_ISREG(st.st_mode) or _stat.S_ISBLK(st.st_mode)):
            raise DeviceError(f"{self.path}: not a regular file or block device")
        self.direct = False
        self._fd = -1
        # O_NONBLOCK: a FIFO swapped in after the stat above must not block the open;
        # what was opened is checked again below with fstat.
        flags = _os.O_RDWR | getattr(_os, "O_CLOEXEC", 0) | getattr(_os, "O_NONBLOCK", 0)
        if direct and hasattr(_os, "O_DIRECT"):
            try:
                self._fd = _os.open(self.path, flags | _os.O_DIRECT)
                self.direct = True
            except OSError as e:
                if e.errno not in (_errno.EINVAL, _errno.EOPNOTSUPP):
                    raise DeviceError(f"{self.path}: {e.strerror or e}") from None
        if self._fd < 0:
            try:
                self._fd = _os.open(self.path, flags)
            except OSError as e:
                raise DeviceError(f"{self.path}: {e.strerror or e}") from None
        try:
            st = _os.fstat(self._fd)
        except OSError as e:
            _os.close(self._fd)
            raise DeviceError(f"{self.path}: {e.strerror or e}") from None
        if not (_stat.S_ISREG(st.st_mode) or _stat.S_ISBLK(st.st_mode)):
            _os.close(self._fd)
            raise DeviceError(f"{self.path}: not a regular file or block device (replaced while opening)")
        self.is_block = _stat.S_ISBLK(st.st_mode)  # of what was opened, not of the name a moment before
        try:
            if hasattr(_os, "O_NONBLOCK"):
                import fcntl

                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_os.O_NONBLOCK)
            self.size = _os.lseek(self._fd, 0, _os.SEEK_END)
            self.sector_size = 512
            if self.is_block:
                try:
                    import fcntl
                    import struct

                    self.sector_size = struct.unpack("i", fcntl.ioctl(self._fd, BLKSSZGET, b"\0" * 4))[0] or 512
                except (OSError, ImportError):
                    pass
                if self.sector_size not in (512, 1024, 2048, 4096):  # FORMAT.md R-REC-1: A divides 4096
                    _os.close(self._fd)
                    raise DeviceError(f"{self.path}: sector size {self.sector_size} is not 512, 1024, 2048 or 4096")
        except OSError as e:
            _os.close(self._fd)
            raise DeviceError(f"{self.path}: {e.strerror or e}") from None
        if self.size < min_size:
            _os.close(self._fd)
            raise DeviceError(f"{self.path}: device is {self.size} bytes; a dump needs at least {min_size}")
        self._buf = _mmap.mmap(-1, self.BUFFER) if self.direct else None
        self._t0 = _time.monotonic()
        self._closed = False

    def clock(self) -> float:
        """Monotonic seconds since the device was opened."""
        return _time.monotonic() - self._t0

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise DeviceError(f"{self.path}: device is closed")
        mv = memoryview(data).cast("B")
        n = len(mv)
        if offset < 0 or offset % self.sector_size or n % self.sector_size:
            raise DeviceError(f"{self.path}: write at {offset:#x}+{n:#x} not aligned to {self.sector_size} bytes")
        if offset + n > self.size:
            raise DeviceError(f"{self.path}: write at {offset:#x}+{n:#x} past the end ({self.size:#x})")
        done = 0
        while done < n:
            if self._buf is not None:
                k = min(n - done, self.BUFFER)
                self._buf[:k] = mv[done : done + k]
                src: memoryview | _mmap.mmap = memoryview(self._buf)[:k]
            else:
                k = n - done
                src = mv[done:]
            try:
                w = _os.pwrite(self._fd, src, offset + done)
            except OSError as e:
                if e.errno == _errno.EINVAL and self._buf is not None:
                    self._reopen_buffered()
                    continue
                msg = f"{self.path}: write of {k} bytes at {offset + done:#x}: {e.strerror or e}"
                if e.errno in MEDIA_ERRNOS:
                    raise MediaError(msg, offset, n) from None
                raise DeviceError(msg) from None
            finally:
                if isinstance(src, memoryview):
                    src.release()
            if w <= 0:
                raise DeviceError(f"{self.path}: short write at {offset + done:#x}")
            done += w

    def _reopen_buffered(self) -> None:
        """O_DIRECT refused an I/O (alignment the file system wants is larger): go buffered."""
        fd = _os.open(self.path, _os.O_RDWR | getattr(_os, "O_CLOEXEC", 0))
        _os.close(self._fd)
        self._fd = fd
        self.direct = False
        if self._buf is not None:
            self._buf.close()
            self._buf = None

    def flush(self) -> None:
        if self._closed:
            raise DeviceError(f"{self.path}: device is closed")
        try:
            _os.fdatasync(self._fd)
        except OSError as e:
            raise DeviceError(f"{self.path}: flush failed: {e.strerror or e}") from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            _os.close(self._fd)
        finally:
            if self._buf is not None:
                self._buf.close()
                self._buf = None
