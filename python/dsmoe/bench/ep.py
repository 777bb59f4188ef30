"""Dispatch + combine with N processes on ONE GPU: the nvlink backend (CUDA IPC peer writes) vs the
collective backend (gloo all_to_all over host copies: NCCL refuses several ranks on one GPU), same run.

NOTE: on one GPU, "peer" writes go to the same HBM, so these figures measure the kernels and the
protocol, not NVLink. NVLink figures (goal >= 150 GB/s per GPU on H800-class hardware) need a
multi-GPU machine; they are not produced here.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

NOTE = ("single-GPU multi-process run: nvlink numbers measure the IPC kernels/protocol over local HBM, not NVLink; "
        "NVLink bandwidth (goal >= 150 GB/s per GPU, H800-class) needs a multi-GPU machine")


def _worker(rank, world, port, T, H, reps, out_path):
    from dsmoe.parallel import EPBuffer
    torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    E, k = 256, 8
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(T)]).to(torch.int32)
    w = torch.rand(T, k, device="cuda")
    res = {}
    nv = EPBuffer(None, E, H, backend="nvlink", max_tokens_per_rank=T, num_sms=20, graph_safe=True, timeout=60)

    def nv_step():
        rx, ri, rw, cnt, hd = nv.dispatch(x, idx, w)
        return nv.combine(rx, hd)

    def co_step():
        rx, ri, rw, cnt, hd = co.dispatch(xc, idxc, wc)
        return co.combine(rx, hd)

    co = EPBuffer(None, E, H)
    xc, idxc, wc = x.cpu(), idx.cpu(), w.cpu()
    for name, fn, cuda in (("nvlink", nv_step, True), ("collective_gloo", co_step, False)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        dist.barrier()
        import time
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        dist.barrier()
        res[name] = (time.perf_counter() - t0) / reps * 1e3
    _, _, in_rank = nv.get_dispatch_layout(idx)
    sent_bytes = int(in_rank.sum()) * H * 2
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"ms": res, "sent_bytes_rank0": sent_bytes}, f)
    nv._nvlink.close()
    dist.destroy_process_group()


def run(h, quick: bool):
    cases = []
    H = 7168
    for world in ([2] if quick else [2, 4]):
        for T in ([1024] if quick else [1024, 4096]):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            with tempfile.TemporaryDirectory() as d:
                out = os.path.join(d, "r.json")
                mp.spawn(_worker, args=(world, port, T, H, 5 if quick else 20, out), nprocs=world, join=True)
                r = json.load(open(out))
            for name, ms in r["ms"].items():
                # dispatch + combine move the same bytes twice
                gbps = 2 * r["sent_bytes_rank0"] / (ms * 1e-3) / 1e9
                cases.append({"backend": name, "world": world, "T": T, "H": H, "ms_dispatch_combine": ms,
                              "GB/s_per_rank": gbps, "note": NOTE})
    cols = ["backend", "world", "T", "ms_dispatch_combine", "GB/s_per_rank"]
    return cases, cols, {"note": NOTE, "timing": "host wall clock per dispatch+combine pair (includes Python), median not used"}
