"""Expert-parallel dispatch/combine: CPU tier on gloo with 2, 3 and 4 processes (exact payload checks,
identity-expert round trip, gradients vs a single-process reference; all -1 routing, every token to one
rank's experts, empty ranks, gradients needed on some ranks only, disagreeing ranks, torch.compile; a peer
that never calls, a peer killed mid-run, a peer that never joins), config validation.

Each spawn runs many situations (process start-up dominates the cost on a small machine)."""
import datetime
import os
import socket
import tempfile
import time
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsmoe.parallel import EPBuffer, EPConfig, EPTimeoutError, get_dispatch_layout

H = 24
TOKENS = {2: [13, 7], 3: [5, 11, 0], 4: [9, 0, 17, 5]}  # odd sizes and an empty rank
TOP_K = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_inputs(rank, world, E, dtype=torch.float64):
    """Every rank can rebuild every other rank's inputs: seeded by the rank."""
    g = torch.Generator().manual_seed(1000 + rank)
    T = TOKENS[world][rank]
    x = torch.randn(T, H, generator=g, dtype=dtype)
    x[:, 0] = rank  # payload encodes its origin
    x[:, 1] = torch.arange(T, dtype=dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:TOP_K] for _ in range(T)]) if T else torch.empty(0, TOP_K, dtype=torch.long)
    if T:
        idx[torch.rand(T, TOP_K, generator=g) < 0.15] = -1
    w = torch.rand(T, TOP_K, generator=g, dtype=dtype)
    return x, idx.to(torch.int32), w


def _expert_scale(E):
    return torch.linspace(0.5, 2.0, E, dtype=torch.float64)


