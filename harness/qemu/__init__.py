"""Everything that talks to QEMU (see docs/GUESTS.md).

- :mod:`harness.qemu.argv`     pure ``MachineConfig`` -> argv (``--show-command``)
- :mod:`harness.qemu.machine`  async ``Machine`` on qemu.qmp: launch, events, hot-plug, quit
- :mod:`harness.qemu.console`  bounded console buffer, pattern waits, reader
- :mod:`harness.qemu.cmdchan`  the guest command channel (virtio-serial)
- :mod:`harness.qemu.hmp`      parsers for ``info registers -a`` and ``info mtree -f``
- :mod:`harness.qemu.capture`  paused machine -> progdump Snapshot
- :mod:`harness.qemu.accel`    KVM only after a probe boot, else TCG
"""
