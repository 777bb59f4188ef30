"""Pipeline schedules as data: each rank's program is a list of :class:`Op` (forward chunk, backward
chunk, weight-gradient chunk, or a forward and a backward chunk executed as one overlapped pair).

The same programs drive the executor (:mod:`.runtime`) and :func:`simulate`, which derives every rank's
timeline from unit costs ``F, B, W, F&B`` and the data dependencies between stages; the tests compare
its bubbles with the published formulas, so the schedule the executor runs is the one that is checked.

Vocabulary: a *path* is the chain of stages one micro-batch (chunk) goes through; a rank holds one or
two *slots* (its modules), each at one position of one path.

- 1F1B: one path of PP stages, rank r holds position r.
- DualPipe: two paths of PP stages in opposite directions; slot s of rank r is on path s, at position
  r (s = 0) or PP-1-r (s = 1): module 0 is stage r, module 1 is stage PP-1-r.
- DualPipeV: one path of 2*PP stages folded in a V; slot 0 of rank r is position r, slot 1 is position
  2*PP-1-r (the bend is local to the last rank).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Op", "Topology", "one_f_one_b_program", "dualpipe_program", "dualpipev_program", "simulate",
           "bubble_formula"]


@dataclass(frozen=True)
class Op:
    """``kind``: "F" (forward of ``chunk`` in ``slot``), "B" (backward; ``zb``: the weight gradients that
    go through WeightGradStore are deferred to a later "W"), "W" (run the oldest deferred weight
    gradients), "FB" (forward of (slot, chunk) and backward of (slot_b, chunk_b) as one overlapped pair)."""
    kind: str
    slot: int = -1
    chunk: int = -1
    zb: bool = False
    slot_b: int = -1
    chunk_b: int = -1


class Topology:
    """Where each (path, position) lives: ``place[(path, pos)] = (rank, slot)`` and back."""

    def __init__(self, kind: str, pp: int):
        self.kind, self.pp = kind, pp
        self.place, self.where = {}, {}
        if kind == "1f1b":
            self.paths, self.length = 1, pp
            for r in range(pp):
                self._put(0, r, r, 0)
        elif kind == "dualpipe":
            self.paths, self.length = 2, pp
            for r in range(pp):
                self._put(0, r, r, 0)
                self._put(1, pp - 1 - r, r, 1)
        elif kind == "dualpipev":
            self.paths, self.length = 1, 2 * pp
            for r in range(pp):
                self._put(0, r, r, 0)
                self._put(0, 2 * pp - 1 - r, r, 1)
        else:
            raise ValueError(f"Topology: unknown schedule {kind!r}")

    def _put(self, path, pos, rank, slot):
        self.place[(path, pos)] = (rank, slot)
        self.where[(rank, slot)] = (path, pos)

    def slots(self, rank):
        return [s for s in (0, 1) if (rank, s) in self.where]

    def prev(self, rank, slot):
        """(rank, slot) of the stage before, or None for a first stage."""
        path, pos = self.where[(rank, slot)]
        return self.place.get((path, pos - 1))

    def next(self, rank, slot):
        path, pos = self.where[(rank, slot)]
        return self.place.get((path, pos + 1))


class _Builder:
    def __init__(self, flip: bool = False):
        self.flip = int(flip)   # DualPipe's second half: local phase 0 is slot 1
        self.f, self.b, self.ops = [0, 0], [0, 0], []

    def F(self, phase):
        s = phase ^ self.flip
        self.ops.append(Op("F", s, self.f[s]))
        self.f[s] += 1

    def B(self, phase, zb=False):
        s = phase ^ self.flip
        self.ops.append(Op("B", s, self.b[s], zb=zb))
        self.b[s] += 1

    def W(self):
        self.ops.append(Op("W"))

    def FB(self, pf, pb):
        sf, sb = pf ^ self.flip, pb ^ self.flip
        self.ops.append(Op("FB", sf, self.f[sf], slot_b=sb, chunk_b=self.b[sb]))
        self.f[sf] += 1
        self.b[sb] += 1


def one_f_one_b_program(pp: int, rank: int, num_chunks: int) -> list:
    """Warm-up forwards, then one forward / one backward, then the remaining backwards (no W split)."""
    bd = _Builder()
    warm = min(pp - 1 - rank, num_chunks)
    for _ in range(warm):
        bd.F(0)
    for _ in range(num_chunks - warm):
        bd.F(0)
        bd.B(0)
    for _ in range(warm):
        bd.B(0)
    return bd.ops


def _bidirectional(bd: _Builder, n: int, r: int, chunks: int, bend: bool):
    """The DualPipe phases for a rank ``r`` of ``n`` in its half (DualPipe: n = PP/2, r = the distance
    from the nearer end; DualPipeV: n = PP, r = rank), ``chunks`` per path; ``bend``: this rank meets the
    other direction first (DualPipe's middle ranks, DualPipeV's last rank)."""
    for _ in range((n - r - 1) * 2):          # forwards of phase 0 fill the pipe
        bd.F(0)
    for _ in range(r + 1):                    # both directions start
        bd.F(0)
        bd.F(1)
    for _ in range(n - r - 1):                # first backwards of phase 1, weights deferred into the gaps
        bd.B(1, zb=True)
        bd.W()
        bd.F(1)
    for i in range(chunks - 2 * n + r + 1):   # steady state: overlapped forward/backward pairs
        if i == 0 and bend:
            # the first pair at the bend runs unpaired: its backward input arrives only after the forward
            bd.F(0)
            bd.B(1)
        else:
            bd.FB(0, 1)
        bd.FB(1, 0)
    for _ in range(n - r - 1):
        bd.B(1)
        bd.FB(1, 0)
    zb = False                                # drain: the second half of the backwards defer W
    for i in range(r + 1):
        if i == (r + 1) // 2 and r % 2 == 1:
            zb = True
        bd.B(1, zb)
        if i == (r + 1) // 2 and r % 2 == 0:
            zb = True
        bd.B(0, zb)
    for _ in range(n - r - 1):
        bd.W()
        bd.B(0, zb=True)
    for _ in range(r + 1):
        bd.W()
    return bd.ops


def dualpipe_program(pp: int, rank: int, num_chunks: int) -> list:
    """``num_chunks`` in total, half per direction."""
    half = pp // 2
    hr = min(rank, pp - 1 - rank)
    return _bidirectional(_Builder(flip=rank >= half), half, hr, num_chunks // 2, bend=hr == half - 1)


def dualpipev_program(pp: int, rank: int, num_chunks: int) -> list:
    return _bidirectional(_Builder(), pp, rank, num_chunks, bend=rank == pp - 1)


PROGRAMS = {"1f1b": one_f_one_b_program, "dualpipe": dualpipe_program, "dualpipev": dualpipev_program}


def simulate(kind: str, pp: int, num_chunks: int, *, F=1.0, B=2.0, W=1.0, FB=None, comm=0.0):
    """Runs every rank's program against the data dependencies with fixed costs (``FB``: an overlapped
    forward/backward pair, default ``F + B``; a backward that defers W costs ``B - W``; ``comm``: the
    time a tensor takes from one rank to the next). Returns ``{"end": makespan, "busy": [per rank],
    "bubble": [makespan - busy], "timeline": [[(op, start, end)]]}``. Raises on a deadlock (an op whose
    input never comes), which is what an inconsistent program would do to the executor."""
    FB = F + B if FB is None else FB
    topo = Topology(kind, pp)
    progs = [PROGRAMS[kind](pp, r, num_chunks) for r in range(pp)]
    done = {}                                 # ("F"|"B", rank, slot, chunk) -> (finish time, rank)
    pc, clock = [0] * pp, [0.0] * pp
    timeline = [[] for _ in range(pp)]
    busy = [0.0] * pp

    def ready(kind_, r, s, c):
        """Time the input of this op is available on rank r, or None if not yet produced."""
        src = topo.prev(r, s) if kind_ == "F" else topo.next(r, s)
        if src is None:
            if kind_ == "F":
                return 0.0
            src = (r, s)                      # a last stage's backward follows its own forward
            key = ("F", r, s, c)
        else:
            key = (kind_, src[0], src[1], c)
        if key not in done:
            return None
        t, where = done[key]
        return t + (comm if where != r else 0.0)

    total = sum(len(p) for p in progs)
    finished = 0
    while finished < total:
        progress = False
        for r in range(pp):
            while pc[r] < len(progs[r]):
                op = progs[r][pc[r]]
                if op.kind == "W":
                    deps, cost = [0.0], W
                elif op.kind == "F":
                    deps, cost = [ready("F", r, op.slot, op.chunk)], F
                elif op.kind == "B":
                    deps, cost = [ready("B", r, op.slot, op.chunk)], (B - W if op.zb else B)
                else:
                    deps, cost = [ready("F", r, op.slot, op.chunk), ready("B", r, op.slot_b, op.chunk_b)], FB
                if any(d is None for d in deps):
                    break
                start = max([clock[r]] + deps)
                end = start + cost
                clock[r] = end
                busy[r] += cost
                timeline[r].append((op, start, end))
                if op.kind in ("F", "FB"):
                    done[("F", r, op.slot, op.chunk)] = (end, r)
                if op.kind == "B":
                    done[("B", r, op.slot, op.chunk)] = (end, r)
                if op.kind == "FB":
                    done[("B", r, op.slot_b, op.chunk_b)] = (end, r)
                pc[r] += 1
                finished += 1
                progress = True
        if not progress:
            stuck = {r: progs[r][pc[r]] for r in range(pp) if pc[r] < len(progs[r])}
            raise RuntimeError(f"simulate({kind!r}, pp={pp}, num_chunks={num_chunks}): deadlock, waiting ops {stuck}")
    end = max(clock)
    return {"end": end, "busy": busy, "bubble": [end - b for b in busy], "timeline": timeline}


def bubble_formula(kind: str, pp: int, *, F=1.0, B=2.0, W=1.0, FB=None) -> float:
    """The published bubble: 1F1B (PP-1)(F+B); DualPipe (PP/2-1)(F&B+B-3W) with PP ranks = stages;
    DualPipeV the same formula over its 2*pp stages, i.e. (pp-1)(F&B+B-3W) for pp ranks."""
    FB = F + B if FB is None else FB
    if kind == "1f1b":
        return (pp - 1) * (F + B)
    if kind == "zb1p":
        return (pp - 1) * (F + B - 2 * W)
    if kind == "dualpipe":
        return (pp // 2 - 1) * (FB + B - 3 * W)
    if kind == "dualpipev":
        return (2 * pp // 2 - 1) * (FB + B - 3 * W)
    raise ValueError(f"bubble_formula: unknown schedule {kind!r}")
