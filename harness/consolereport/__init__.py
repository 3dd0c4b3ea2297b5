"""Console reports: what a guest's console log says about a panic, per OS.

Why a package of its own: the harness watches consoles line by line (see
:mod:`harness.qemu.console`), but a *report* reads a whole log after the
fact (a recorded ``console.log``, a syslog excerpt pasted into a bug) and
must survive what real logs carry. Each OS parser is pure: text in, a
report out. The illumos one lives in ``progdump/layers/illumos/console.py``
because the illumos producer reads the console tail with it too (progdump
never imports the harness); it is re-exported here.
"""

from progdump.layers.illumos.console import IllumosReport, parse_illumos

__all__ = ["IllumosReport", "parse_illumos"]
