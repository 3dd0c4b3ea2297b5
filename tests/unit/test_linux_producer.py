"""The producer never lets an exception out of panic()/tasks() (guest memory is untrusted).

The unexpected failure is simulated by replacing the internal step with one
that raises: a fake in a test of the code around it.
"""

from __future__ import annotations

from test_linux_image import Image

from progdump.layers.base import Producer
from progdump.layers.linux import LinuxProducer


def bare_producer() -> LinuxProducer:
    p = LinuxProducer.__new__(LinuxProducer)
    Producer.__init__(p, Image(size=16 << 20).snapshot(console_tail=b"Kernel panic - not syncing: boom\n"))
    return p


def test_panic_failure_degrades_to_generic_output_with_reason() -> None:
    p = bare_producer()

    def explode() -> None:
        raise struct_error("unpack requires a buffer of 8 bytes")

    p._panic = explode  # type: ignore[method-assign]
    c = p.panic()
    assert [a.name for a in c.artifacts] == ["panic.txt"]
    assert b"panic: boom" in c.artifacts[0].data  # the generic producer found it on the console
    assert any("linux panic() failed: error: unpack requires" in n for n in c.notes)
    assert p.degraded and "generic output used" in p.degraded[0]


def test_tasks_failure_degrades_with_reason() -> None:
    p = bare_producer()
    p._tasks = lambda: 1 // 0  # type: ignore[method-assign,assignment,return-value]
    c = p.tasks()
    assert c.artifacts == [] and any("ZeroDivisionError" in n for n in c.notes)


def struct_error(msg: str) -> Exception:
    import struct

    return struct.error(msg)
