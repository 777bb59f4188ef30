"""GPU tier of EPBuffer's nvlink backend, checked against the collective backend run on CPU copies in the
same processes (exact): bf16, fp16 and FP8 (bytes + scales) payloads, the identity round trip,
gradients, graph-safe mode, bitwise reruns, and a dead peer (EPTimeoutError within the timeout).

test_nvlink_matches_collective runs ALL its processes on ONE GPU (CUDA IPC works within a device): it
checks the protocol, not NVLink. test_nvlink_two_gpus runs one process per GPU and only where at least
2 GPUs are visible. Token counts stay within max_tokens_per_rank (64) on every rank.

Failure semantics (test_nvlink_failure_semantics): FP8 rows copy only their own bytes; zero sizes; graph-safe
dispatch never synchronizes the host; a timeout poisons (graph-safe) or raises (eager), later calls never
return stale rows; close() vs captured graphs; a dropped buffer frees its IPC memory."""
import datetime
import gc
import socket
import time

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
            nv.check_error()
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


def _worker_failure_semantics(rank, world, port):
    torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        E, H, k, Tmax = 8, 256, 2, 16
        dev = torch.device("cuda")
        g = torch.Generator().manual_seed(rank)
        T = 9 + rank
        x = torch.randn(T, H, generator=g).bfloat16().to(dev)
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32).to(dev)
        w = torch.rand(T, k, generator=g).to(dev)
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        with pytest.raises(ValueError, match="num_sms"):
            EPBuffer(None, E, H, backend="nvlink", max_tokens_per_rank=Tmax, num_sms=sms + 1)
        # the default wait budget is the process group's timeout
        assert EPBuffer(None, E, H).timeout == datetime.timedelta(seconds=30)

        # --- FP8 rows: only bytes + scales + ids + weights travel (~half the bf16 row); the rest of the pitch
        # in the receiver's region stays untouched
        nv = EPBuffer(None, E, H, backend="nvlink", max_tokens_per_rank=Tmax, num_sms=4, timeout=10)
        tr = nv._nvlink
        row_bytes = tr.lay.dispatch_row(True, k)[0]
        assert row_bytes == 256 + 16 + 2 * 16 < tr.lay.dispatch_row(False, k)[0] == 512 + 2 * 16
        tr._view(tr.o_ddata, world * Tmax * tr.row).fill_(0xAB)
        torch.cuda.synchronize()
        dist.barrier()
        q = (torch.randn(T, H, generator=g) * 30).to(torch.float8_e4m3fn).to(dev)
        sc = torch.rand(T, H // 128, generator=g).to(dev)
        (rq, rs), ri, rw, cnt, h = nv.dispatch((q, sc), idx, w)
        co = EPBuffer(None, E, H)
        (cq, cs), ci, cw, _, _ = co.dispatch((q.cpu(), sc.cpu()), idx.cpu(), w.cpu())
        assert torch.equal(rq.cpu().view(torch.uint8), cq.view(torch.uint8)) and torch.equal(rs.cpu(), cs)
        assert torch.equal(ri.cpu(), ci) and torch.equal(rw.cpu(), cw)
        region = tr._view(tr.o_ddata, world * Tmax * tr.row).view(world * Tmax, tr.row).cpu()
        got = tr._view(tr.o_dcnt, 2 * world, torch.int32).cpu()[0::2].tolist()
        for s_ in range(world):
            rows = region[s_ * Tmax:s_ * Tmax + got[s_]]
            assert (rows[:, row_bytes:] == 0xAB).all(), "bytes past the FP8 row were written"
            assert not (rows[:, :row_bytes] == 0xAB).all(1).any()
        nv.combine(torch.ones(rq.shape[0], H, dtype=torch.bfloat16, device=dev), h)  # bf16 combine after FP8
        # --- zero is a size: rank 0 routes every token to -1, rank 1 has no token; forward and backward
        xe = (x[:0] if rank == 1 else x).clone().requires_grad_(True)
        ie = idx[:0] if rank == 1 else torch.full_like(idx, -1)
        we = (w[:0] if rank == 1 else w).clone().requires_grad_(True)
        a, ai, aw, acnt, ha = nv.dispatch(xe, ie, we)
        assert a.shape == (0, H) and ai.shape == (0, k) and int(acnt.sum()) == 0
        o = nv.combine(a * 2, ha)
        assert o.shape == xe.shape and (o == 0).all()
        (o.float().sum() + aw.sum()).backward()
        assert xe.grad.shape == xe.shape and (xe.grad == 0).all() and (we.grad == 0).all()
        nv.close()

        # --- graph-safe dispatch + combine + backward: no host synchronization at all
        gs = EPBuffer(None, E, H, backend="nvlink", max_tokens_per_rank=Tmax, num_sms=4, graph_safe=True, timeout=10)
        xg = x.clone().requires_grad_(True)
        bad = idx.clone()
        bad[0, 0] = E + 3  # out of range: no check possible without a sync; flagged, poisoned, raised later
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            a, ai, aw, _, ha = gs.dispatch(xg, idx, w)
            o = gs.combine((a.float() * 2).bfloat16(), ha)
            o.float().sum().backward()
            b, bi, bw, _, hb = gs.dispatch(x, bad if rank == 0 else idx, w)
            ob = gs.combine(b, hb)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        assert torch.isfinite(o.float()).all() and torch.isfinite(xg.grad.float()).all()
        if rank == 0:
            assert torch.isnan(b.float()).all() and torch.isnan(ob.float()).all() and (bi == -1).all()
            with pytest.raises(ValueError, match="topk_idx"):
                gs.check_error()
        gs.check_error()  # reported once, then cleared: the buffer stays usable
        a2, ai2, *_ = gs.dispatch(x, idx, w)
        torch.cuda.synchronize()
        live = (ai2 >= 0).any(1)
        assert torch.equal(ai2, ai) and torch.equal(a2[live], a.detach()[live])

        # --- a timeout in graph-safe mode: NaN outputs, sticky; later calls return at once, never stale rows
        gs2 = EPBuffer(None, E, H, backend="nvlink", max_tokens_per_rank=Tmax, num_sms=4, graph_safe=True, timeout=1.0)
        r = gs2.dispatch(x, idx, w)
        gs2.combine(r[0], r[4])
        torch.cuda.synchronize()
        dist.barrier()
        if rank == 0:
            t0 = time.time()
            r = gs2.dispatch(x, idx, w)      # rank 1 does not call: the wait kernel gives up after ~1 s
            out = gs2.combine(r[0], r[4])
            torch.cuda.synchronize()
            assert time.time() - t0 > 0.9
            assert torch.isnan(r[0].float()).all() and torch.isnan(r[2]).all() and (r[1] == -1).all()
            assert torch.isnan(out.float()).all()
            t0 = time.time()
            r = gs2.dispatch(x, idx, w)      # as a graph replay would: no second budget, poisoned
            torch.cuda.synchronize()
            assert time.time() - t0 < 0.5 and torch.isnan(r[0].float()).all() and (r[1] == -1).all()
            with pytest.raises(EPTimeoutError):
                gs2.check_error()
            with pytest.raises(EPTimeoutError, match="earlier exchange failed"):
                gs2.dispatch(x, idx, w)      # once the host knows, eager calls fail at once
            dist.barrier()
        else:
            dist.barrier()                   # rank 0 has given up; its kernels no longer signal
            r = gs2.dispatch(x, idx, w)
            out = gs2.combine(r[0], r[4])
            torch.cuda.synchronize()
            assert torch.isnan(out.float()).all()  # the failure spread: poisoned, not stale
            with pytest.raises(EPTimeoutError):
                gs2.check_error()

        # --- the same in eager mode: EPTimeoutError, then every later call raises at once
        ea = EPBuffer(None, E, H, backend="nvlink", max_tokens_per_rank=Tmax, num_sms=4, timeout=1.0)
        ea.dispatch(x, idx, w)
        dist.barrier()
        if rank == 0:
            with pytest.raises(EPTimeoutError):
                ea.dispatch(x, idx, w)
            t0 = time.time()
            with pytest.raises(EPTimeoutError):
                ea.dispatch(x, idx, w)
            assert time.time() - t0 < 0.5
        dist.barrier()
        if rank == 1:
            with pytest.raises(EPTimeoutError):
                ea.dispatch(x, idx, w)
                ea.dispatch(x, idx, w)

        # --- close() vs a captured graph: replays after close are no-ops over live memory and return NaN
        cg = EPBuffer(None, E, H, backend="nvlink", max_tokens_per_rank=Tmax, num_sms=4, graph_safe=True, timeout=10)

        def step():
            a, _, aw, _, ha = cg.dispatch(x, idx, w)
            return cg.combine(a, ha)

        expect = step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = step()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, expect)
        cg.close()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isnan(got.float()).all()
        del graph

        # --- a buffer dropped without close() frees its IPC memory (finalizer)
        for b_ in (gs, gs2, ea):
            b_.close()
        torch.cuda.synchronize()
        dist.barrier()
        free0 = torch.cuda.mem_get_info()[0]
        big = EPBuffer(None, E, H, backend="nvlink", max_tokens_per_rank=4096, num_sms=4)
        nbytes = big.config.nvlink_recv_bytes()
        assert nbytes > 40 * 2**20
        dist.barrier()
        del big
        gc.collect()
        torch.cuda.synchronize()
        dist.barrier()
        assert torch.cuda.mem_get_info()[0] > free0 - nbytes // 2
    finally:
        dist.destroy_process_group()


def test_nvlink_dead_peer_times_out():
    """A peer that never joins the exchange: the waiting rank raises EPTimeoutError after about its 3 s
    budget (wall-clock wait in the kernel) instead of hanging."""
    mp.spawn(_dead_peer_worker, args=(2, _free_port()), nprocs=2, join=True)


def test_nvlink_failure_semantics():
    """FP8 row size, sync-free graph-safe path, timeout poisoning (graph-safe) and raising (eager), close()
    vs a captured graph, the finalizer; 2 processes on one GPU."""
    mp.spawn(_worker_failure_semantics, args=(2, _free_port()), nprocs=2, join=True)
