"""GPU tier of EPBuffer's nvlink backend, checked against the collective backend run on CPU copies in the
same processes (exact): bf16, fp16 and FP8 (bytes + scales) payloads, the identity round trip,
gradients, graph-safe mode, bitwise reruns, and a dead peer (EPTimeoutError within the timeout).

test_nvlink_matches_collective runs ALL its processes on ONE GPU (CUDA IPC works within a device): it
checks the protocol, not NVLink. test_nvlink_two_gpus runs one process per GPU and only where at least
2 GPUs are visible. Token counts stay within max_tokens_per_rank (64) on every rank."""
import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dsmoe.ops
from dsmoe.parallel import EPBuffer, EPTimeoutError

pytestmark = [pytest.mark.gpu, pytest.mark.dist]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, graph_safe, one_gpu=True):
    torch.cuda.set_device(0 if one_gpu else rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        E, H, k = 16, 256, 4
        g = torch.Generator().manual_seed(rank)
        T = 40 + 7 * rank  # <= 61 with 4 ranks: within max_tokens_per_rank=64
        x = torch.randn(T, H, generator=g).bfloat16()
        x[:, 0] = rank
        x[:, 1] = torch.arange(T).float()
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
        idx[torch.rand(T, k, generator=g) < 0.1] = -1
        w = torch.rand(T, k, generator=g)
        nv = EPBuffer(None, E, H, backend="nvlink", max_tokens_per_rank=64, num_sms=4, graph_safe=graph_safe, timeout=20)
        co = EPBuffer(None, E, H)
        rx, ri, rw, cnt, h = nv.dispatch(x.cuda(), idx.cuda(), w.cuda())
        cx, ci, cw, ccnt, ch = co.dispatch(x, idx, w)
        torch.cuda.synchronize()
        if graph_safe:
            # rows of source s sit at [s * 64, s * 64 + count_s)
            sel = torch.cat([torch.arange(s * 64, s * 64 + c) for s, c in enumerate(ch.recv_counts)])
            rx, ri, rw = rx[sel.cuda()], ri[sel.cuda()], rw[sel.cuda()]
        assert torch.equal(rx.cpu(), cx) and torch.equal(ri.cpu(), ci) and torch.equal(rw.cpu(), cw)
        assert torch.equal(cnt.cpu(), ccnt)
        # fp16 rows and FP8 payloads (e4m3 bytes + fp32 scales) move bit for bit too
        xh = x.half()
        hx, *_ = nv.dispatch(xh.cuda(), idx.cuda(), w.cuda())
        chx, *_ = co.dispatch(xh, idx, w)
        if not graph_safe:
            assert torch.equal(hx.cpu(), chx)
            q8, s8 = dsmoe.ops.per_token_group_quant_fp8(x.float())
            (fx, fs), *_ = nv.dispatch((q8.cuda(), s8.cuda()), idx.cuda(), w.cuda())
            (cfx, cfs), *_ = co.dispatch((q8, s8), idx, w)
            assert torch.equal(fx.cpu().view(torch.uint8), cfx.view(torch.uint8)) and torch.equal(fs.cpu(), cfs)
        # identity experts: combine(dispatch(x)) == sum_k w_k x  (bf16 rows, fp32 sums)
        rxf, rif, rwf, _, hf = nv.dispatch(x.cuda(), idx.cuda(), w.cuda())
        y = (rwf.sum(1, keepdim=True) * rxf.float()).bfloat16()
        out = nv.combine(y, hf)
        yc = (cw.sum(1, keepdim=True) * cx.float()).bfloat16()
        outc = co.combine(yc, ch)
        assert torch.equal(out.cpu(), outc)
        # rerun: bitwise identical
        rx2, *_ , h2 = nv.dispatch(x.cuda(), idx.cuda(), w.cuda())
        assert torch.equal(rx2, rxf)
        out2 = nv.combine(y, h2)
        assert torch.equal(out2, out)
        if not graph_safe:
            # gradient of x through dispatch -> (scale) -> combine equals the collective backend's
            xg = x.cuda().requires_grad_(True)
            a, _, aw, _, ha = nv.dispatch(xg, idx.cuda(), w.cuda())
            o = nv.combine((a.float() * 2).bfloat16(), ha)
            o.float().sum().backward()
            xc = x.clone().requires_grad_(True)
            b, _, bw, _, hb = co.dispatch(xc, idx, w)
            oc = co.combine((b.float() * 2).bfloat16(), hb)
            oc.float().sum().backward()
            assert torch.equal(xg.grad.cpu(), xc.grad)
            # topk_weights gradients through the nvlink transport match the collective backend
            wg = w.cuda().requires_grad_(True)
            wc = w.clone().requires_grad_(True)
            G = torch.randn(T, H, generator=g)
            for buf, xx, ii, ww, GG in ((nv, x.cuda(), idx.cuda(), wg, G.cuda()), (co, x, idx, wc, G)):
                a, _, aw, _, ha = buf.dispatch(xx, ii, ww)
                o = buf.combine((a.float() * (aw * torch.arange(1, k + 1, device=aw.device)).sum(1, keepdim=True)).bfloat16(), ha)
                (o.float() * GG).sum().backward()
            torch.testing.assert_close(wg.grad.cpu(), wc.grad, rtol=1e-4, atol=1e-4)
            assert (wc.grad[idx < 0] == 0).all() and (wg.grad.cpu()[idx < 0] == 0).all()
            # two dispatches in a row (an empty exchange is inserted so the second cannot overwrite rows a
            # peer has not read out yet), with different data: both results exact
            x2 = x.clone()
            x2[:, 2:] = -x2[:, 2:]
            r1 = nv.dispatch(x.cuda(), idx.cuda(), w.cuda())
            r2 = nv.dispatch(x2.cuda(), idx.cuda(), w.cuda())
            assert torch.equal(r1[0].cpu(), cx) and torch.equal(r2[0].cpu(), co.dispatch(x2, idx, w)[0])
            nv.combine(r2[0], r2[4])
        else:
            # CUDA graph capture of dispatch + combine (no host sync), replayed: same output
            xs, ids, ws = x.cuda(), idx.cuda(), w.cuda()

            def step():
                a, _, aw, _, ha = nv.dispatch(xs, ids, ws)
                return nv.combine((aw.sum(1, keepdim=True) * a.float()).bfloat16(), ha)

            expect = step()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                got = step()
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(got, expect) and torch.equal(got.cpu(), outc)
            nv._nvlink.check_error()
        nv.close()
        with pytest.raises(RuntimeError, match="closed"):
            nv.dispatch(x.cuda(), idx.cuda(), w.cuda())
    finally:
        dist.destroy_process_group()


pytestmark = [*pytestmark, pytest.mark.cuda_only]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("graph_safe", [False, True])
def test_nvlink_matches_collective(world, graph_safe):
    mp.spawn(_worker, args=(world, _free_port(), graph_safe), nprocs=world, join=True)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nvlink_two_gpus():
    mp.spawn(_worker, args=(2, _free_port(), False, False), nprocs=2, join=True)


def _dead_peer_worker(rank, world, port):
    torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        E, H = 8, 128
        nv = EPBuffer(None, E, H, backend="nvlink", max_tokens_per_rank=16, num_sms=2, timeout=3)
        x = torch.randn(8, H, device="cuda").bfloat16()
        idx = torch.arange(8, device="cuda", dtype=torch.int32).view(8, 1) % E
        w = torch.ones(8, 1, device="cuda")
        if rank == 0:
            import time
            t0 = time.monotonic()
            with pytest.raises(EPTimeoutError, match="did not signal within the timeout"):
                nv.dispatch(x, idx, w)
                torch.cuda.synchronize()
                nv._nvlink.check_error()
            assert time.monotonic() - t0 < 30, "the wait must end near its 3 s budget"
        dist.barrier()  # rank 1 never dispatched: it was the dead peer
    finally:
        dist.destroy_process_group()


def test_nvlink_dead_peer_times_out():
    """A peer that never joins the exchange: the waiting rank raises EPTimeoutError after about its 3 s
    budget (wall-clock wait in the kernel) instead of hanging."""
    mp.spawn(_dead_peer_worker, args=(2, _free_port()), nprocs=2, join=True)
