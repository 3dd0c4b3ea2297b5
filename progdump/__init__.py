"""progdump: progressive crash dumps (format, writer, reader). No QEMU in here."""

__version__ = "0.1.0"
