"""Internode expert parallelism: node-limited routing (ops.moe_route ``max_nodes``) against an independent
per-token implementation of the V3 rule, and the hierarchical EPBuffer backend (two hops: rail, then node) on
gloo with simulated nodes, 2 nodes x 2 ranks and 3 nodes x 2 ranks: dispatch outputs identical to the flat
collective backend's (origin-encoded rows, -1 entries, starved ranks, a node that receives nothing,
node-limited routing), combine and gradients equal (exactly when the sums are exact), FP8 rows, bf16 rows,
``stats()`` against an independent count of (token, remote node) pairs, disagreeing ranks, a peer that never
calls; the traffic tool (tools/internode_traffic.py) on a small layout."""
import datetime
import importlib.util
import math
import os
import socket
import time
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsmoe import ops
from dsmoe.parallel import EPBuffer, EPConfig, EPTimeoutError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- routing
def _route_loop(logits, bias, top_k, n_group, topk_group, num_nodes, max_nodes):
    """The V3 rule token by token in plain Python (fp32 sums through 0-d tensors, ties by (-score, index))."""
    T, E = logits.shape
    s = logits.float().sigmoid()
    out = []
    ninf = float("-inf")
    for t in range(T):
        c = [float(v) for v in (s[t] + bias.float() if bias is not None else s[t])]
        c = [ninf if math.isnan(v) else v for v in c]
        G = E // n_group
        if topk_group < n_group:
            gs = []
            for gi in range(n_group):
                vals = sorted(c[gi * G:(gi + 1) * G], reverse=True)
                v = (torch.tensor(vals[0]) + torch.tensor(vals[1])).item() if bias is not None and G > 1 else vals[0]
                gs.append(ninf if math.isnan(v) else v)
            keep = sorted(range(n_group), key=lambda gi: (-gs[gi], gi))[:topk_group]
            c = [v if e // G in keep else ninf for e, v in enumerate(c)]
        if max_nodes < num_nodes:
            P = E // num_nodes
            p = -(-top_k // max_nodes)
            ns = []
            for n in range(num_nodes):
                vals = sorted(c[n * P:(n + 1) * P], reverse=True)[:p]
                acc = torch.tensor(vals[0], dtype=torch.float32)
                for v in vals[1:]:
                    acc = acc + torch.tensor(v, dtype=torch.float32)
                ns.append(ninf if math.isnan(acc.item()) else acc.item())
            keep = sorted(range(num_nodes), key=lambda n: (-ns[n], n))[:max_nodes]
            c = [v if e // P in keep else ninf for e, v in enumerate(c)]
        out.append(sorted(range(E), key=lambda e: (-c[e], e))[:top_k])
    return torch.tensor(out, dtype=torch.int32).view(T, top_k)


# (E, top_k, n_group, topk_group, num_nodes, max_nodes): no group limit; groups = nodes (V3); groups finer
# than nodes; groups coarser than nodes; one node kept; max_nodes not dividing top_k (node score over the
# top ceil(k / M): 2 of 6 / 4, 3 of 5 / 2, the last with groups finer than nodes); top_k < max_nodes
ROUTE_CASES = [(16, 4, 1, 1, 4, 2), (64, 8, 8, 4, 8, 4), (32, 4, 8, 4, 4, 2), (24, 3, 2, 1, 4, 1), (12, 3, 1, 1, 3, 1),
               (32, 6, 1, 1, 8, 4), (24, 5, 1, 1, 4, 2), (32, 5, 8, 4, 4, 2), (24, 2, 1, 1, 6, 4)]


@pytest.mark.parametrize("case", ROUTE_CASES)
def test_node_limited_routing_matches_independent_rule(case):
    E, k, ng, tg, N, M = case
    T = 37
    logits = torch.randn(T, E)
    logits[3] = torch.randint(-2, 3, (E,)).float()  # ties (exact sums): lowest index wins
    logits[5] = float("nan")                        # NaN row: ranks as -inf, defined result
    bias = torch.randn(E) * 0.1
    bias[::5] = 0.0
    for b in (bias, None):
        idx, w = ops.moe_route(logits, b, top_k=k, n_group=ng, topk_group=tg, routed_scaling_factor=2.5,
                               num_nodes=N, max_nodes=M)
        assert torch.equal(idx, _route_loop(logits, b, k, ng, tg, N, M)), (case, b is None)
        P = E // N
        spans = [len(set((r // P).tolist())) for r in idx.long()]
        assert max(spans) <= M
        # weights: the unbiased scores of the chosen experts, normalized, scaled
        s = logits.sigmoid().gather(1, idx.long())
        ref_w = s / (s.sum(1, keepdim=True) + 1e-20) * 2.5
        good = ~torch.isnan(logits).any(1)
        torch.testing.assert_close(w[good], ref_w[good], rtol=1e-6, atol=1e-6)


def test_node_limit_equals_group_rule_when_groups_are_nodes():
    """V3 (scaled down): 8 groups = 8 nodes, 4 kept, top-2 group score = sum of the top 8/4 = 2 per node."""
    T, E = 200, 64
    logits, bias = torch.randn(T, E), torch.randn(E) * 0.05
    kw = dict(top_k=8, routed_scaling_factor=2.5)
    ref = ops.moe_route(logits, bias, n_group=8, topk_group=4, **kw)
    for ng, tg in ((8, 4), (1, 1)):  # composed with the group rule, or alone
        got = ops.moe_route(logits, bias, n_group=ng, topk_group=tg, num_nodes=8, max_nodes=4, **kw)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    # no limit: max_nodes = num_nodes (or None) is the plain rule
    assert torch.equal(ops.moe_route(logits, bias, n_group=8, topk_group=4, num_nodes=8, max_nodes=8, **kw)[0], ref[0])
    # more nodes than groups allow changes the result but keeps every token within M nodes
    got = ops.moe_route(logits, bias, n_group=1, topk_group=1, num_nodes=16, max_nodes=2, **kw)[0]
    assert max(len(set((r // 4).tolist())) for r in got.long()) <= 2
    assert not torch.equal(got, ref[0])
    empty = ops.moe_route(logits[:0], bias, n_group=8, topk_group=4, num_nodes=8, max_nodes=4, **kw)
    assert empty[0].shape == (0, 8) and empty[1].shape == (0, 8)


def test_node_limited_routing_compiles_and_validates():
    logits = torch.randn(9, 16)
    kw = dict(top_k=4, n_group=4, topk_group=2, routed_scaling_factor=1.0, num_nodes=4, max_nodes=2)
    torch.library.opcheck(torch.ops.dsmoe.moe_route.default, (logits, torch.randn(16), 4, 4, 2, 2.5, True, "sigmoid", 4, 2))
    f = torch.compile(lambda lg: ops.moe_route(lg, None, **kw), backend="aot_eager", fullgraph=True)
    assert torch.equal(f(logits)[0], ops.moe_route(logits, None, **kw)[0])
    bad = [(dict(num_nodes=3), "num_nodes.*multiple"), (dict(max_nodes=5), "max_nodes' must be <= num_nodes=4"),
           (dict(max_nodes=0), "max_nodes"), (dict(num_nodes=8, max_nodes=2, n_group=2, topk_group=1), None),
           (dict(top_k=9, topk_group=4), "top_k'=9 exceeds what max_nodes=2"), (dict(num_nodes=16, max_nodes=4), None)]
    for over, msg in bad:
        args = {**kw, **over}
        if msg is None:  # nested layouts are fine
            idx = ops.moe_route(torch.randn(9, 16), None, **args)[0]
            assert max(len(set((r // (16 // args["num_nodes"])).tolist())) for r in idx.long()) <= args["max_nodes"]
            continue
        with pytest.raises(ValueError, match=msg):
            ops.moe_route(logits, None, **args)
    with pytest.raises(ValueError, match="groups and nodes must nest"):
        ops.moe_route(torch.randn(2, 24), None, top_k=2, n_group=3, topk_group=2, routed_scaling_factor=1.0,
                      num_nodes=4, max_nodes=2)


# ----------------------------------------------------------------------------- hierarchical EP
H = 128  # FP8 rows need a multiple of 128
K = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SITUATIONS = ("random", "starved", "one_node", "all_minus_one", "node_limited")


def _inputs(name, rank, world, R, E, base):
    """Inputs of ``rank`` in a situation; any rank can rebuild any other's (seeded by both). Integer payloads
    and dyadic weights: every sum below is exact, so the flat and two-hop combines must agree bit for bit."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{rank}/{world}/{base}".encode()))
    T = {"random": 3 + 2 * rank, "starved": 0 if rank % 3 == 1 else 4 + rank, "one_node": 5,
         "all_minus_one": 0 if rank == 0 else 3, "node_limited": 6 + rank}[name]
    x = torch.randint(-8, 9, (T, H), generator=g).double()
    x[:, 0] = rank  # the payload names its origin: rank and token
    x[:, 1] = torch.arange(T, dtype=torch.float64)
    w = torch.randint(1, 8, (T, K), generator=g).double() / 8
    N, P = world // R, E // (world // R)
    if name == "all_minus_one":
        idx = torch.full((T, K), -1, dtype=torch.int32)
    elif name == "one_node":  # every token to node 0's experts: the other nodes receive nothing
        idx = torch.stack([torch.randperm(P, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    elif name == "node_limited":
        logits = torch.randn(T, E, generator=g)
        idx = ops.moe_route(logits, None, top_k=K, n_group=1, topk_group=1, routed_scaling_factor=1.0,
                            num_nodes=N, max_nodes=1 if N == 2 else 2)[0]
    else:
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32) if T else \
            torch.empty(0, K, dtype=torch.int32)
        if T:
            idx[torch.rand(T, K, generator=g) < 0.2] = -1
    return x, idx, w


def _expected_rows(name, rank, world, R, E, base):
    """(source rank, token) of every row this rank must receive, in the flat order, from every rank's inputs."""
    L = E // world
    rows = []
    for s in range(world):
        _, idx, _ = _inputs(name, s, world, R, E, base)
        for t in range(idx.shape[0]):
            if ((idx[t] >= 0) & (idx[t].long() // L == rank)).any():
                rows.append((s, t))
    return rows


def _run_both(bufs, x, idx, w, seed):
    """dispatch -> experts (tanh-free: exact) -> combine -> backward on each buffer; what each produced."""
    res = []
    for b in bufs:
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        rx, ri, rw, cnt, h = b.dispatch(xr, idx, wr)
        st_d = b.stats()
        # NOTE: other ranks' slots (ri = -1, rw = 0) get a nonzero coefficient: the forward is unchanged, but
        # their weight gradients are nonzero here and must not reach the source's dw (masking checked)
        coef = torch.where(ri >= 0, (ri.double() + 1) / 4, torch.full((), 0.5, dtype=torch.float64))
        y = rx * (rw.double() * coef).sum(1, keepdim=True) + rx
        out = b.combine(y, h)
        st_c = b.stats()
        g = torch.randint(-4, 5, out.shape, generator=torch.Generator().manual_seed(seed)).double()
        (out * g).sum().backward()
        res.append(dict(rx=rx.detach(), ri=ri, rw=rw.detach(), cnt=cnt, out=out.detach(), dx=xr.grad, dw=wr.grad,
                        recv_counts=h.recv_counts, send_counts=h.send_counts, num_tokens=h.num_tokens,
                        st_d=st_d, st_c=st_c, st_b=b.stats()))
    return res


def _worker(rank, world, R, port, base, q):
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=30))
        N = world // R
        E = 4 * world
        L, node = E // world, rank // R
        flat = EPBuffer(None, E, H, ranks_per_node=R)
        hier = EPBuffer(None, E, H, backend="hierarchical", ranks_per_node=R)
        assert hier.num_nodes == N and hier.ranks_per_node == R
        # NOTE: 6 processes on a small CI machine are slow: one situation (random ids, -1 entries, two starved
        # ranks) covers the third node; the 4-process run covers the others
        situations = SITUATIONS if world == 4 else ("starved",)
        for name in situations:
            x, idx, w = _inputs(name, rank, world, R, E, base)
            T = x.shape[0]
            fr, hr = _run_both((flat, hier), x, idx, w, base + rank)
            # dispatch: byte-identical outputs, same order; the rows are the ones the senders meant
            for key in ("rx", "ri", "rw", "cnt"):
                assert torch.equal(fr[key], hr[key]), (name, key)
            for key in ("recv_counts", "send_counts", "num_tokens"):
                assert fr[key] == hr[key], (name, key)
            exp = _expected_rows(name, rank, world, R, E, base)
            assert [(int(a), int(b)) for a, b in hr["rx"][:, :2].tolist()] == exp, name
            if name in ("all_minus_one",) or (name == "one_node" and node):
                assert hr["rx"].shape[0] == 0
            # combine and both gradients: exact sums -> equal bit for bit
            for key in ("out", "dx", "dw"):
                assert torch.equal(fr[key], hr[key]), (name, key, (fr[key] - hr[key]).abs().max())
            # independent reference of the combine: sum over slots of (1 + w * c[e]) per distinct rank ... as the
            # experts above compute it (exact)
            ref = torch.zeros(T, H, dtype=torch.float64)
            for t in range(T):
                ranks = sorted({int(e) // L for e in idx[t] if e >= 0})
                for r in ranks:
                    loc = [(j, int(e)) for j, e in enumerate(idx[t]) if e >= 0 and int(e) // L == r]
                    ref[t] += x[t] * (1 + sum(float(w[t, j]) * ((e - r * L) + 1) / 4 for j, e in loc))
            assert torch.equal(hr["out"], ref), name
            # traffic: an independent count of (token, remote node) pairs and (row, other local rank) pairs
            nodes_of = [sorted({int(e) // (L * R) for e in idx[t] if e >= 0}) for t in range(T)]
            inter_pairs = sum(sum(1 for n in ns if n != node) for ns in nodes_of)
            row = H * 8 + K * 8
            sd = hr["st_d"]
            assert sd["call"] == "dispatch" and sd["inter_node_rows"] == inter_pairs, (name, sd, inter_pairs)
            assert sd["inter_node_bytes"] == inter_pairs * row
            fd = fr["st_d"]
            flat_inter = sum(sum(1 for r in {int(e) // L for e in idx[t] if e >= 0} if r // R != node)
                             for t in range(T))
            assert fd["inter_node_rows"] == flat_inter and fd["inter_node_bytes"] == flat_inter * row
            assert sd["inter_node_rows"] <= fd["inter_node_rows"]
            if name == "node_limited":
                M = 1 if N == 2 else 2
                assert max((len(ns) for ns in nodes_of), default=0) <= M
                assert sd["inter_node_rows"] <= M * T
            assert hr["st_c"]["call"] == "combine" and hr["st_b"]["call"] == "dispatch backward"
        st = hier.stats()
        assert st["total"]["inter_node_rows"] >= st["inter_node_rows"]
        _disagreement(hier, rank, world, E)
        # a different node layout on one rank: every rank raises at construction, before building groups
        with pytest.raises(ValueError, match=r"ranks_per_node: rank 0 = %d.*rank %d = %d" % (R, world - 1, world)):
            EPBuffer(None, E, H, backend="hierarchical", ranks_per_node=world if rank == world - 1 else R)
        if world == 4:
            _fp8_and_bf16(flat, hier, rank, world, R, E, base)
            _never_calls(rank, world, R, E)  # last: leaves the group in an unknown state
        q.put((rank, "ok"))
    except BaseException:  # noqa: BLE001
        import traceback
        q.put((rank, traceback.format_exc()))
    finally:
        q.close()
        q.join_thread()
        os._exit(0)  # no destroy_process_group after a timed-out collective


def _fp8_and_bf16(flat, hier, rank, world, R, E, base):
    g = torch.Generator().manual_seed(base + 17 * rank)
    T = 4 + rank
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    w = torch.rand(T, K, generator=g)
    q8 = (torch.randn(T, H, generator=g) * 40).to(torch.float8_e4m3fn)
    sc = torch.rand(T, H // 128, generator=g)
    outs = [b.dispatch((q8, sc), idx, w) for b in (flat, hier)]
    (fq, fs), fi, fw, fc, fh = outs[0]
    (hq, hs), hi, hw, hc, hh = outs[1]
    assert torch.equal(fq.view(torch.uint8), hq.view(torch.uint8)) and torch.equal(fs, hs)
    assert torch.equal(fi, hi) and torch.equal(fw, hw) and hh.dtype == torch.bfloat16
    assert hier.stats()["inter_node_bytes"] == hier.stats()["inter_node_rows"] * (H + 4 * (H // 128) + 8 * K)
    y = torch.randn(fq.shape[0], H, generator=g).bfloat16()
    a, b = flat.combine(y, fh), hier.combine(y, hh)
    # bf16 rows, fp32 partials: the two sums differ by association only (then one bf16 rounding each)
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)
    rows_back = hier.stats()["inter_node_rows"]
    # fp32 node partials, except a partial of one row (one rank of this node had the token): that row, in bf16.
    # Independent count from every rank's ids: the rows this rank forwarded (same local index, other node) and
    # how many ranks of this node each one reached
    every = [None] * world
    dist.all_gather_object(every, idx)
    L, node, loc = E // world, rank // R, rank % R
    one = summed = 0
    for s in range(world):
        if s // R == node or s % R != loc:
            continue
        for t in range(every[s].shape[0]):
            n_here = len({int(e) // L for e in every[s][t] if int(e) // (L * R) == node})
            one += n_here == 1
            summed += n_here > 1
    assert rows_back == one + summed
    assert hier.stats()["inter_node_bytes"] == one * 2 * H + summed * 4 * H
    # exact sums: fp32 partials (mixed widths) equal the flat backend's bit for bit
    yi = torch.randint(-3, 4, (fq.shape[0], H), generator=g).bfloat16()
    assert torch.equal(hier.combine(yi, hh), flat.combine(yi, fh))
    # bf16 rows through autograd (dispatch backward = the mixed-width combine carrying weight gradients):
    # integer data and dyadic weights keep every sum exact, so outputs and both gradients match bit for bit
    xb = torch.randint(-4, 5, (T, H), generator=g).bfloat16()
    wb = torch.randint(1, 8, (T, K), generator=g).float() / 8
    gb = torch.randint(-3, 4, (T, H), generator=g).float()
    got = []
    for bf in (flat, hier):
        xx, ww = xb.clone().requires_grad_(True), wb.clone().requires_grad_(True)
        rx, ri, rw, _, h = bf.dispatch(xx, idx, ww)
        ybf = rx + (rw.sum(1, keepdim=True) * 4).bfloat16()
        out = bf.combine(ybf, h)
        (out.float() * gb).sum().backward()
        got.append((out.detach(), xx.grad, ww.grad))
    for u, v in zip(*got):
        assert torch.equal(u, v)
    # bf16 node partials: half the inter-node combine bytes; small integers keep every sum exact
    native = EPBuffer(None, E, H, backend="hierarchical", ranks_per_node=R, combine_partials="native")
    (nq, _), _, _, _, nh = native.dispatch((q8, sc), idx, w)
    yi = torch.randint(-3, 4, (nq.shape[0], H), generator=g).bfloat16()
    assert torch.equal(native.combine(yi, nh), flat.combine(yi, fh))
    assert native.stats()["inter_node_rows"] == rows_back and native.stats()["inter_node_bytes"] == rows_back * 2 * H
    x = torch.randn(T, H, generator=g)
    xr = [x.clone().requires_grad_(True) for _ in range(2)]
    res = []
    for bf, xx in zip((flat, hier), xr):
        rx, ri, rw, _, h = bf.dispatch(xx, idx, w)
        out = bf.combine(torch.sin(rx) * rw.sum(1, keepdim=True), h)
        out.square().sum().backward()
        res.append((rx.detach(), out.detach(), xx.grad))
    assert torch.equal(res[0][0], res[1][0])
    torch.testing.assert_close(res[0][1], res[1][1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(res[0][2], res[1][2], rtol=1e-5, atol=1e-5)


def _disagreement(hier, rank, world, E):
    """One rank dispatches another dtype: EVERY rank raises ValueError naming each rank's value, before any
    payload moves; the buffer stays usable."""
    x = torch.zeros(2, H, dtype=torch.float64)
    idx = torch.tensor([[0, E - 1, -1], [1, 2, 3]], dtype=torch.int32)
    w = torch.ones(2, K)
    last = rank == world - 1
    with pytest.raises(ValueError, match=r"dtype: rank 0 = float64.*rank %d = float32" % (world - 1)):
        hier.dispatch(x.float() if last else x, idx, w)
    rx = hier.dispatch(x, idx, w)[0]
    assert rx.dtype == torch.float64


def _never_calls(rank, world, R, E):
    """The last rank never dispatches: every other rank raises EPTimeoutError (its rail and node peers within
    the timeout, the others once a peer that gave up stops answering)."""
    buf = EPBuffer(None, E, H, backend="hierarchical", ranks_per_node=R, timeout=2)
    x = torch.zeros(1, H)
    idx = torch.tensor([[0, E - 1, E // 2]], dtype=torch.int32)
    buf.dispatch(x, idx, torch.ones(1, K))  # the handshake and one good exchange
    if rank == world - 1:
        time.sleep(8)
        return
    t0 = time.time()
    with pytest.raises(EPTimeoutError, match="dispatch"):
        buf.dispatch(x, idx, torch.ones(1, K))
    assert time.time() - t0 < 7
    with pytest.raises(EPTimeoutError, match="earlier collective"):
        buf.dispatch(x, idx, torch.ones(1, K))


@pytest.mark.dist
@pytest.mark.timeout(240)
@pytest.mark.parametrize("world,R", [(4, 2), (6, 2)])
def test_hierarchical_matches_flat(world, R):
    base = int(torch.randint(0, 2**30, ()))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    ps = [ctx.Process(target=_worker, args=(r, world, R, port, base, q)) for r in range(world)]
    for p in ps:
        p.start()
    try:
        res = dict(q.get(timeout=220) for _ in ps)
    finally:
        for p in ps:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
    assert res == {r: "ok" for r in range(world)}, (f"base={base}", res)  # base: rerun these inputs


def test_hierarchical_config_validation(monkeypatch):
    with pytest.raises(ValueError, match="ranks_per_node.*hierarchical backend needs"):
        EPConfig(world_size=4, num_experts=8, hidden=16, backend="hierarchical")
    with pytest.raises(ValueError, match=r"world size 6 must be a multiple of ranks_per_node=4"):
        EPConfig(world_size=6, num_experts=12, hidden=16, backend="hierarchical", ranks_per_node=4)
    with pytest.raises(ValueError, match="combine_partials"):
        EPConfig(world_size=4, num_experts=8, hidden=16, backend="hierarchical", ranks_per_node=2, combine_partials="x")
    with pytest.raises(ValueError, match="hop1.*option of the hierarchical backend"):
        EPConfig(world_size=4, num_experts=8, hidden=16, ranks_per_node=2, hop1="symm_mem", max_tokens_per_rank=8)
    with pytest.raises(ValueError, match="max_tokens_per_rank.*symm_mem"):
        EPConfig(world_size=4, num_experts=8, hidden=16, backend="hierarchical", ranks_per_node=2, hop1="symm_mem")
    with pytest.raises(ValueError, match="hop1"):
        EPConfig(world_size=4, num_experts=8, hidden=16, backend="hierarchical", ranks_per_node=2, hop1="ib")
    cfg = EPConfig(world_size=8, num_experts=16, hidden=16, backend="hierarchical", ranks_per_node=4)
    assert cfg.nodes == 2 and EPConfig(world_size=8, num_experts=16, hidden=16).nodes == 1
    from dsmoe.parallel.buffer import _default_ranks_per_node
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert _default_ranks_per_node("hierarchical", 8) == 4 and _default_ranks_per_node("collective", 6) == 0
    assert _default_ranks_per_node("collective", 8) == 4


def _traffic_tool():
    spec = importlib.util.spec_from_file_location("internode_traffic", os.path.join(ROOT, "tools", "internode_traffic.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_traffic_tool_counts_from_the_layouts():
    """A small layout (4 nodes x 2 ranks, 32 experts, top-4, M = 2): per-token bounds and the counts against a
    direct per-token count."""
    tool = _traffic_tool()
    N, R, E, k, M, T = 4, 2, 32, 4, 2, 23
    rep = tool.measure(nodes=N, ranks_per_node=R, num_experts=E, top_k=k, max_nodes=M, tokens_per_rank=T,
                       hidden=256, n_group=4, topk_group=2, seed=int(torch.randint(0, 1000, ())))
    tok = N * R * T
    per = rep["routing"]
    assert per["max_nodes_per_token"] <= M
    h, f = rep["hierarchical"], rep["flat"]
    assert h["dispatch_inter_rows_per_token_max"] <= M
    # direct count: every token crosses to each remote node it uses once (hier), to each remote rank it uses (flat)
    assert h["dispatch_inter_rows"] == per["remote_node_pairs"] and f["dispatch_inter_rows"] == per["remote_rank_pairs"]
    assert math.isclose(h["dispatch_inter_bytes_per_token"], per["remote_node_pairs"] * rep["row_bytes"]["dispatch"] / tok)
    assert h["dispatch_inter_rows"] <= f["dispatch_inter_rows"]
    # combine: fp32 partials cost 4 B per element, except single-row partials (2 B, the row itself)
    one, rows = h["combine_inter_single_rows"], h["dispatch_inter_rows"]
    assert 0 <= one <= rows
    assert math.isclose(h["combine_inter_bytes_per_token_fp32"], (one * 2 * 256 + (rows - one) * 4 * 256) / tok)
    assert h["combine_inter_bytes_per_token_native"] <= h["combine_inter_bytes_per_token_fp32"] <= \
        h["combine_inter_bytes_per_token_all_fp32"]
