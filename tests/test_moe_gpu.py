"""GPU tier of the MoE kernels: routing, layout, permute (+FP8), unpermute vs the references; CUDA graph
capture with max_rows; torch.compile; bitwise reruns.

Routing: rows holding NaN / +-inf are compared too (ref/moe.py and docs/moe.md define their result for
both score functions), and generic random logits with a bias large enough to decide the selection are
compared allowing only near-tie swaps. Validated on CPU (DSMOE_TEST_GPU_ON_CPU=1) with the mutations
route_nan_rows_order and route_ignore_bias (docs/gpu.md)."""
import pytest
import torch

import dsmoe.ops as ops
import dsmoe.ref as ref
from util import DEV, digest

pytestmark = pytest.mark.gpu


def _separated_logits(T, E, device=DEV):
    # distinct, well-separated scores so that sigmoid's last-ulp differences cannot reorder experts
    base = torch.stack([torch.randperm(E) for _ in range(T)]).float()
    return ((base - E / 2) * (6.0 / E)).to(device)


@pytest.mark.parametrize("E,n_group,topk_group,top_k", [(256, 8, 4, 8), (64, 8, 3, 6), (160, 1, 1, 6), (512, 16, 4, 8), (40, 4, 2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_route_matches_reference(E, n_group, topk_group, top_k, dtype, score_func):
    T = 1001
    logits = _separated_logits(T, E).to(dtype)
    bias = (torch.randn(E, device=DEV) * 1e-3 - 0.5)  # small: keeps the separation, scores negative
    i, w = ops.moe_route(logits, bias, top_k=top_k, n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5,
                         score_func=score_func)
    ri, rw = ref.moe_route(logits.cpu(), bias.cpu(), top_k=top_k, n_group=n_group, topk_group=topk_group,
                           routed_scaling_factor=2.5, score_func=score_func)
    assert torch.equal(i.cpu(), ri)
    torch.testing.assert_close(w.cpu(), rw, rtol=2e-6, atol=1e-7)
    i2, w2 = ops.moe_route(logits, bias, top_k=top_k, n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5,
                           score_func=score_func)
    assert digest(i, w) == digest(i2, w2)


@pytest.mark.parametrize("E,n_group,topk_group,top_k", [(256, 8, 4, 8), (64, 8, 3, 6), (512, 16, 4, 8), (40, 4, 2, 3)])
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_route_without_bias_group_max_matches_reference(E, n_group, topk_group, top_k, score_func):
    """No correction bias: groups score by their max (the reference gate's V2 rule) on the kernel too."""
    T = 777
    logits = _separated_logits(T, E)
    i, w = ops.moe_route(logits, None, top_k=top_k, n_group=n_group, topk_group=topk_group, routed_scaling_factor=1.5,
                         score_func=score_func)
    ri, rw = ref.moe_route(logits.cpu(), None, top_k=top_k, n_group=n_group, topk_group=topk_group,
                           routed_scaling_factor=1.5, score_func=score_func)
    assert torch.equal(i.cpu(), ri)
    torch.testing.assert_close(w.cpu(), rw, rtol=2e-6, atol=1e-7)
    # the hand case where max and top-2 sum disagree
    s = torch.tensor([[0.90, 0.10, 0.60, 0.60]], device="cuda")
    l = torch.log(s / (1 - s))
    kw = dict(top_k=1, n_group=2, topk_group=1, routed_scaling_factor=1.0)
    assert ops.moe_route(l, None, **kw)[0].tolist() == [[0]]
    assert ops.moe_route(l, torch.zeros(4, device="cuda"), **kw)[0].tolist() == [[2]]


def test_route_ties_and_nan_on_gpu():
    l = torch.zeros(5, 64, device=DEV)
    l[1, 3] = float("nan")
    i, w = ops.moe_route(l, None, top_k=4, n_group=8, topk_group=2, routed_scaling_factor=1.0)
    ri, _ = ref.moe_route(l.cpu(), None, top_k=4, n_group=8, topk_group=2, routed_scaling_factor=1.0)
    assert torch.equal(i.cpu(), ri)


def test_route_inf_bias_and_odd_expert_counts_on_gpu():
    # E not a multiple of 32; a group [+inf, -inf] (NaN group score ranks last); -inf / +inf logits
    for E, n_group, topk_group, top_k in ((40, 4, 2, 3), (33, 1, 1, 5), (8, 4, 2, 3)):
        l = _separated_logits(67, E)
        l[3, :] = float("-inf")
        l[4, 2] = float("inf")
        l[5, 0] = float("nan")
        b = torch.full((E,), -0.7, device=DEV)  # uniform: keeps the logits' separation
        b[0], b[1] = float("inf"), float("-inf")
        for sf in ("sigmoid", "softmax"):
            i, w = ops.moe_route(l, b, top_k=top_k, n_group=n_group, topk_group=topk_group, routed_scaling_factor=1.3,
                                 score_func=sf)
            ri, rw = ref.moe_route(l.cpu(), b.cpu(), top_k=top_k, n_group=n_group, topk_group=topk_group,
                                   routed_scaling_factor=1.3, score_func=sf)
            # every row, the softmax rows with -inf / +inf logits (NaN scores) included: the spec defines them
            assert torch.equal(i.cpu(), ri)
            torch.testing.assert_close(w.cpu(), rw, rtol=2e-6, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_route_generic_logits_and_deciding_bias(score_func):
    """N(0, 1) logits (near ties happen) and a bias as large as the score spread, so that it changes most
    tokens' selection. Indices must match the reference except where the reference's own biased scores
    make the swap a near tie (<= 1e-5 apart); weights must match wherever indices do."""
    T, E, k, n_group, topk_group = 1003, 256, 8, 8, 4
    logits = torch.randn(T, E, device=DEV)
    bias = torch.randn(E, device=DEV) * (0.3 if score_func == "sigmoid" else 0.01)
    kw = dict(top_k=k, n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5, score_func=score_func)
    i, w = ops.moe_route(logits, bias, **kw)
    ri, rw = ref.moe_route(logits.cpu(), bias.cpu(), **kw)
    ri0, _ = ref.moe_route(logits.cpu(), None, **kw)
    decided = (ri.sort(-1).values != ri0.sort(-1).values).any(-1).float().mean().item()
    assert decided > 0.5, f"the bias must decide the selection of most tokens (it changes {decided:.0%})"
    lf = logits.cpu().double()
    sc = (torch.sigmoid(lf) if score_func == "sigmoid" else torch.softmax(lf, -1)) + bias.cpu().double()
    same = (i.cpu().sort(-1).values == ri.sort(-1).values).all(-1)
    for t in (~same).nonzero().squeeze(1).tolist():
        got, want = sc[t, i[t].long().cpu()].sort().values, sc[t, ri[t].long()].sort().values
        assert (got - want).abs().max() <= 1e-5, f"token {t}: {i[t].tolist()} vs {ri[t].tolist()} (not a near tie)"
    assert (~same).float().mean() <= 0.02, f"{int((~same).sum())} of {T} tokens differ"
    rows = same & (i.cpu() == ri).all(-1)
    torch.testing.assert_close(w.cpu()[rows], rw[rows], rtol=2e-6, atol=1e-7)


@pytest.mark.cuda_only  # compares a CPU run with a CUDA run of the same leaf tensors
def test_backward_with_expanded_gradients_gpu():
    """``.sum().backward()`` hands the custom ops gradients with strides (0, 0): they must not be read
    as contiguous rows."""
    T, k, E, H = 37, 3, 9, 24
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(torch.int32)
    x = torch.randn(T, H, dtype=torch.bfloat16)
    w = torch.rand(T, k)
    grads = []
    for dev in ("cpu", DEV):
        xx = x.to(dev).requires_grad_(True)
        ww = w.to(dev).requires_grad_(True)
        xp, m, tpe, rm = ops.moe_permute(xx, idx.to(dev), E, alignment=8)
        xp.float().sum().backward(retain_graph=True)
        gx1 = xx.grad.clone()
        xx.grad = None
        ops.moe_unpermute(xp, rm, ww).sum().backward()
        grads.append((gx1.cpu(), xx.grad.cpu(), ww.grad.cpu()))
    (a1, a2, a3), (b1, b2, b3) = grads
    assert torch.equal(b1, a1) and torch.equal(b2, a2)
    torch.testing.assert_close(b3, a3, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,k,E,align,H", [(4096, 8, 256, 128, 7168), (999, 6, 64, 128, 384), (37, 3, 7, 16, 40), (0, 8, 16, 128, 128),
                                           (3000, 4, 33, 1, 24)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_permute_unpermute_match_reference(T, k, E, align, H, dtype):
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)]) if T else torch.empty(0, k, dtype=torch.long)
    if T:
        idx[torch.rand(T, k) < 0.05] = -1
    idx = idx.to(torch.int32)
    x = torch.randn(T, H, dtype=dtype)
    xp, m, tpe, rm = ops.moe_permute(x.to(DEV), idx.to(DEV), E, alignment=align)
    rxp, rmi, rtpe, rrm = ref.moe_permute(x, idx, E, alignment=align)
    assert torch.equal(m.cpu(), rmi) and torch.equal(tpe.cpu(), rtpe) and torch.equal(rm.cpu(), rrm)
    assert torch.equal(xp.cpu(), rxp)
    # graph-safe size: same layout, padding tail
    mr = ops.moe_permute_max_rows(T, k, E, align)
    xp2, m2, tpe2, rm2 = ops.moe_permute(x.to(DEV), idx.to(DEV), E, alignment=align, max_rows=mr)
    assert torch.equal(rm2, rm) and torch.equal(m2[: m.shape[0]], m) and (m2[m.shape[0]:] == -1).all()
    assert torch.equal(xp2[: xp.shape[0]], xp) and (xp2[xp.shape[0]:] == 0).all()
    w = torch.rand(T, k)
    y = ops.moe_unpermute(xp, rm, w.to(DEV))
    ry = ref.moe_unpermute(rxp, rrm, w)
    assert torch.equal(y.cpu(), ry)
    # backward of permute (unweighted gather) and of unpermute (weighted scatter)
    g = torch.randn(xp.shape, dtype=dtype)
    assert torch.equal(ops.moe_unpermute(g.to(DEV), rm, None).cpu(), ref.moe_unpermute(g, rrm, None))
    gy = torch.randn(T, H, dtype=dtype)
    sc = torch.ops.dsmoe.moe_scatter_rows(gy.to(DEV), rm, w.to(DEV), None, xp.shape[0])
    assert torch.equal(sc.cpu(), ref.moe_scatter_rows(gy, rrm, w, xp.shape[0]))


@pytest.mark.parametrize("T,H", [(513, 7168), (7, 256), (0, 128)])
def test_permute_fp8_matches_reference(T, H):
    k, E = 8, 64
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(torch.int32) if T else torch.empty(0, k, dtype=torch.int32)
    x = torch.randn(T, H, dtype=torch.bfloat16) * 3
    if T:
        x[0, :128] = 0  # an all-zero group
    q, s, m, tpe, rm = ops.moe_permute(x.to(DEV), idx.to(DEV), E, quantize_fp8=True)
    rq, rs, rmi, _, rrm = ref.moe_permute(x, idx, E, quantize_fp8=True)
    assert torch.equal(rm.cpu(), rrm) and torch.equal(m.cpu(), rmi)
    assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(s.cpu(), rs)


@pytest.mark.cuda_only
def test_permute_cuda_graph_and_compile():
    T, k, E, H = 512, 8, 256, 256
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(torch.int32).to(DEV)
    x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
    w = torch.rand(T, k, device=DEV)
    mr = ops.moe_permute_max_rows(T, k, E)

    def f():
        xp, m, tpe, rm = ops.moe_permute(x, idx, E, max_rows=mr)
        return ops.moe_unpermute(xp, rm, w)

    expect = f()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = f()
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, f()) and not torch.equal(out, expect)
    cf = torch.compile(f, fullgraph=True)
    assert torch.equal(cf(), f())


def test_permute_grad_gpu():
    T, k, E, H = 64, 4, 16, 32
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(torch.int32)
    x = torch.randn(T, H, requires_grad=True)
    w = torch.rand(T, k, requires_grad=True)
    xg, wg = x.detach().to(DEV).requires_grad_(True), w.detach().to(DEV).requires_grad_(True)
    g = torch.randn(T, H)
    for xx, ww, ii, gg in ((x, w, idx, g), (xg, wg, idx.to(DEV), g.to(DEV))):
        xp, m, tpe, rm = ops.moe_permute(xx, ii, E, alignment=8)
        (ops.moe_unpermute(xp * xp, rm, ww) * gg).sum().backward()
    torch.testing.assert_close(xg.grad.cpu(), x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wg.grad.cpu(), w.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,all_skipped", [(0, False), (6, True)])
@pytest.mark.parametrize("compiled", [False, True])
def test_zero_tokens_and_zero_rows_grad_gpu(T, all_skipped, compiled):
    """T = 0 and R = 0 on the kernels: forward and both gradients equal the CPU path (zeros / empty)."""
    k, E, H = 3, 8, 64
    idx = torch.randint(0, E, (T, k), dtype=torch.int32, device="cuda")
    if all_skipped:
        idx.fill_(-1)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(T, k, device="cuda", requires_grad=True)

    def f(x, idx, w):
        xp, m, tpe, rm = ops.moe_permute(x, idx, E, alignment=128)
        return ops.moe_unpermute(xp * 2, rm, w)

    g = torch.compile(f, fullgraph=True, dynamic=True) if compiled else f
    y = g(x, idx, w)
    y.float().sum().backward()
    assert y.shape == (T, H) and (y == 0).all()
    assert x.grad.shape == (T, H) and (x.grad == 0).all()
    assert w.grad.shape == (T, k) and (w.grad == 0).all()