def _init(rank, world, port, timeout_s=20):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _worker_dispatch(rank, world, port, E):
    _init(rank, world, port)
    try:
        L = E // world
        buf = EPBuffer(None, E, H)
        x, idx, w = _rank_inputs(rank, world, E)
        # --- layout
        ntr, nte, in_rank = buf.get_dispatch_layout(idx)
        for r in range(world):
            exp_in = ((idx >= r * L) & (idx < (r + 1) * L)).any(1)
            assert torch.equal(in_rank[:, r], exp_in)
            assert int(ntr[r]) == int(exp_in.sum())
        assert torch.equal(nte, torch.bincount(idx[idx >= 0].long(), minlength=E).to(torch.int32))
        # --- dispatch, exact expected rows built from every rank's inputs
        xr = x.clone().requires_grad_(True)
        wr = w.clone().requires_grad_(True)
        recv_x, recv_idx, recv_w, cnt, handle = buf.dispatch(xr, idx, wr)
        ex_x, ex_idx, ex_w = [], [], []
        for s in range(world):
            xs, is_, ws = _rank_inputs(s, world, E)
            for t in range(xs.shape[0]):
                on = (is_[t] >= rank * L) & (is_[t] < (rank + 1) * L)
                if on.any():
                    ex_x.append(xs[t])
                    ex_idx.append(torch.where(on, is_[t] - rank * L, torch.full_like(is_[t], -1)))
                    ex_w.append(torch.where(on, ws[t], torch.zeros_like(ws[t])).float())
        R = len(ex_x)
        assert recv_x.shape == (R, H)
        if R:
            assert torch.equal(recv_x.detach(), torch.stack(ex_x))
            assert torch.equal(recv_idx, torch.stack(ex_idx).to(torch.int32))
            assert torch.equal(recv_w.detach(), torch.stack(ex_w))
            # origin columns: source rank ascending, then token index ascending
            key = recv_x[:, 0].detach() * 10000 + recv_x[:, 1].detach()
            assert torch.equal(key, key.sort().values)
        assert torch.equal(cnt, torch.bincount(recv_idx[recv_idx >= 0].long(), minlength=L).to(torch.int32))
        # --- experts: scale by a per-expert constant, weighted sum over local slots
        c = _expert_scale(E)[rank * L:(rank + 1) * L]
        li = recv_idx.long()
        scale = torch.where(li >= 0, c[li.clamp(min=0)], torch.zeros((), dtype=torch.float64))
        coef = (recv_w.double() * scale).sum(1, keepdim=True)
        y = coef * recv_x
        out = buf.combine(y, handle)
        # reference for this rank's tokens
        cE = _expert_scale(E)
        valid = idx >= 0
        s_ref = torch.where(valid, cE[idx.long().clamp(min=0)], torch.zeros((), dtype=torch.float64))
        xr2 = x.clone().requires_grad_(True)
        wr2 = w.clone().requires_grad_(True)
        ref_out = (wr2.float().double() * s_ref).sum(1, keepdim=True) * xr2
        torch.testing.assert_close(out, ref_out.detach(), rtol=1e-6, atol=1e-9)
        # identity experts, unit scale: combine(dispatch(x)) == sum_k w_k x
        ident = buf.combine((recv_w.double().sum(1, keepdim=True) * recv_x).detach(), handle)
        torch.testing.assert_close(ident, (w.float().double() * valid).sum(1, keepdim=True) * x, rtol=1e-6, atol=1e-9)
        # --- gradients vs the single-process reference
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7 + rank), dtype=torch.float64)
        (out * g).sum().backward()
        (ref_out * g).sum().backward()
        torch.testing.assert_close(xr.grad, xr2.grad, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(wr.grad, wr2.grad, rtol=1e-5, atol=1e-6)
        # --- FP8 form moves bytes unchanged
        if H % 128 == 0:  # pragma: no cover - H is 24 here; FP8 path checked in its own worker
            pass
        # --- determinism: a rerun gives the same bytes
        r2 = buf.dispatch(x, idx, w)
        assert torch.equal(r2[0], recv_x.detach()) and torch.equal(r2[2], recv_w.detach())
        assert buf.timeout == datetime.timedelta(seconds=20)  # the process group's timeout by default
        _situations(buf, rank, world, E)
        _disagreements(buf, rank, world, E, (x, idx, w), r2)
        if world == 2:
            _fp8_bytes(rank, world)
            _compiled(buf, rank, world, E)
            _collective_counts(rank, world, E)
    finally:
        dist.destroy_process_group()


SITUATIONS = ("random", "all_minus_one", "one_rank", "empty_ranks", "grad_some")


def _situation_inputs(name, rank, world, E):
    """Inputs of ``rank`` in a situation; any rank can rebuild any other rank's (seeded by both)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{rank}/{world}".encode()))
    L = E // world
    T = {"random": 3 + 2 * rank, "all_minus_one": 0 if rank == 0 else 4 + rank, "one_rank": 5 + rank,
         "empty_ranks": 0 if rank % 2 else 6 + rank, "grad_some": 4 + 3 * rank}[name]
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    w = torch.rand(T, TOP_K, generator=g, dtype=torch.float64)
    if name == "all_minus_one":
        idx = torch.full((T, TOP_K), -1, dtype=torch.int32)
    elif name == "one_rank":  # every token only to rank 0's experts (padded with -1 when L < k)
        idx = torch.full((T, TOP_K), -1, dtype=torch.int32)
        for t in range(T):
            p = torch.randperm(L, generator=g)[:TOP_K]
            idx[t, :p.numel()] = p.to(torch.int32)
    else:
        idx = torch.stack([torch.randperm(E, generator=g)[:TOP_K] for _ in range(T)]).to(torch.int32) if T else \
            torch.empty(0, TOP_K, dtype=torch.int32)
    return x, idx, w


def _situations(buf, rank, world, E):
    """Each situation vs the single-process formula ``out = sum_j w_j c[e_j] x`` (double precision): outputs,
    received row counts, x and weight gradients, on every rank (every rank runs backward)."""
    cE = _expert_scale(E)
    L = E // world
    c = cE[rank * L:(rank + 1) * L]
    for name in SITUATIONS:
        x, idx, w = _situation_inputs(name, rank, world, E)
        # grad_some: x on even ranks but 2, weights on odd ranks; rank 2 (worlds 3, 4) needs no gradient
        need_x = name != "grad_some" or (rank % 2 == 0 and rank != 2)
        need_w = name != "grad_some" or rank % 2 == 1
        xr = x.clone().requires_grad_(need_x)
        wr = w.clone().requires_grad_(need_w)
        recv_x, recv_idx, recv_w, cnt, handle = buf.dispatch(xr, idx, wr)
        expect_rows = sum(int((((_situation_inputs(name, s, world, E)[1] // L) == rank)
                                & (_situation_inputs(name, s, world, E)[1] >= 0)).any(1).sum()) for s in range(world))
        assert recv_x.shape == (expect_rows, H), (name, recv_x.shape, expect_rows)
        if name in ("all_minus_one",) or (name == "one_rank" and rank):
            assert expect_rows == 0
        li = recv_idx.long()
        scale = torch.where(li >= 0, c[li.clamp(min=0)], torch.zeros((), dtype=torch.float64))
        y = (recv_w.double() * scale).sum(1, keepdim=True) * recv_x
        out = buf.combine(y, handle)
        assert out.shape == x.shape and out.dtype == x.dtype
        valid = idx >= 0
        s_ref = torch.where(valid, cE[idx.long().clamp(min=0)], torch.zeros((), dtype=torch.float64))
        xr2 = x.clone().requires_grad_(True)
        wr2 = w.clone().requires_grad_(True)
        ref = (wr2.float().double() * s_ref).sum(1, keepdim=True) * xr2
        torch.testing.assert_close(out, ref.detach(), rtol=1e-6, atol=1e-9, msg=lambda m: f"{name}: {m}")
        gout = torch.randn(x.shape, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
        assert out.requires_grad  # the anchor: backward runs on every rank, whatever needs a gradient here
        (out * gout).sum().backward()
        (ref * gout).sum().backward()
        if need_x:
            torch.testing.assert_close(xr.grad, xr2.grad, rtol=1e-6, atol=1e-9, msg=lambda m: f"{name} dx: {m}")
        else:
            assert xr.grad is None
        if need_w:
            torch.testing.assert_close(wr.grad, wr2.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} dw: {m}")
            assert (wr.grad[~valid] == 0).all()
        else:
            assert wr.grad is None


def _disagreements(buf, rank, world, E, good, good_result):
    """Ranks that disagree raise ValueError on EVERY rank, naming the field and each rank's value; the buffer
    stays usable. Argument errors are raised as they are (never relabelled as timeouts)."""
    x, idx, w = good
    last = rank == world - 1
    # per call: dtype
    with pytest.raises(ValueError, match=r"dtype: rank 0 = float64.*rank %d = float32" % (world - 1)):
        buf.dispatch(x.float() if last else x, idx, w)
    # per call: top_k
    with pytest.raises(ValueError, match=r"top_k: rank 0 = 3.*rank %d = 2" % (world - 1)):
        buf.dispatch(x, idx[:, :2] if last else idx, w[:, :2] if last else w)
    # first-call handshake: hidden, num_experts (each buffer checks on its first dispatch)
    Hb = H + 8 if last else H
    other = EPBuffer(None, E, Hb)
    with pytest.raises(ValueError, match=r"hidden: rank 0 = %d.*rank %d = %d" % (H, world - 1, H + 8)):
        other.dispatch(torch.zeros(1, Hb, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1))
    other = EPBuffer(None, 2 * E if last else E, H)
    with pytest.raises(ValueError, match=r"num_experts: rank 0 = %d.*= %d" % (E, 2 * E)):
        other.dispatch(torch.zeros(1, H, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1))
    # argument errors: local, before any collective, their own type
    with pytest.raises(ValueError, match="split sizes"):
        buf._a2a(torch.empty(3, 2), torch.empty(3, 2), [1] * world, [5] * world, "test")
    with pytest.raises(ValueError, match="topk_idx"):
        buf.dispatch(torch.zeros(1, H, dtype=torch.float64), torch.full((1, TOP_K), E, dtype=torch.int32), torch.ones(1, TOP_K))
    r = buf.dispatch(x, idx, w)
    with pytest.raises(TypeError, match="dtype"):
        buf.combine(r[0].float(), r[4])
    # still usable, same bytes as before
    assert torch.equal(r[0], good_result[0].detach()) and torch.equal(r[2], good_result[2].detach())
    buf.combine(r[0], r[4])


def _compiled(buf, rank, world, E):
    """dispatch -> experts -> combine inside torch.compile (dispatch/combine run eagerly at a graph break):
    same outputs and gradients as eager, including an empty rank."""
    def f(x, idx, w):
        rx, ri, rw, _, h = buf.dispatch(x, idx, w)
        y = torch.tanh(rx) * rw.sum(1, keepdim=True).to(rx.dtype)
        return buf.combine(y, h) * 3

    cf = torch.compile(f, backend="aot_eager", dynamic=True)
    for name in ("random", "empty_ranks"):
        x, idx, w = _situation_inputs(name, rank, world, E)
        res = []
        for fn in (f, cf):
            xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
            out = fn(xr, idx, wr)
            out.sum().backward()
            res.append((out.detach(), xr.grad, wr.grad))
        for a, b in zip(*res):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _collective_counts(rank, world, E):
    """The collectives each call issues (every rank the same, whatever its data): the first dispatch one
    handshake all_gather; every dispatch one count exchange and ONE byte-row all_to_all (payload, scales,
    ids and weights together, FP8 too); combine and each backward one all_to_all; nothing else."""
    calls = []
    real = {n: getattr(dist, n) for n in ("all_to_all_single", "all_gather", "all_reduce", "broadcast",
                                          "all_gather_object", "barrier")}

    def spy(name):
        def f(*a, **kw):
            calls.append(name)
            return real[name](*a, **kw)
        return f

    for n in real:
        setattr(dist, n, spy(n))
    try:
        buf = EPBuffer(None, E, H)
        x, idx, w = _situation_inputs("empty_ranks", rank, world, E)  # rank 1 has no token
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        rx, _, rw, _, h = buf.dispatch(xr, idx, wr)
        assert calls == ["all_gather", "all_to_all_single", "all_to_all_single"], calls
        calls.clear()
        out = buf.combine(rx * rw.sum(1, keepdim=True).to(rx.dtype), h)
        assert calls == ["all_to_all_single"], calls
        calls.clear()
        out.sum().backward()
        assert calls == ["all_to_all_single"] * 2, calls  # combine backward, dispatch backward
        calls.clear()
        buf.dispatch(x, idx, w)                             # no handshake after the first call
        assert calls == ["all_to_all_single"] * 2, calls
        calls.clear()
        fb = EPBuffer(None, 8, 128)
        q = torch.zeros(3 * (1 - rank), 128, dtype=torch.float8_e4m3fn)
        fb.dispatch((q, torch.ones(q.shape[0], 1)), torch.zeros(q.shape[0], 2, dtype=torch.int32), torch.ones(q.shape[0], 2))
        assert calls == ["all_gather", "all_to_all_single", "all_to_all_single"], calls
    finally:
        for n, f in real.items():
            setattr(dist, n, f)


def _fp8_bytes(rank, world):
    if True:
        E, Hf = 8, 256
        buf = EPBuffer(None, E, Hf)
        g = torch.Generator().manual_seed(rank)
        T = 6 + rank
        q = (torch.randn(T, Hf, generator=g) * 50).to(torch.float8_e4m3fn)
        s = torch.rand(T, 2, generator=g)
        idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)]).to(torch.int32)
        w = torch.rand(T, 2, generator=g)
        (rq, rs), ridx, rw, cnt, h = buf.dispatch((q, s), idx, w)
        assert rq.dtype == torch.float8_e4m3fn and rs.shape == (rq.shape[0], 2)
        # gather expected from all ranks
        exp_q, exp_s = [], []
        for src in range(world):
            gg = torch.Generator().manual_seed(src)
            Ts = 6 + src
            qs = (torch.randn(Ts, Hf, generator=gg) * 50).to(torch.float8_e4m3fn)
            ss = torch.rand(Ts, 2, generator=gg)
            ids = torch.stack([torch.randperm(E, generator=gg)[:2] for _ in range(Ts)])
            for t in range(Ts):
                if ((ids[t] // (E // world)) == rank).any():
                    exp_q.append(qs[t])
                    exp_s.append(ss[t])
        assert torch.equal(rq.view(torch.uint8), torch.stack(exp_q).view(torch.uint8))
        assert torch.equal(rs, torch.stack(exp_s))
        # combine after an FP8 dispatch takes bfloat16 rows
        assert h.dtype == torch.bfloat16
        out = buf.combine(torch.ones(rq.shape[0], Hf, dtype=torch.bfloat16), h)
        assert torch.equal(out, torch.ones(T, Hf, dtype=torch.bfloat16) * torch.tensor(
            [len(set((idx[t] // (E // world)).tolist())) for t in range(T)], dtype=torch.bfloat16).unsqueeze(1))


def _worker_failures(rank, world, port, timeout_s, q):
    """Phase A (WORLD): the last rank never calls: the others raise EPTimeoutError within the timeout, and
    the failed buffer refuses later calls at once. Phase B (a second group): one good exchange, then the
    last rank is killed (SIGKILL) mid-run: the others raise EPTimeoutError within the timeout."""
    res = {}
    try:
        _init(rank, world, port, 60)
        g2 = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=timeout_s))
        E = 2 * world
        x, idx, w = _situation_inputs("random", rank, world, E)
        buf = EPBuffer(None, E, H, timeout=timeout_s)
        last = rank == world - 1
        if last:
            time.sleep(timeout_s + 1.5)  # never calls dispatch on WORLD
        else:
            t0 = time.time()
            try:
                buf.dispatch(x, idx, w)
                res["A"] = "returned"
            except EPTimeoutError as e:
                res["A"] = (time.time() - t0, "dispatch" in str(e))
            t0 = time.time()
            try:
                buf.dispatch(x, idx, w)
            except EPTimeoutError as e:
                res["A2"] = (time.time() - t0, "earlier collective" in str(e))
        b2 = EPBuffer(g2, E, H)
        xr = x.clone().requires_grad_(True)
        rx, ri, rw, _, h = b2.dispatch(xr, idx, w)
        b2.combine(rx * 2, h).sum().backward()
        copies = get_dispatch_layout(idx, E, world)[2].sum(1, keepdim=True).double()  # ranks holding a copy
        res["B0"] = bool(torch.equal(xr.grad, (2 * copies).expand_as(x)))
        if last:
            q.put((rank, res))
            q.close()
            q.join_thread()  # flushed before the kill
            os.kill(os.getpid(), 9)  # dies mid-run, between two calls of its peers
        time.sleep(0.5)
        t0 = time.time()
        try:
            for _ in range(3):  # the forward, or at the latest the next call, sees the dead peer
                b2.dispatch(x, idx, w)
            res["B"] = "returned"
        except EPTimeoutError:
            res["B"] = time.time() - t0
        q.put((rank, res))
    except BaseException:  # noqa: BLE001
        import traceback
        q.put((rank, traceback.format_exc()))
    finally:
        q.close()
        q.join_thread()
        os._exit(0)  # survivors: no destroy_process_group on a group with a dead member


def _worker_never_joins(rank, world, port, timeout_s, out):
    t0 = time.time()
    try:
        _init(rank, world, port, timeout_s)
    except Exception as e:  # noqa: BLE001 - torch raises DistStoreError / RuntimeError
        with open(out, "w") as f:
            f.write(f"{time.time() - t0:.2f} {type(e).__name__}")
        return
    with open(out, "w") as f:
        f.write("joined")


@pytest.mark.dist
@pytest.mark.timeout(120)
@pytest.mark.parametrize("world,E", [(2, 6), (3, 6), (4, 8)])
def test_dispatch_combine(world, E):
    """Exact rows, round trip, gradients; the situations; disagreements; (world 2) FP8 bytes, torch.compile."""
    mp.spawn(_worker_dispatch, args=(world, _free_port(), E), nprocs=world, join=True)


@pytest.mark.dist
@pytest.mark.timeout(90)
def test_peer_absent_or_killed_raises_timeout():
    world, timeout_s = 3, 3
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    ps = [ctx.Process(target=_worker_failures, args=(r, world, port, timeout_s, q)) for r in range(world)]
    for p in ps:
        p.start()
    try:
        res = dict(q.get(timeout=75) for _ in ps)
    finally:
        for p in ps:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    for r in range(world - 1):
        assert isinstance(res[r], dict), res[r]
        el, named = res[r]["A"]
        assert named and timeout_s - 0.5 < el < timeout_s + 5, res[r]
        assert res[r]["A2"][1] and res[r]["A2"][0] < 1, res[r]
        assert res[r]["B0"], res[r]
        assert res[r]["B"] != "returned" and res[r]["B"] < timeout_s + 5, res[r]
    assert res[world - 1] == {"B0": True}, res[world - 1]


@pytest.mark.dist
def test_peer_never_joins_times_out():
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r")
        t0 = time.time()
        # world size 2, only rank 0 starts
        mp.spawn(_worker_never_joins, args=(2, _free_port(), 4, out), nprocs=1, join=True)
        assert time.time() - t0 < 45
        res = open(out).read()
    assert res != "joined"
    assert float(res.split()[0]) < 30


def test_config_validation():
    with pytest.raises(ValueError, match="num_experts.*split evenly"):
        EPConfig(world_size=3, num_experts=8, hidden=16)
    with pytest.raises(ValueError, match="backend"):
        EPConfig(world_size=2, num_experts=8, hidden=16, backend="ib")
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        EPConfig(world_size=2, num_experts=8, hidden=16, backend="nvlink")
    with pytest.raises(ValueError, match="hidden"):
        EPConfig(world_size=2, num_experts=8, hidden=12, backend="nvlink", max_tokens_per_rank=64)
    cfg = EPConfig(world_size=4, num_experts=256, hidden=7168, backend="nvlink", max_tokens_per_rank=128)
    assert cfg.num_local_experts == 64
    # what the transport allocates: both regions (dispatch pitch: bf16 row + ids + weights for top_k_max=32;
    # combine pitch: bf16 row + weight gradients) plus counts, flags, epochs, done counters, status words
    disp_row, comb_row = 7168 * 2 + 2 * 32 * 4, 7168 * 2 + 32 * 4
    assert cfg.nvlink_recv_bytes() == 4 * 128 * (disp_row + comb_row) + 2 * 32 + 2 * 32 + 5 * 16
    big = EPConfig(world_size=8, num_experts=256, hidden=7168, backend="nvlink", max_tokens_per_rank=4096)
    assert 950e6 < big.nvlink_recv_bytes() < 953e6          # ~952 MB at 8 ranks x 4096 tokens
    assert EPConfig(world_size=2, num_experts=8, hidden=16).nvlink_recv_bytes() == 0  # collective: nothing
    # FP8 dispatch copies its own row (bytes + scales + ids + weights), about half the bf16 row
    lay = big.nvlink_layout()
    assert lay.dispatch_row(True, 8)[0] == 7168 + 56 * 4 + 2 * 32 == 7456
    assert lay.dispatch_row(False, 8)[0] == 7168 * 2 + 2 * 32
    # num_sms: bounded by the device's SM count when the transport is built (B200 has 148), not by 132
    assert EPConfig(world_size=2, num_experts=8, hidden=16, backend="nvlink", max_tokens_per_rank=8, num_sms=148).num_sms == 148
    with pytest.raises(ValueError, match="num_sms"):
        EPConfig(world_size=2, num_experts=8, hidden=16, backend="nvlink", max_tokens_per_rank=8, num_sms=0)


def test_layout_single_process():
    idx = torch.tensor([[0, 5, -1], [2, 3, 1], [-1, -1, -1], [7, 6, 4]], dtype=torch.int32)
    ntr, nte, in_rank = get_dispatch_layout(idx, 8, 4)
    assert in_rank.tolist() == [[True, False, True, False], [True, True, False, False], [False] * 4,
                                [False, False, True, True]]
    assert ntr.tolist() == [2, 1, 2, 1]
    assert nte.tolist() == [1, 1, 1, 1, 1, 1, 1, 1]


def test_layout_matches_loop_random():
    g = torch.Generator().manual_seed(7)
    T, k, E, W = 41, 5, 24, 3
    idx = torch.randint(-1, E, (T, k), generator=g)
    ntr, nte, in_rank = get_dispatch_layout(idx, E, W)
    L = E // W
    exp_in = [[any(int(e) >= 0 and int(e) // L == r for e in idx[t]) for r in range(W)] for t in range(T)]
    assert in_rank.tolist() == exp_in
    assert ntr.tolist() == [sum(row[r] for row in exp_in) for r in range(W)]
    assert nte.tolist() == [int((idx == e).sum()) for e in range(E)]
    assert ntr.dtype == nte.dtype == torch.int32


def test_layout_rejects_ids_out_of_range():
    """Only -1 is skipped: -2 and ids >= E are a ValueError naming topk_idx (not an IndexError or a silent skip)."""
    for bad in (-2, 8, 100):
        idx = torch.tensor([[0, 5], [bad, 3]], dtype=torch.int32)
        with pytest.raises(ValueError, match=r"dsmoe\.get_dispatch_layout: argument 'topk_idx': values must be in "
                                             r"\[-1, 8\) \(-1 = skipped\)"):
            get_dispatch_layout(idx, 8, 4)
        # unchecked (validate=False, or while capturing): skipped like -1, never an out-of-bounds access
        ntr, nte, in_rank = get_dispatch_layout(idx, 8, 4, validate=False)
        assert in_rank.tolist() == [[True, False, True, False], [False, True, False, False]]
        assert nte.tolist() == [1, 0, 0, 1, 0, 1, 0, 0] and ntr.tolist() == [1, 1, 1, 0]
    with pytest.raises(ValueError, match=r"'num_experts'=9 must be a multiple of world_size=4"):
        get_dispatch_layout(torch.zeros(1, 1, dtype=torch.int64), 9, 4)
    with pytest.raises(TypeError, match=r"'topk_idx' must have dtype int32 or int64"):
        get_dispatch_layout(torch.zeros(1, 1), 8, 4)
    ntr, nte, in_rank = get_dispatch_layout(torch.empty(0, 3, dtype=torch.int64), 8, 4)
    assert ntr.tolist() == [0] * 4 and nte.tolist() == [0] * 8 and in_rank.shape == (0, 4)


def test_nvlink_owner_weight_grad_matches_masked_sum():
    """The nvlink backward takes slot j's weight gradient from the rank owning expert topk_idx[t, j]; the
    collective backend sums the gradients of every rank masked to its local slots. Same numbers."""
    from dsmoe.parallel.nvlink import owner_weight_grad
    g = torch.Generator().manual_seed(3)
    W, T, k, L = 4, 29, 6, 5
    idx = torch.randint(-1, W * L, (T, k), generator=g)
    per_rank = torch.randn(W, T, k, generator=g)
    dw = owner_weight_grad(per_rank, idx, L)
    expect = torch.zeros(T, k)
    for r in range(W):
        local = (idx >= 0) & (idx // L == r)
        expect += torch.where(local, per_rank[r], torch.zeros(()))
    assert torch.equal(dw, expect)
    assert owner_weight_grad(per_rank[:, :0], idx[:0], L).shape == (0, k)


def test_no_import_circle_between_buffer_and_nvlink():
    """buffer.py imports nvlink.py; nvlink.py takes what it shares with buffer.py from common.py."""
    import ast

    import dsmoe.parallel.common as common
    import dsmoe.parallel.nvlink as nvlink
    for mod, forbidden in ((nvlink, ("buffer",)), (common, ("buffer", "nvlink"))):
        tree = ast.parse(open(mod.__file__).read())
        imported = {(n.module or "").rsplit(".", 1)[-1] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name.rsplit(".", 1)[-1] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not imported & set(forbidden), (mod.__name__, imported)


def test_nvlink_backward_after_close_or_failure_raises_first():
    """An autograd graph can outlive close() (or a reported timeout): the nvlink backward entry points refuse
    before touching the freed buffer or the launcher (CPU: a transport in its closed/failed state)."""
    from dsmoe.parallel.common import EPHandle
    from dsmoe.parallel.nvlink import NVLinkTransport
    h = EPHandle(1, torch.zeros(1, 2, dtype=torch.int32), [], [1, 1], torch.ones(1, 2, dtype=torch.bool), 1,
                 torch.bfloat16, {"num_tokens": 1, "k": 1})
    y = torch.zeros(2, 8, dtype=torch.bfloat16)
    tr = object.__new__(NVLinkTransport)
    tr.peers, tr._failed = [], None  # what close() leaves
    with pytest.raises(RuntimeError, match=r"EPBuffer\.dispatch backward: the nvlink buffer was closed"):
        tr._combine_raw(y, h, torch.zeros(2, 1))
    with pytest.raises(RuntimeError, match=r"EPBuffer\.combine backward: the nvlink buffer was closed"):
        tr._combine_backward(torch.zeros(1, 8), h)
    tr.peers, tr._failed = [1, 2], "peer rank 1 did not signal"  # what a reported timeout leaves
    with pytest.raises(EPTimeoutError, match="dispatch backward: an earlier exchange failed"):
        tr._combine_raw(y, h, torch.zeros(2, 1))
    with pytest.raises(EPTimeoutError, match="combine backward: an earlier exchange failed"):
        tr._combine_backward(torch.zeros(1, 8), h)


def _worker_close_barrier(rank, world, port, out):
    # the nvlink close()'s barriers, with a peer that never reaches them (its memory needs CUDA; the
    # barrier logic does not)
    from dsmoe.parallel.nvlink import _Memory

    _init(rank, world, port, timeout_s=60)
    if rank == 1:
        time.sleep(8)  # alive, but never calls the barrier
        return
    mem = _Memory.__new__(_Memory)
    mem.captured, mem.base, mem.peers = False, 123, [1, 2]
    t0 = time.time()
    try:
        mem._barrier(None, datetime.timedelta(seconds=2), "test")
        res = "returned"
    except EPTimeoutError as e:
        res = f"{time.time() - t0:.2f} {mem.captured} {mem.base} {'within the timeout' in str(e)}"
    with open(out, "w") as f:
        f.write(res)


@pytest.mark.dist
def test_nvlink_close_barrier_times_out_and_keeps_memory_mapped():
    """close() with a peer that never arrives raises EPTimeoutError within the buffer's timeout (not the
    group's 60 s) and leaves the memory mapped (a live peer may still write into it)."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r")
        mp.spawn(_worker_close_barrier, args=(2, _free_port(), out), nprocs=2, join=True)
        secs, captured, base, named = open(out).read().split()
    assert float(secs) < 6 and captured == "True" and base == "0" and named == "True"
