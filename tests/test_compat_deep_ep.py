"""dsmoe.compat.deep_ep: DeepEP's normal-mode Buffer API on gloo with 2 and 3 processes, called the way
DeepEP's tests/test_intranode.py, SGLang's DeepEP dispatcher and Megatron's fused all-to-all call it.

Every rank can rebuild every rank's inputs (seeded by rank), so the receiver checks each row against an
independent torch computation: payload rows carry (source rank, token index) in their first columns and
must arrive rank-major, token-ascending; local expert ids, weights, per-expert counts (aligned), the rank
prefix matrix, recv_src_idx; top-k-less, cached and FP8 dispatch; num_worst_tokens padding; combine (an
unweighted fp32 sum over ranks, rounded once) and combined top-k weights; events; errors raised on every
rank before any collective; ranks that disagree. A GPU test runs the nvlink backend against the collective
one on the same inputs."""
import datetime
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dsmoe.compat.deep_ep as deep_ep

H = 256
TOP_K = 3
TOKENS = {2: [11, 0], 3: [7, 0, 12]}  # odd sizes and a rank without tokens
EXPERTS = {2: 8, 3: 9}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank, world, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def _inputs(rank, world, salt=0):
    """(x bf16 [T, H] with x[:, 0] = rank, x[:, 1] = token; topk_idx int64 with -1s; weights fp32;
    FP8 bytes and scales) of ``rank``: any rank can rebuild them. ``salt`` changes the payloads only."""
    g = torch.Generator().manual_seed(7919 * rank + 5)
    gp = torch.Generator().manual_seed(7919 * rank + 31 * salt + 6)
    T, E = TOKENS[world][rank], EXPERTS[world]
    x = (torch.randn(T, H, generator=gp) * 4).bfloat16()
    x[:, 0] = rank
    x[:, 1] = torch.arange(T, dtype=torch.float32)
    idx = torch.stack([torch.randperm(E, generator=g)[:TOP_K] for _ in range(T)]) if T else \
        torch.empty(0, TOP_K, dtype=torch.long)
    if T:
        idx[torch.rand(T, TOP_K, generator=g) < 0.2] = -1
        idx[0] = -1  # a token that goes nowhere
    w = torch.rand(T, TOP_K, generator=g) + 0.1
    q = torch.randint(0, 256, (T, H), generator=gp, dtype=torch.uint8)
    q[(q & 0x7F) == 0x7F] = 0  # no NaN bytes, so the test can also compare values
    s = torch.rand(T, H // 128, generator=gp) + 0.5
    return x, idx.long(), w, q.view(torch.float8_e4m3fn), s


def _expected(me, world, salt=0):
    """Rows this rank must receive, rank-major then by token: (x rows, fp8 rows, scales, local ids,
    weights, source token index) and the rank matrix M[s, d]."""
    E = EXPERTS[world]
    L = E // world
    xs, qs, ss, ids, ws, src = [], [], [], [], [], []
    M = torch.zeros(world, world, dtype=torch.long)
    for s in range(world):
        x, idx, w, q, sc = _inputs(s, world, salt)
        for t in range(x.shape[0]):
            for d in range(world):
                M[s, d] += int(((idx[t] >= d * L) & (idx[t] < (d + 1) * L)).any())
            on = (idx[t] >= me * L) & (idx[t] < (me + 1) * L)
            if on.any():
                xs.append(x[t])
                qs.append(q[t].view(torch.uint8))
                ss.append(sc[t])
                ids.append(torch.where(on, idx[t] - me * L, torch.full_like(idx[t], -1)))
                ws.append(torch.where(on, w[t], torch.zeros_like(w[t])))
                src.append(t)

    def st(v, shape, dt):
        return torch.stack(v) if v else torch.empty(shape, dtype=dt)

    return (st(xs, (0, H), torch.bfloat16), st(qs, (0, H), torch.uint8), st(ss, (0, H // 128), torch.float32),
            st(ids, (0, TOP_K), torch.long), st(ws, (0, TOP_K), torch.float32),
            torch.tensor(src, dtype=torch.int32), M)


def _check(group, world):
    """Everything on one group of ``world`` ranks (rank = the rank in the group)."""
    rank = dist.get_rank(group)
    E = EXPERTS[world]
    L = E // world
    buffer = deep_ep.Buffer(group, int(1e9), 0, low_latency_mode=False, num_qps_per_rank=1)
    x, topk_idx, topk_weights, q, sc = _inputs(rank, world)
    T = x.shape[0]
    ex_x, ex_q, ex_s, ex_idx, ex_w, ex_src, M = _expected(rank, world)
    R = ex_x.shape[0]

    # --- layout, vs loops over the tokens
    ntpr, ntprdma, ntpe, in_rank, ev = buffer.get_dispatch_layout(topk_idx, E)
    assert ntprdma is None and isinstance(ev, deep_ep.EventOverlap) and ev.event is None
    ref_in = torch.zeros(T, world, dtype=torch.bool)
    for t in range(T):
        for e in topk_idx[t].tolist():
            if e >= 0:
                ref_in[t, e // L] = True
    assert in_rank.dtype == torch.bool and in_rank.shape == (T, world) and torch.equal(in_rank, ref_in)
    assert ntpr.dtype == torch.int32 and ntpr.tolist() == ref_in.sum(0).tolist()
    assert ntpe.dtype == torch.int32 and ntpe.tolist() == [int((topk_idx == e).sum()) for e in range(E)]
    # the async form SGLang uses (previous event, comm-stream allocation)
    prev = deep_ep.Buffer.capture()
    *_, ev = buffer.get_dispatch_layout(topk_idx, E, previous_event=prev, async_finish=True,
                                        allocate_on_comm_stream=True)
    ev.current_stream_wait()

    gbl_expert = torch.zeros(E, dtype=torch.long)
    for s in range(world):
        gbl_expert += torch.bincount(_inputs(s, world)[1].flatten().clamp(min=-1) + 1, minlength=E + 1)[1:]
    mine_expert = gbl_expert[rank * L:(rank + 1) * L].tolist()

    def check_rows(recv_x, handle):
        assert recv_x.shape == (R, H) and recv_x.dtype == torch.bfloat16
        assert torch.equal(recv_x, ex_x)
        # DeepEP test_intranode's check: rows of source i sit in [prefix[i-1][rank], prefix[i][rank])
        start = 0
        for i in range(world):
            end = int(handle[0][i][rank])
            assert (recv_x[start:end, 0].float() == i).all()
            start = end
        assert start == R

    # --- dispatch, SGLang's keyword call
    recv_x, recv_idx, recv_w, per_expert, handle, ev = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=ntpr,
        num_tokens_per_rdma_rank=ntprdma, is_token_in_rank=in_rank, num_tokens_per_expert=ntpe,
        previous_event=None, async_finish=False, allocate_on_comm_stream=False, expert_alignment=1,
        config=deep_ep.Buffer.get_dispatch_config(world))
    check_rows(recv_x, handle)
    assert recv_idx.dtype == torch.int64 and torch.equal(recv_idx, ex_idx)
    assert recv_w.dtype == torch.float32 and torch.equal(recv_w, ex_w)
    assert per_expert == mine_expert and per_expert == [int((recv_idx == j).sum()) for j in range(L)]
    assert type(per_expert) is list and all(type(c) is int for c in per_expert)  # DeepEP: a Python list of ints
    assert handle[2].dtype == handle[5].dtype == torch.int32 and handle[5].shape == (T, world)
    assert isinstance(handle, tuple) and len(handle) == 6
    assert handle[0].dtype == torch.int32 and torch.equal(handle[0], M.cumsum(0).to(torch.int32))
    assert handle[3].dtype == torch.int32 and torch.equal(handle[3], ex_src)
    assert torch.equal(handle[4], in_rank)
    # channels: num_sms / 2 = 10 contiguous token ranges of ceil(T / 10) tokens
    def ch_end(n, c):
        return min((c + 1) * -(-n // 10), n)

    assert handle[1].dtype == torch.int32 and handle[1].shape == (world, 10)
    assert handle[1].tolist() == [[int(in_rank[:ch_end(T, c), r].sum()) for c in range(10)] for r in range(world)]
    starts = [0] + M[:, rank].cumsum(0).tolist()
    assert handle[2].tolist() == [[starts[s] + int((ex_src[starts[s]:starts[s + 1]] < ch_end(TOKENS[world][s], c - 1)).sum())
                                   if c else starts[s] for c in range(10)] for s in range(world)]
    # send_head: position of each token among the rows sent to a rank
    for r in range(world):
        sent = in_rank[:, r].nonzero().flatten()
        assert handle[5][sent, r].tolist() == list(range(sent.numel()))
        assert (handle[5][~in_rank[:, r], r] == -1).all()
    # the rows' own columns prove the source: (rank, token) pairs equal recv_src_idx, sorted
    if R:
        assert torch.equal(recv_x[:, 1].float().to(torch.int32), handle[3])
        key = recv_x[:, 0].float() * 1000 + recv_x[:, 1].float()
        assert torch.equal(key, key.sort().values)

    # --- expert_alignment pads the counts, not the rows
    rx4, _, _, per4, h4, _ = buffer.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=in_rank,
                                             num_tokens_per_expert=ntpe, topk_idx=topk_idx,
                                             topk_weights=topk_weights, expert_alignment=4)
    assert per4 == [-(-c // 4) * 4 for c in mine_expert] and torch.equal(rx4, ex_x)

    # --- without top-k (DeepEP test's with_topk=False): counts still come from num_tokens_per_expert
    rx_n, ri_n, rw_n, per_n, h_n, _ = buffer.dispatch(x=x, num_tokens_per_rank=ntpr, is_token_in_rank=in_rank,
                                                      num_tokens_per_expert=ntpe)
    assert ri_n is None and rw_n is None and per_n == mine_expert
    check_rows(rx_n, h_n)

    # --- cached dispatch: the handle moves new payloads the same way (test_intranode; Megatron's combine
    # backward), with and without async events
    x2, _, _, q2, s2 = _inputs(rank, world, salt=1)
    ex2 = _expected(rank, world, salt=1)
    out = buffer.dispatch(x2, handle=handle, config=deep_ep.Config(24, 8, 256))
    assert out[1:5] == (None, None, None, None) and torch.equal(out[0], ex2[0])
    out = buffer.dispatch(x=x2, handle=handle, previous_event=buffer.capture(), async_finish=True,
                          allocate_on_comm_stream=True)
    out[5].current_stream_wait()
    assert torch.equal(out[0], ex2[0])

    # --- FP8 payloads (e4m3 bytes + fp32 scales) move bit for bit, fresh and cached
    (rq, rs), ri8, rw8, per8, h8, _ = buffer.dispatch((q, sc), num_tokens_per_rank=ntpr, is_token_in_rank=in_rank,
                                                      num_tokens_per_expert=ntpe, topk_idx=topk_idx,
                                                      topk_weights=topk_weights)
    assert rq.dtype == torch.float8_e4m3fn and rs.dtype == torch.float32
    assert torch.equal(rq.view(torch.uint8), ex_q) and torch.equal(rs, ex_s)
    assert torch.equal(ri8, ex_idx) and torch.equal(rw8, ex_w) and per8 == mine_expert
    (cq, cs), *_ = buffer.dispatch((q2, s2.t().contiguous().t()), handle=h8)  # column-major scales too
    assert torch.equal(cq.view(torch.uint8), ex2[1]) and torch.equal(cs, ex2[2])

    # --- any scale count per row (DeepEP takes [T, num_scales]): per-token scales [T, 1] (vLLM's per-token
    # quantization) and 3 columns, fresh and cached, then combine over that handle
    (tq, ts), ti, tw, tl, th, _ = buffer.dispatch((q, sc[:, :1] * 3), num_tokens_per_rank=ntpr,
                                                  is_token_in_rank=in_rank, num_tokens_per_expert=ntpe,
                                                  topk_idx=topk_idx, topk_weights=topk_weights)
    assert tq.dtype == torch.float8_e4m3fn and ts.dtype == torch.float32 and ts.shape == (R, 1)
    assert torch.equal(tq.view(torch.uint8), ex_q) and torch.equal(ts, ex_s[:, :1] * 3)
    assert torch.equal(ti, ex_idx) and torch.equal(tw, ex_w) and tl == mine_expert
    assert torch.equal(th[3], ex_src) and torch.equal(th[0], M.cumsum(0).to(torch.int32))
    (cq3, cs3), *_ = buffer.dispatch((q2, torch.cat([s2, s2[:, :1]], 1)), handle=th)
    assert torch.equal(cq3.view(torch.uint8), ex2[1]) and torch.equal(cs3, torch.cat([ex2[2], ex2[2][:, :1]], 1))

    # --- combine: an unweighted sum over the ranks a token went to, fp32, rounded once; weights summed too.
    # Receiver r scales its rows by (r + 1): token t comes back as sum_r in_rank[t, r] * bf16((r + 1) x[t]).
    y = (recv_x.float() * (rank + 1)).bfloat16()
    cx, cw, ev = buffer.combine(y, handle, topk_weights=recv_w, config=deep_ep.Buffer.get_combine_config(world))
    assert ev.event is None
    ref = torch.zeros(T, H, dtype=torch.float64)
    for r in range(world):
        ref += in_rank[:, r:r + 1].double() * (x.float() * (r + 1)).bfloat16().double()
    assert cx.dtype == torch.bfloat16 and torch.equal(cx, ref.bfloat16())
    # the dispatched weights come back as the original ones (0 for -1 slots)
    assert cw.dtype == torch.float32 and torch.equal(cw, torch.where(topk_idx >= 0, topk_weights, 0.0))
    # DeepEP test_intranode's combine check: combined / (ranks a token went to) == x
    cx1, none_w, _ = buffer.combine(x=recv_x, handle=handle)
    assert none_w is None
    n = in_rank.sum(1, keepdim=True)
    ref1 = (x.double() * n).bfloat16()
    assert torch.equal(cx1, ref1)
    # Megatron's dispatch backward: combine(grad, handle, topk_weights=grad_probs) with arbitrary values,
    # async, inside `with event:`
    gp = torch.Generator().manual_seed(100 + rank)
    gw = torch.randn(R, TOP_K, generator=gp)
    _, cgw, ev = buffer.combine(recv_x, handle, topk_weights=gw, previous_event=buffer.capture(),
                                async_finish=True, allocate_on_comm_stream=True)
    with ev:
        pass
    # independent: every rank's gw is rebuilt and summed per (source token) in rank order
    ref_w = torch.zeros(T, TOP_K)
    for r in range(world):
        rows_r = _expected(r, world)[5]  # source tokens of rank r's rows; pick those from this rank
        starts = torch.tensor([0] + _expected(r, world)[6][:, r].tolist()).cumsum(0)
        gw_r = torch.randn(rows_r.shape[0], TOP_K, generator=torch.Generator().manual_seed(100 + r))
        mine = gw_r[starts[rank]:starts[rank + 1]]
        ref_w.index_add_(0, rows_r[starts[rank]:starts[rank + 1]].long(), mine)
    assert torch.equal(cgw, ref_w)
    # FP8 dispatch combines bf16 rows
    cx8, _, _ = buffer.combine(y, h8)
    assert torch.equal(cx8, ref.bfloat16())
    cxt, cwt, _ = buffer.combine(y, th, topk_weights=tw)
    assert torch.equal(cxt, ref.bfloat16()) and torch.equal(cwt, cw)

    # a handle stays valid on another Buffer of the group (Megatron rebuilds its buffer when it must grow)
    bigger = deep_ep.Buffer(group, int(2e9), 0, low_latency_mode=False, num_qps_per_rank=20, allow_mnnvl=True)
    assert torch.equal(bigger.combine(y, handle, topk_weights=recv_w)[0], ref.bfloat16())
    assert torch.equal(bigger.dispatch(x2, handle=handle)[0], ex2[0])

    # --- num_worst_tokens (Megatron): padded outputs, -1 ids past the received rows, empty count list
    NW = sum(TOKENS[world])
    (pq, ps), pi, pw, pl, ph, _ = buffer.dispatch((q, sc), num_tokens_per_rank=ntpr, is_token_in_rank=in_rank,
                                                  num_tokens_per_expert=ntpe, topk_idx=topk_idx,
                                                  topk_weights=topk_weights, num_worst_tokens=NW)
    assert pl == [] and pq.shape == (NW, H) and ps.shape == (NW, H // 128) and pi.shape == (NW, TOP_K)
    assert torch.equal(pq[:R].view(torch.uint8), ex_q) and torch.equal(ps[:R], ex_s)
    assert torch.equal(pi[:R], ex_idx) and (pi[R:] == -1).all() and torch.equal(pw[:R], ex_w) and (pw[R:] == 0).all()
    assert ph[3].shape == (NW,) and torch.equal(ph[3][:R], ex_src) and (ph[3][R:] == -1).all()
    yp = torch.cat([y, torch.full((NW - R, H), float("nan"), dtype=torch.bfloat16)])  # padding rows are ignored
    cxp, cwp, _ = buffer.combine(yp, ph, topk_weights=pw)
    assert torch.equal(cxp, ref.bfloat16()) and torch.equal(cwp, cw)
    (cq2, _), *_ = buffer.dispatch((q2, s2), handle=ph)  # cached: the handle's padded size
    assert cq2.shape == (NW, H) and torch.equal(cq2[:R].view(torch.uint8), ex2[1])
    # too small for some rank: ValueError there (after the collectives, so no rank hangs)
    small = max(1, min(int(M[:, d].sum()) for d in range(world)))
    try:
        buffer.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=in_rank, num_tokens_per_expert=ntpe,
                        topk_idx=topk_idx, topk_weights=topk_weights, num_worst_tokens=small)
        assert R <= small
    except ValueError as e:
        assert R > small and "num_worst_tokens" in str(e)

    # --- an autograd wrapper as Megatron's fused all-to-all builds one: dispatch forward / combine (with the
    # top-k weights' gradients) backward, combine forward / cached dispatch backward, the handle kept in ctx.
    # Experts scale a row by sum_j w_j * (global expert id + 1), so out[t] = x[t] * a[t] with
    # a[t] = sum_{j: id >= 0} w[t, j] * (id + 1); gradients are checked against that formula in float64.
    for use_async in (False, True):
        xg = x.float().requires_grad_()
        pg = topk_weights.clone().requires_grad_()
        rx, ri, rp, cnt, hd = _MegatronDispatch.apply(xg, topk_idx, pg, E, buffer, use_async)
        assert isinstance(hd, tuple) and len(hd) == 6 and cnt.tolist() == mine_expert
        gid = torch.where(ri >= 0, ri + rank * L + 1, 0).float()
        out, none = _MegatronCombine.apply(rx * (rp * gid).sum(1, keepdim=True), buffer, hd, use_async)
        assert none is None
        G = torch.randn(T, H, generator=torch.Generator().manual_seed(300 + rank))
        (out * G).sum().backward()
        xd = x.double().requires_grad_()
        pd = topk_weights.double().requires_grad_()
        ref_out = xd * (pd * torch.where(topk_idx >= 0, topk_idx + 1, 0).double()).sum(1, keepdim=True)
        (ref_out * G.double()).sum().backward()
        assert torch.allclose(out.double(), ref_out.detach(), rtol=1e-5, atol=1e-4)
        assert torch.allclose(xg.grad.double(), xd.grad, rtol=1e-5, atol=1e-4)
        assert torch.allclose(pg.grad.double(), pd.grad, rtol=1e-4, atol=1e-2)  # fp32 dot products over H
        assert (pg.grad[topk_idx < 0] == 0).all()

    # --- no tokens anywhere: empty outputs of the right shapes, counts all 0, combine of nothing
    z = buffer.get_dispatch_layout(topk_idx[:0], E)
    assert z[3].shape == (0, world) and z[0].tolist() == [0] * world and z[2].tolist() == [0] * E
    zx, zi, zw, zl, zh, _ = buffer.dispatch(x[:0], num_tokens_per_rank=z[0], is_token_in_rank=z[3],
                                            num_tokens_per_expert=z[2], topk_idx=topk_idx[:0],
                                            topk_weights=topk_weights[:0])
    assert zx.shape == (0, H) and zi.shape == (0, TOP_K) and zw.shape == (0, TOP_K) and zl == [0] * L
    zc, zcw, _ = buffer.combine(zx, zh, topk_weights=zw)
    assert zc.shape == (0, H) and zc.dtype == torch.bfloat16 and zcw.shape == (0, TOP_K)

    # --- errors on every rank, before any collective (so nobody waits)
    def raises(exc, words, fn):
        with pytest.raises(exc) as ei:
            fn()
        assert all(w_ in str(ei.value) for w_ in words), str(ei.value)

    lay = dict(num_tokens_per_rank=ntpr, is_token_in_rank=in_rank, num_tokens_per_expert=ntpe)
    raises(ValueError, ["topk_idx"], lambda: buffer.dispatch(x, handle=handle, topk_idx=topk_idx))
    raises(ValueError, ["num_tokens_per_rank"], lambda: buffer.dispatch(x, is_token_in_rank=in_rank,
                                                                        num_tokens_per_expert=ntpe))
    raises(TypeError, ["topk_weights", "float32"],
           lambda: buffer.dispatch(x, **lay, topk_idx=topk_idx, topk_weights=topk_weights.double()))
    raises(ValueError, ["num_tokens_per_expert"],
           lambda: buffer.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=in_rank,
                                   num_tokens_per_expert=ntpe + 1, topk_idx=topk_idx, topk_weights=topk_weights))
    raises(ValueError, ["num_worst_tokens", "topk_idx"], lambda: buffer.dispatch(x, **lay, num_worst_tokens=4))
    raises(ValueError, ["expert_alignment"], lambda: buffer.dispatch(x, **lay, expert_alignment=0))
    raises(NotImplementedError, ["UE8M0"], lambda: buffer.dispatch((q, sc.int()), **lay))
    raises(ValueError, ["scales"], lambda: buffer.dispatch((q, sc.flatten()), **lay))
    raises(NotImplementedError, ["nvlink", "collective"],
           lambda: deep_ep.Buffer(group, backend="nvlink").dispatch((q, sc[:, :1]), **lay))
    raises(TypeError, ["x"], lambda: buffer.dispatch(x.int(), **lay))
    raises(NotImplementedError, ["bias"], lambda: buffer.combine(recv_x, handle, bias=recv_x))
    raises(ValueError, ["'x'", str(R)], lambda: buffer.combine(torch.zeros(R + 1, H, dtype=torch.bfloat16), handle))
    raises(TypeError, ["dtype"], lambda: buffer.combine(recv_x.float(), handle))
    raises(TypeError, ["handle"], lambda: buffer.combine(recv_x, tuple(handle)))
    if group is not dist.group.WORLD:
        raises(ValueError, ["another process group"], lambda: deep_ep.Buffer(dist.group.WORLD).combine(recv_x, handle))
    raises(ValueError, ["allocate_on_comm_stream"],
           lambda: buffer.get_dispatch_layout(topk_idx, E, allocate_on_comm_stream=True))
    bad = topk_idx.clone() if T else torch.zeros(1, TOP_K, dtype=torch.long)
    bad[0, 0] = E
    raises(ValueError, ["topk_idx"], lambda: buffer.get_dispatch_layout(bad, E))
    raises(NotImplementedError, ["low-latency"], lambda: buffer.low_latency_dispatch(x, topk_idx, 128, E))
    raises(NotImplementedError, ["low-latency"], lambda: buffer.low_latency_combine(x, topk_idx, topk_weights, None))
    raises(NotImplementedError, ["low_latency_mode"],
           lambda: deep_ep.Buffer(group, 0, 1 << 20, low_latency_mode=True))
    raises(RuntimeError, ["async_finish"], lambda: deep_ep.EventOverlap().current_stream_wait())
    raises(RuntimeError, ["explicitly_destroy"], buffer.destroy)

    # --- ranks that disagree (hidden size): ValueError on every rank naming it; the buffer stays usable
    Hb = H if rank == 0 else 2 * H
    with pytest.raises(ValueError, match="hidden: rank 0 = 256"):
        buffer.dispatch(torch.zeros(T, Hb, dtype=torch.bfloat16), **lay)
    again = buffer.dispatch(x, **lay, topk_idx=topk_idx, topk_weights=topk_weights)
    assert torch.equal(again[0], ex_x) and torch.equal(again[1], ex_idx)
    # ... and on whether combine carries top-k weights
    with pytest.raises(ValueError, match="topk_weights columns: rank 0 = 3, rank 1 = -1"):
        buffer.combine(again[0], again[4], topk_weights=again[2] if rank == 0 else None)
    # ... and on which call they make (dispatch here, combine there)
    with pytest.raises(ValueError, match="call: rank 0 = "):
        if rank == 0:
            buffer.dispatch(x, **lay)
        else:
            buffer.combine(again[0], again[4])
    cx2, cw2, _ = buffer.combine(y, again[4], topk_weights=again[2])
    assert torch.equal(cx2, ref.bfloat16()) and torch.equal(cw2, cw)

    # --- destroy (explicitly_destroy=True, as DeepEP requires), then calls refuse
    b2 = deep_ep.Buffer(group, explicitly_destroy=True)
    hb2 = b2.dispatch(x, **lay)[4]
    b2.destroy()
    raises(RuntimeError, ["destroyed"], lambda: b2.dispatch(x, **lay))
    raises(RuntimeError, ["destroyed"], lambda: buffer.combine(recv_x, hb2))


class _MegatronDispatch(torch.autograd.Function):
    """Megatron-style: layout + dispatch forward; backward combines the row gradients and the top-k weight
    gradients through the saved handle."""

    @staticmethod
    def forward(ctx, x, idx, probs, num_experts, buffer, use_async):
        prev = deep_ep.EventOverlap(deep_ep.EventHandle()) if use_async else None
        ntpr, ntprdma, ntpe, in_rank, ev = buffer.get_dispatch_layout(
            idx, num_experts, previous_event=prev, async_finish=use_async, allocate_on_comm_stream=use_async)
        rx, ri, rp, counts, handle, ev = buffer.dispatch(
            x, topk_idx=idx, topk_weights=probs, num_tokens_per_rank=ntpr, num_tokens_per_rdma_rank=ntprdma,
            is_token_in_rank=in_rank, num_tokens_per_expert=ntpe, previous_event=ev, async_finish=use_async,
            allocate_on_comm_stream=use_async)
        if use_async:
            ev.current_stream_wait()
        ctx.buffer, ctx.handle, ctx.use_async = buffer, handle, use_async
        return rx, ri, rp, torch.tensor(counts), handle

    @staticmethod
    def backward(ctx, g_x, g_idx, g_probs, g_counts, g_handle):
        prev = deep_ep.EventOverlap(deep_ep.EventHandle()) if ctx.use_async else None
        gx, gp, ev = ctx.buffer.combine(g_x.contiguous(), ctx.handle, topk_weights=g_probs.float(),
                                        previous_event=prev, async_finish=ctx.use_async,
                                        allocate_on_comm_stream=ctx.use_async)
        if ctx.use_async:
            ev.current_stream_wait()
        return gx, None, gp, None, None, None


class _MegatronCombine(torch.autograd.Function):
    """Megatron-style: combine forward, cached dispatch of the gradient backward."""

    @staticmethod
    def forward(ctx, y, buffer, handle, use_async):
        out, _, ev = buffer.combine(y, handle=handle, async_finish=use_async,
                                    previous_event=deep_ep.Buffer.capture() if use_async else None)
        if use_async:
            ev.current_stream_wait()
        ctx.buffer, ctx.handle, ctx.use_async = buffer, handle, use_async
        return out, None

    @staticmethod
    def backward(ctx, g, _):
        gy, *_, ev = ctx.buffer.dispatch(g.contiguous(), handle=ctx.handle, async_finish=ctx.use_async)
        if ctx.use_async:
            ev.current_stream_wait()
        return gy, None, None, None


def _worker(rank, world, port):
    """3 processes: every check on the world group, then on the group of global ranks {0, 2} (global rank 2 is
    group rank 1), while global rank 1 waits. One spawn for both sizes: process start-up dominates."""
    _init(rank, world, port)
    try:
        _check(dist.group.WORLD, 3)
        pair = dist.new_group([2, 0])
        if rank != 1:
            _check(pair, 2)
        # a dispatch whose peers never call: EPTimeoutError within the buffer's timeout, then the buffer refuses
        # NOTE: the group keeps a long timeout: its creation waits for the ranks still running the pair checks
        lonely = dist.new_group(list(range(world)))
        if rank == 0:
            assert deep_ep.Buffer(dist.group.WORLD).timeout == datetime.timedelta(seconds=60)  # the group's
            b = deep_ep.Buffer(lonely, timeout=3)
            x, idx, w, *_ = _inputs(0, world)
            lay = b.get_dispatch_layout(idx, EXPERTS[world])
            args = dict(num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2])
            t0 = time.monotonic()
            with pytest.raises(deep_ep.EPTimeoutError, match="dispatch"):
                b.dispatch(x, **args)
            assert time.monotonic() - t0 < 30
            with pytest.raises(deep_ep.EPTimeoutError, match="earlier collective"):
                b.dispatch(x, **args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_deep_ep_buffer_on_gloo_3_and_2_ranks():
    mp.spawn(_worker, args=(3, _free_port()), nprocs=3, join=True)


def test_config_and_static_api():
    c = deep_ep.Config(24, 8, 256)  # test_intranode's positional form
    assert (c.num_sms, c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens) == (24, 8, 256)
    d = deep_ep.Config(**{"num_sms": 24, "num_max_nvl_chunked_send_tokens": 6, "num_max_nvl_chunked_recv_tokens": 128,
                          "num_max_rdma_chunked_send_tokens": 8, "num_max_rdma_chunked_recv_tokens": 64})  # SGLang's JSON
    assert d.num_max_rdma_chunked_recv_tokens == 64
    hint = d.get_nvl_buffer_size_hint(7168 * 2, 8)
    assert isinstance(hint, int) and hint > 0 and d.get_rdma_buffer_size_hint(7168 * 2, 8) == 0
    # the nvlink token bound a Buffer derives from that many bytes is the hint's token count
    from dsmoe.compat.deep_ep import _nvlink_capacity
    assert _nvlink_capacity(8, 8, 7168, hint) == 128 * 12
    assert _nvlink_capacity(8, 8, 7168, hint - 1) == 128 * 12 - 1
    with pytest.raises(ValueError, match="send"):
        deep_ep.Config(20, 256, 256)
    assert deep_ep.Config(20, 6, 256, 8, 12).num_max_rdma_chunked_recv_tokens == 16  # whole send chunks
    old = deep_ep.Buffer.num_sms
    try:
        deep_ep.Buffer.set_num_sms(24)
        assert deep_ep.Buffer.get_dispatch_config(8).num_sms == 24 and deep_ep.Buffer.get_combine_config(3).num_sms == 24
        with pytest.raises(ValueError, match="even"):
            deep_ep.Buffer.set_num_sms(23)
    finally:
        deep_ep.Buffer.num_sms = old
    # the buffer sizing frameworks run at setup (Megatron's get_buffer, SGLang's DeepEPBuffer) at EP sizes
    # beyond one node and with FP8 (1-byte) hidden sizes
    for n in (1, 2, 3, 4, 8, 16, 64, 160):
        for hb in (7168 * 2, 7168, 2050):
            for cfg in (deep_ep.Buffer.get_dispatch_config(n), deep_ep.Buffer.get_combine_config(n)):
                assert cfg.get_nvl_buffer_size_hint(hb, n) > 0 and cfg.get_rdma_buffer_size_hint(hb, n) == 0
    # EventOverlap's hook, release and `with event(release_handle=True):` forms
    ev, calls = deep_ep.Buffer.capture(), []
    ev.register_hook_after_wait(lambda: calls.append(1))
    with pytest.raises(RuntimeError, match="already"):
        ev.register_hook_after_wait(lambda: None)
    ev.current_stream_wait()
    ev.current_stream_wait()
    assert calls == [1] and ev.event is not None
    with ev(release_handle=True):
        pass
    assert ev.event is None
    with ev:  # nothing left to wait on: a no-op, as in DeepEP
        pass
    ev2 = deep_ep.EventOverlap(deep_ep.EventHandle())
    ev2.current_stream_wait(release_handle=True)
    assert ev2.event is None
    assert isinstance(deep_ep.Buffer.capture(), deep_ep.EventOverlap)
    deep_ep.Buffer.capture().current_stream_wait()  # an event on the current stream (nothing pending on CPU)
    with pytest.raises(NotImplementedError):
        deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256)
    with pytest.raises(ValueError, match="group"):
        deep_ep.Buffer(None)
    assert deep_ep.topk_idx_t is torch.int64


# ----------------------------------------------------------------------------- GPU: nvlink vs collective
def _gpu_worker(rank, world, port):
    torch.cuda.set_device(0)  # every process on one GPU: CUDA IPC works within a device
    _init(rank, world, port)
    try:
        E = EXPERTS[world]
        nv = deep_ep.Buffer(dist.group.WORLD, backend="nvlink", max_tokens_per_rank=64, timeout=30)
        co = deep_ep.Buffer(dist.group.WORLD, backend="collective")
        x, idx, w, q, sc = _inputs(rank, world)
        ex_x, ex_q, ex_s, ex_idx, ex_w, ex_src, M = _expected(rank, world)
        lay = nv.get_dispatch_layout(idx.cuda(), E)
        args = dict(num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
                    topk_idx=idx.cuda(), topk_weights=w.cuda())
        rx, ri, rw, per, h, _ = nv.dispatch(x.cuda(), **args)
        assert torch.equal(rx.cpu(), ex_x) and torch.equal(ri.cpu(), ex_idx) and torch.equal(rw.cpu(), ex_w)
        assert torch.equal(h[3].cpu(), ex_src)
        (fq, fs), *_ = nv.dispatch((q.cuda(), sc.cuda()), **args)
        assert torch.equal(fq.cpu().view(torch.uint8), ex_q) and torch.equal(fs.cpu(), ex_s)
        clay = co.get_dispatch_layout(idx, E)
        crx, _, crw, cper, ch, _ = co.dispatch(x, num_tokens_per_rank=clay[0], is_token_in_rank=clay[3],
                                               num_tokens_per_expert=clay[2], topk_idx=idx, topk_weights=w)
        assert per == cper
        y = (rx.float() * (rank + 1)).bfloat16()
        out, ow, ev = nv.combine(y, h, topk_weights=rw, async_finish=True, previous_event=nv.capture(),
                                 allocate_on_comm_stream=True)
        ev.current_stream_wait()
        cout, cow, _ = co.combine(y.cpu(), ch, topk_weights=crw)
        assert torch.equal(out.cpu(), cout) and torch.equal(ow.cpu(), cow)
        x2 = _inputs(rank, world, salt=1)[0]
        r2, *_ = nv.dispatch(x2.cuda(), handle=h)
        assert torch.equal(r2.cpu(), _expected(rank, world, salt=1)[0])
        nw = sum(TOKENS[world])
        pr, pi, *_ , ph, _ = nv.dispatch(x.cuda(), **args, num_worst_tokens=nw)
        R = ex_x.shape[0]
        assert pr.shape == (nw, H) and (pi[R:] == -1).all() and torch.equal(pr[:R].cpu(), ex_x)
        # a batch above the token bound: ValueError on every rank (also the one without tokens), no hang
        small = deep_ep.Buffer(dist.group.WORLD, backend="nvlink", max_tokens_per_rank=4, timeout=30)
        with pytest.raises(ValueError, match="max_tokens_per_rank=4"):
            small.dispatch(x.cuda(), **args)
        torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.cuda_only
@pytest.mark.dist
@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 3])
def test_deep_ep_nvlink_matches_collective_gpu(world):
    from dsmoe import _native
    if not _native.has_kernel("ep_copy_rows"):
        pytest.skip("dsmoe was built without the ep kernels")
    mp.spawn(_gpu_worker, args=(world, _free_port()), nprocs=world, join=True)
