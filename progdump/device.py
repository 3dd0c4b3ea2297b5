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

from abc import ABC, abstractmethod

__all__ = ["DeviceError", "DumpDevice"]


class DeviceError(Exception):
    """The dump device cannot be used or failed an I/O; the message says which and why."""


class DumpDevice(ABC):
    size: int
    sector_size: int = 512
    path: str = ""

    @abstractmethod
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    @abstractmethod
    def flush(self) -> None: ...

    def mark(self, label: str) -> None:
        """Record a layer boundary (used by traced devices)."""

    @abstractmethod
    def clock(self) -> float: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "DumpDevice":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
