"""Console reports: what a guest's console log says about a panic, per OS.

Why a package of its own: the harness watches consoles line by line (see
:mod:`harness.qemu.console`), but a *report* reads a whole log after the
fact (a recorded ``console.log``, a syslog excerpt pasted into a bug) and
must survive what real logs carry. Each OS module is pure: text in, a
report out; nothing here touches QEMU.
"""

from harness.consolereport.illumos import IllumosReport, parse_illumos

__all__ = ["IllumosReport", "parse_illumos"]
