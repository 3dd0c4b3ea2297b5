"""Crash states: which writes of a trace a device holds after a reset at time t.

A crash state is a pure function of ``(trace, t, kind, seed)``; calling
:func:`crash_state` again with the row's values rebuilds it bit for bit, so
any result row replays exactly. The rules (DESIGN.md, "Crash state"):

* every write covered by a FLUSH that completed at or before ``t`` persists;
* writes acknowledged (completed at or before ``t``) but not yet flushed
  persist as a random subset (a drive destages its cache in any order);
* at most one write is torn, at sector granularity: the write in flight at
  ``t`` if there is one, else (kind ``torn``) the newest unflushed write;
* writes submitted after ``t`` are absent; everywhere else the device's
  previous content (an older dump) shows through.

Kinds:

``prefix``  only the flushed writes (the state right at a flush barrier);
``random``  flushed + a random subset of the unflushed + maybe the in-flight write
            kept whole, dropped or torn;
``torn``    like ``random`` but a torn write is guaranteed when one is possible;
``model``   exactly what the modelled device had destaged by ``t`` (DESTAGE
            records): the one state the real trial should reproduce.

:func:`enumerate_states` draws a deduplicated set of states covering every
flush barrier, both sides of every layer commit (MARK), and random times over
the whole trace.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator
from dataclasses import dataclass

import xxhash

from harness.crashsim.trace import Rec, Trace

__all__ = ["CrashState", "crash_state", "enumerate_states", "committed_marks", "KINDS", "state_seed"]

KINDS = ("prefix", "random", "torn", "model")


@dataclass(frozen=True)
class CrashState:
    """One crash state. ``keep`` are the seqs of writes that persist whole.

    ``torn`` is ``(seq, sector_bitmap)``: the write whose sectors persist only
    where the bitmap (one bit per sector, LSB first) is set. ``flushed_seq``
    is the seq of the newest FLUSH completed by ``t`` (-1 if none): every
    write before it is durable, and the layer commits it covers must survive.
    """

    t: float
    kind: str
    seed: int
    keep: frozenset[int]
    torn: tuple[int, bytes] | None
    flushed_seq: int

    @property
    def key(self) -> str:
        """Identity of the device content (+ durability point) for deduplication."""
        h = xxhash.xxh64()
        h.update(self.flushed_seq.to_bytes(8, "little", signed=True))
        for s in sorted(self.keep):
            h.update(s.to_bytes(8, "little"))
        if self.torn is not None:
            h.update(b"T" + self.torn[0].to_bytes(8, "little") + self.torn[1])
        return h.hexdigest()

    def describe(self) -> str:
        torn = ""
        if self.torn is not None:
            bits = self.torn[1]
            n = sum(bin(b).count("1") for b in bits)
            torn = f", write #{self.torn[0]} torn ({n} sectors kept)"
        return f"{self.kind} t={self.t * 1e3:.3f} ms seed={self.seed}: {len(self.keep)} writes kept{torn}"


def state_seed(master: int, index: int) -> int:
    """Seed of state ``index`` in a run seeded ``master`` (stable across Python versions)."""
    return xxhash.xxh64_intdigest(f"{master}:{index}".encode()) & 0x7FFF_FFFF_FFFF


def _flushed_seq(trace: Trace, t: float) -> int:
    fs = -1
    for f in trace.flushes:
        if f.t_complete <= t and f.seq > fs:
            fs = f.seq
    return fs


def committed_marks(trace: Trace, t: float) -> list[Rec]:
    """MARKs whose every earlier write is covered by a flush completed by ``t``.

    This is writer-order agnostic: whether the writer marks before or after
    the flush that makes its commit record durable, a mark counts once all
    writes submitted before it are flushed.
    """
    fs = _flushed_seq(trace, t)
    seqs = [w.seq for w in trace.writes]  # ascending
    out = []
    for m in trace.marks:
        i = bisect.bisect_left(seqs, m.seq)
        last_before = seqs[i - 1] if i else -1
        if last_before < fs or last_before == -1:
            out.append(m)
    return out


def _tear_bitmap(rng: random.Random, nsectors: int) -> bytes:
    """A torn pattern over ``nsectors``: a prefix, a suffix or a random scatter, never all or none."""
    if nsectors < 2:
        return b""
    mode = rng.randrange(3)
    if mode == 0:
        k = rng.randrange(1, nsectors)
        bits = [i < k for i in range(nsectors)]
    elif mode == 1:
        k = rng.randrange(1, nsectors)
        bits = [i >= k for i in range(nsectors)]
    else:
        bits = [rng.random() < 0.5 for _ in range(nsectors)]
        if all(bits) or not any(bits):
            bits[rng.randrange(nsectors)] = not bits[0]
    out = bytearray((nsectors + 7) // 8)
    for i, b in enumerate(bits):
        if b:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def crash_state(trace: Trace, t: float, kind: str, seed: int) -> CrashState:
    """The crash state of ``trace`` at modelled time ``t`` (pure; see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown crash-state kind {kind!r} (known: {', '.join(KINDS)})")
    rng = random.Random(seed)
    fs = _flushed_seq(trace, t)
    if kind == "model":
        keep = frozenset(r.seq for r in trace.destages if r.t_complete <= t)
        return CrashState(t, kind, seed, keep, None, fs)
    durable = [w.seq for w in trace.writes if w.seq < fs]
    acked = [w for w in trace.writes if w.seq > fs and w.t_complete <= t]
    inflight = [w for w in trace.writes if w.t_submit <= t < w.t_complete]
    if kind == "prefix":
        return CrashState(t, kind, seed, frozenset(durable), None, fs)
    p = rng.random()
    keep = set(durable)
    keep.update(w.seq for w in acked if rng.random() < p)
    torn: tuple[int, bytes] | None = None
    ss = trace.sector_size
    candidate = inflight[0] if inflight else (acked[-1] if (kind == "torn" and acked) else None)
    if candidate is not None:
        nsec = candidate.length // ss
        choice = rng.randrange(3) if kind == "random" else 2
        keep.discard(candidate.seq)
        if choice == 1:
            keep.add(candidate.seq)
        elif choice == 2 and nsec >= 2:
            torn = (candidate.seq, _tear_bitmap(rng, nsec))
    return CrashState(t, kind, seed, frozenset(keep), torn, fs)


def _times(trace: Trace, n_random: int, rng: random.Random) -> Iterator[tuple[float, str]]:
    """Times and kinds to sample: barriers, both sides of commits, then random."""
    eps = 1e-9
    for f in trace.flushes:
        yield f.t_complete, "prefix"
        yield max(0.0, f.t_submit), "random"
    for m in trace.marks:
        yield max(0.0, m.t_complete - eps), "torn"
        yield m.t_complete + eps, "random"
    end = trace.end_time * 1.02 + 1e-6
    for _ in range(n_random):
        t = rng.uniform(0.0, end)
        yield t, rng.choice(("random", "random", "torn", "model"))


def enumerate_states(trace: Trace, n: int, seed: int) -> list[tuple[int, CrashState]]:
    """Up to ``n`` distinct crash states of ``trace`` as ``(index, state)``.

    Deterministic for ``(trace, n, seed)``. The index is the draw number; the
    state's own seed is :func:`state_seed` ``(seed, index)``, so a row's
    ``(t, kind, seed)`` is all :func:`crash_state` needs to rebuild it.
    Duplicates (same content and durability point) are dropped; draws continue
    until ``n`` distinct states or a budget of ``4 n`` draws is spent.
    """
    rng = random.Random(seed)
    out: list[tuple[int, CrashState]] = []
    seen: set[str] = set()
    budget = 4 * n + 16
    index = 0
    gen = _times(trace, budget, rng)
    for t, kind in gen:
        if len(out) >= n or index >= budget:
            break
        st = crash_state(trace, t, kind, state_seed(seed, index))
        index += 1
        k = st.key
        if k in seen:
            continue
        seen.add(k)
        out.append((index - 1, st))
    return out
