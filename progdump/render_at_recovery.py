"""Text that layer 0 holds as raw pages, rendered when a dump is recovered (issue 13).

A plan whose first layer is ``panic-raw`` stores the pages the panic text is
made of, not the text. When the recovered layers include no ``panic.txt``
(only layer 0 survived), :func:`render_missing` opens the recovered
``vmcore`` and asks the OS package that understands it to render
``panic.txt`` and ``dmesg.txt`` into the output directory. Called from
:func:`progdump.export.export`; never raises: what fails becomes a warning.
"""

from __future__ import annotations

import os

__all__ = ["render_missing"]


def render_missing(vmcore: str, outdir: str, have: set[str] | dict[str, int], warnings: list[str]) -> dict[str, int]:
    """Write the rendered files not in ``have``; return ``{name: 0}`` for each written (from layer 0's pages)."""
    written: dict[str, int] = {}
    if "panic.txt" in have or not os.path.exists(vmcore):
        return written
    try:
        from progdump.elfcore import load_elf_snapshot  # noqa: PLC0415

        with load_elf_snapshot(vmcore) as snap:
            if snap.vmcoreinfo_raw is None:
                return written
            from progdump.layers.linux.recovery import render_from_pages  # noqa: PLC0415

            files, notes = render_from_pages(snap)
    except Exception as e:  # noqa: BLE001 - recovery output must not fail on a rendering problem
        warnings.append(f"panic.txt not rendered from layer 0's pages: {type(e).__name__}: {e}")
        return written
    for name, data in files.items():
        if name in have:
            continue
        with open(os.path.join(outdir, name), "wb") as f:
            f.write(data)
        written[name] = 0
    if written:
        warnings.append(f"{', '.join(sorted(written))} rendered at recovery from layer 0's raw pages")
    return written
