"""Crash states from write traces: enumerate, replay against the reader, narrow failures.

``trace``: read a ModelledDevice trace. ``states``: crash states as pure,
seeded, deduplicated functions of (trace, t). ``overlay``: a read-only view of
(base image + the writes a state keeps) that the reader scans without a full
image. ``replay``: run the reader over many states and classify outcomes.
``narrow``: shrink a failing state to the write that breaks it.
"""
