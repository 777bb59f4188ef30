"""Per-rank idle fraction of 1F1B, DualPipe and DualPipe with the forward/backward overlap, with stage
modules whose compute and expert-parallel exchanges take known times (sleeps: the compute sleeps in
the Python thread, an exchange sleeps in a background thread like a collective in flight), so what is
measured is the schedule and the overlap, not this CPU.

    torchrun --nproc-per-node 4 tools/pipeline_overlap.py [--unit-ms 10] [--chunks 16] [--steps 3]

A stage chunk mirrors a V3 layer: forward = compute, dispatch, compute, combine, compute (3 units of
compute, 2 exchanges of --comm units); backward = the same chain reversed with 2x the compute, of which
--w units are the weight gradients (deferred through WeightGradStore where the schedule splits the
backward). Idle = 1 - (compute slept on the rank) / (step wall time): waiting for a peer's activation
and waiting for an exchange both count as idle. Prints a Markdown table (docs/pipeline.md)."""
from __future__ import annotations

import argparse
import threading
import time

import torch
import torch.distributed as dist
from torch import nn

from dsmoe.parallel import pipeline as pl
from dsmoe.parallel.pipeline.v3 import _drive, _interleave

BUSY = [0.0]


def compute(t):
    BUSY[0] += t
    time.sleep(t)


class _Exchange:
    """A collective in flight: completes ``t`` seconds after it is posted."""

    def __init__(self, t):
        self.th = threading.Thread(target=time.sleep, args=(t,))
        self.th.start()

    def wait(self):
        self.th.join()


class _Stitch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stage, x, anchor):
        ctx.stage = stage
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        if isinstance(ctx.stage, OverlapSleepStage):  # backwards come in chunk order: drop this chunk's entry
            ctx.stage._last_out.pop(0)
            ctx.stage._last_in.pop(0)
        return None, _drive(ctx.stage._bwd(g)), None


class SleepStage(nn.Module):
    def __init__(self, u, comm, w):
        super().__init__()
        self.u, self.comm, self.w = u, comm, w
        self.p = nn.Parameter(torch.ones(()))

    def _fwd(self, x):
        for i in range(3):
            compute(self.u)
            if i < 2:
                yield _Exchange(self.comm * self.u)
        return x * self.p.detach()

    def _bwd(self, g):
        for i in range(3):
            compute((2 * 3 - self.w) / 3 * self.u)
            if i < 2:
                yield _Exchange(self.comm * self.u)
        p, u, w = self.p, self.u, self.w

        def wgrad():
            compute(w * u)
            p.grad = torch.zeros(()) if p.grad is None else p.grad

        pl.WeightGradStore.put(wgrad) if pl.WeightGradStore.enabled else wgrad()
        return g

    def forward(self, x):
        return _Stitch.apply(self, _drive(self._fwd(x)), self.p)


class OverlapSleepStage(SleepStage):
    @classmethod
    def overlapped_forward_backward(cls, m0, inputs0, criterion0, labels0, m1, loss1, outputs1, output_grads1):
        if loss1 is not None:
            (g1,) = torch.autograd.grad(loss1, m1._last_out.pop(0))
        else:
            g1 = output_grads1[0]
            m1._last_out.pop(0)
        (x,) = inputs0
        out0, gin = _interleave(m0._fwd(x), m1._bwd(g1))
        ins1 = m1._last_in.pop(0)
        if ins1.requires_grad:
            ins1.backward(gin)
        out0 = m0._finish(x, out0)
        loss0 = criterion0(out0, *labels0) if criterion0 is not None else None
        return [out0], loss0

    def __init__(self, *a):
        super().__init__(*a)
        self._last_out, self._last_in = [], []

    def _finish(self, x, y):
        out = _Stitch.apply(self, y, self.p)
        self._last_out.append(out)
        self._last_in.append(x)
        return out

    def forward(self, x):
        return self._finish(x, _drive(self._fwd(x)))


def run(kind, overlap, args, rank, pp):
    u = args.unit_ms / 1000
    cls = OverlapSleepStage if overlap else SleepStage
    if kind == "1f1b":
        pipe = pl.OneFOneB(cls(u, args.comm, args.w))
    else:
        pipe = pl.DualPipe((cls(u, args.comm, args.w), cls(u, args.comm, args.w)))
    mb = 2
    pl.set_p2p_tensor_shapes([(mb, 4)])
    pl.set_p2p_tensor_dtype(torch.float32)
    x = torch.ones(args.chunks * mb, 4)
    crit = lambda y, l: (y - l).pow(2).mean()
    first, last = rank == 0, rank == pp - 1
    fr, wall = [], []
    for step in range(args.steps + 1):
        if kind == "1f1b":
            inp, lab = ((x,) if first else ()), ((x,) if last else ())
        else:
            half = x.chunk(2)[0]
            inp, lab = ((half,) if first or last else ()), ((half,) if first or last else ())
        dist.barrier()
        BUSY[0] = 0.0
        t0 = time.perf_counter()
        pipe.step(*inp, num_chunks=args.chunks, criterion=crit, labels=lab)
        t = time.perf_counter() - t0
        dist.barrier()
        if step:                                  # the first step warms up
            fr.append(1 - BUSY[0] / t)
            wall.append(t)
    out = torch.tensor([sum(fr) / len(fr), sum(wall) / len(wall)])
    allv = [torch.zeros(2) for _ in range(pp)]
    dist.all_gather(allv, out)
    return [float(v[0]) for v in allv], max(float(v[1]) for v in allv)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unit-ms", type=float, default=10.0)
    p.add_argument("--comm", type=float, default=1.0, help="an exchange's time in compute units")
    p.add_argument("--w", type=float, default=2.0, help="weight-gradient share of a backward, in units")
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    dist.init_process_group("gloo")
    rank, pp = dist.get_rank(), dist.get_world_size()
    rows = []
    for kind, overlap, label in (("1f1b", False, "1F1B"), ("dualpipe", False, "DualPipe"),
                                 ("dualpipe", True, "DualPipe + overlap")):
        idle, wall = run(kind, overlap, a, rank, pp)
        rows.append((label, idle, wall))
    if rank == 0:
        # compute per chunk and stage: F = 3 units, B = 6 units (W = --w of them); exchanges: 4 per chunk
        print(f"PP={pp}, {a.chunks} micro-batches, unit {a.unit_ms} ms, exchange {a.comm} units, W {a.w} units; "
              f"per-rank idle fraction (mean of {a.steps} steps)\n")
        print("| schedule | step wall (s) | " + " | ".join(f"rank {r}" for r in range(pp)) + " |")
        print("|---|---|" + "---|" * pp)
        for label, idle, wall in rows:
            print(f"| {label} | {wall:.3f} | " + " | ".join(f"{100 * v:.1f}%" for v in idle) + " |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
