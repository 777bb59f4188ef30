"""Dispatch + combine with N processes on ONE GPU: the nvlink backend (CUDA IPC peer writes) vs the
collective backend (gloo all_to_all over host copies: NCCL refuses several ranks on one GPU), same run.

Timing: every timed iteration starts with the GPU idle and a process-group barrier (so the ranks start
together), then CUDA events bracket the step on the current stream; the median over the iterations (after
warm-up) is reported, and the slowest rank's median (max over ranks) is the figure used. The collective
step includes its device->host and host->device copies (what a GPU user of gloo pays); the events see
them because they are recorded on the stream around the whole step.

GB/s per rank: bytes this rank sends in dispatch (one bf16 row per destination rank of each token,
itself included) plus the same bytes back in combine, divided by the step time.

NOTE: on one GPU, "peer" writes go to the same HBM, so these figures measure the kernels and the
protocol, not NVLink. NVLink figures (goal >= 150 GB/s per GPU on H800-class hardware) need a
multi-GPU machine; they are not produced here.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

NOTE = ("single-GPU multi-process run: nvlink numbers measure the IPC kernels/protocol over local HBM, not NVLink; "
        "NVLink bandwidth (goal >= 150 GB/s per GPU, H800-class) needs a multi-GPU machine")


def _time_steps(fn, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn`` measured with CUDA events, a group barrier before each iteration."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _worker(rank, world, port, T, H, warmup, reps, out_path):
    from dsmoe.parallel import EPBuffer
    torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    E, k = 256, 8
    gen = torch.Generator(device="cuda").manual_seed(1234 + rank)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=gen)
    idx = torch.rand(T, E, device="cuda", generator=gen).topk(k, dim=1).indices.to(torch.int32)
    w = torch.rand(T, k, device="cuda", generator=gen)
    nv = EPBuffer(None, E, H, backend="nvlink", max_tokens_per_rank=T, num_sms=20, graph_safe=True, timeout=60)
    co = EPBuffer(None, E, H)

    def nv_step():
        rx, ri, rw, cnt, hd = nv.dispatch(x, idx, w)
        return nv.combine(rx, hd)

    def co_step():  # GPU tensors in and out, gloo in between
        rx, ri, rw, cnt, hd = co.dispatch(x.cpu(), idx.cpu(), w.cpu())
        return co.combine(rx, hd).cuda()

    ms = {"nvlink": _time_steps(nv_step, warmup, reps), "collective_gloo": _time_steps(co_step, warmup, reps)}
    _, _, in_rank = nv.get_dispatch_layout(idx)
    sent_bytes = 2 * int(in_rank.sum()) * H * 2  # dispatch + combine
    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"ms": ms, "bytes": sent_bytes})
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(per_rank, f)
    nv.close()
    dist.destroy_process_group()


def run(h, quick: bool):
    cases = []
    H = 7168
    warmup, reps = (3, 10) if quick else (5, 30)
    for world in ([2] if quick else [2, 4]):
        for T in ([1024] if quick else [1024, 4096]):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            with tempfile.TemporaryDirectory() as d:
                out = os.path.join(d, "r.json")
                mp.spawn(_worker, args=(world, port, T, H, warmup, reps, out), nprocs=world, join=True)
                with open(out) as f:
                    ranks = json.load(f)
            row = {"world": world, "T": T, "H": H}
            for name in ("nvlink", "collective_gloo"):
                worst = max(range(world), key=lambda r: ranks[r]["ms"][name])
                ms = ranks[worst]["ms"][name]
                gbps = min(r["bytes"] / (r["ms"][name] * 1e-3) / 1e9 for r in ranks)
                row[f"{name}_ms"] = ms
                row[f"{name}_GB/s_per_rank"] = gbps
            row["nvlink_speedup_vs_collective"] = row["collective_gloo_ms"] / row["nvlink_ms"]
            row["note"] = NOTE
            cases.append(row)
    cols = ["world", "T", "nvlink_ms", "nvlink_GB/s_per_rank", "collective_gloo_ms", "collective_gloo_GB/s_per_rank",
            "nvlink_speedup_vs_collective"]
    return cases, cols, {"note": NOTE, "timing": "CUDA events around each dispatch+combine step, group barrier before "
                                                   "each iteration, median after warm-up; slowest rank reported; "
                                                   "GB/s per rank = min over ranks"}
