"""GPU tier of internode EP: node-limited routing on CUDA (the reference on the device, capturable) against
the CPU rule; the hierarchical backend over NCCL, and with ``hop1="symm_mem"`` (NVSHMEM
``all_to_all_vdev_2d``), against the collective backend, one process per GPU as 2 nodes x 1 rank (needs at
least 2 GPUs; the symm_mem case also a torch built with NVSHMEM)."""
import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsmoe import ops
from dsmoe.ref import moe as ref

pytestmark = [pytest.mark.gpu]


def test_node_limited_routing_cuda_matches_cpu_and_captures():
    g = torch.Generator().manual_seed(5)
    logits, bias = torch.randn(300, 256, generator=g), torch.randn(256, generator=g) * 0.01
    kw = dict(top_k=8, n_group=16, topk_group=8, routed_scaling_factor=2.5, num_nodes=8, max_nodes=4)
    i, w = ops.moe_route(logits.cuda(), bias.cuda(), **kw)
    ri, rw = ref.moe_route(logits, bias, **kw)
    assert torch.equal(i.cpu(), ri)
    torch.testing.assert_close(w.cpu(), rw, rtol=1e-6, atol=1e-6)
    lc, bc = logits.cuda(), bias.cuda()
    ops.moe_route(lc, bc, **kw)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gi, _ = ops.moe_route(lc, bc, **kw)
    lc.copy_(torch.randn(300, 256, generator=g).cuda())
    graph.replay()
    assert torch.equal(gi.cpu(), ref.moe_route(lc.cpu(), bias, **kw)[0])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _symm_mem_available() -> bool:
    try:
        import torch.distributed._symmetric_memory as symm_mem
        return hasattr(torch.ops.symm_mem, "all_to_all_vdev_2d") and symm_mem.is_nvshmem_available()
    except Exception:  # noqa: BLE001
        return False


def _worker(rank, world, port, hop1s, q):
    try:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60), device_id=torch.device("cuda", rank))
        E, H, k = 16, 256, 4
        g = torch.Generator().manual_seed(rank)
        T = 30 + 9 * rank
        x = torch.randn(T, H, generator=g).bfloat16()
        x[:, 0], x[:, 1] = rank, torch.arange(T).float()
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
        idx[torch.rand(T, k, generator=g) < 0.1] = -1
        w = torch.rand(T, k, generator=g)
        x, idx, w = x.cuda(), idx.cuda(), w.cuda()
        from dsmoe.parallel import EPBuffer
        flat = EPBuffer(None, E, H, ranks_per_node=1)
        fx, fi, fw, fc, fh = flat.dispatch(x, idx, w)
        fout = flat.combine(fx * 2, fh)
        for hop1 in hop1s:
            hb = EPBuffer(None, E, H, backend="hierarchical", ranks_per_node=1, hop1=hop1, max_tokens_per_rank=64)
            hx, hi, hw, hc, hh = hb.dispatch(x, idx, w)
            assert torch.equal(hx, fx) and torch.equal(hi, fi) and torch.equal(hw, fw) and torch.equal(hc, fc), hop1
            out = hb.combine(hx * 2, hh)
            torch.testing.assert_close(out.float(), fout.float(), rtol=1e-2, atol=1e-2)
            q8 = (torch.randn(T, H, generator=g) * 30).to(torch.float8_e4m3fn).cuda()
            sc = torch.rand(T, H // 128, generator=g).cuda()
            (a, b), *_ = flat.dispatch((q8, sc), idx, w)
            (c, d), *_ = hb.dispatch((q8, sc), idx, w)
            assert torch.equal(a.view(torch.uint8), c.view(torch.uint8)) and torch.equal(b, d), hop1
            xr = x.float().requires_grad_(True)
            hx, hi, hw, _, hh = hb.dispatch(xr, idx, w)
            hb.combine(hx * hw.sum(1, keepdim=True), hh).sum().backward()
            xf = x.float().requires_grad_(True)
            fx2, _, fw2, _, fh2 = flat.dispatch(xf, idx, w)
            flat.combine(fx2 * fw2.sum(1, keepdim=True), fh2).sum().backward()
            torch.testing.assert_close(xr.grad, xf.grad, rtol=1e-5, atol=1e-5)
            assert hb.stats()["inter_node_rows"] > 0
        q.put((rank, "ok"))
    except BaseException:  # noqa: BLE001
        import traceback
        q.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_hierarchical_nccl_and_symm_mem_two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs at least 2 GPUs (one process per GPU, NCCL)")
    hop1s = ["collective"] + (["symm_mem"] if _symm_mem_available() else [])
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    ps = [ctx.Process(target=_worker, args=(r, 2, port, hop1s, q)) for r in range(2)]
    for p in ps:
        p.start()
    try:
        res = dict(q.get(timeout=280) for _ in ps)
    finally:
        for p in ps:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
    assert res == {0: "ok", 1: "ok"}, res
    if "symm_mem" not in hop1s:
        pytest.skip("hierarchical over NCCL passed; hop1='symm_mem' needs a torch built with NVSHMEM")
