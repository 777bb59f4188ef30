"""CPU tier of the MoE ops: routing vs an independent brute-force rule and vs Hugging Face transformers,
permutation layout invariants, gradients, balancing, bad inputs, torch.compile / opcheck."""
import itertools

import pytest
import torch

import dsmoe.ops as ops
import dsmoe.ref as ref
from util import digest

V3 = dict(top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5)


def _brute_route(logits, bias, top_k, n_group, topk_group, rsf, norm=True, score_func="sigmoid"):
    """Per-token python loops, written independently of the reference (no sorts of tensors)."""
    T, E = logits.shape
    G = E // n_group
    idx_out, w_out = [], []
    for t in range(T):
        l = logits[t].float()
        s = l.sigmoid() if score_func == "sigmoid" else l.softmax(-1)
        c = [float(s[e] + (bias[e] if bias is not None else 0.0)) for e in range(E)]
        gs = []
        for g in range(n_group):
            vals = sorted(c[g * G:(g + 1) * G], reverse=True)[:2]
            # DeepSeek's reference gate: top-2 sum with a bias, the group max without one
            two = len(vals) == 2 and bias is not None
            gs.append(float(torch.tensor(vals[0]) + torch.tensor(vals[1])) if two else vals[0])
        # max value, lowest index on ties
        kept = sorted(range(n_group), key=lambda g: (-gs[g], g))[:topk_group]
        cand = [e for e in range(E) if e // G in kept]
        chosen = sorted(cand, key=lambda e: (-c[e], e))[:top_k]
        w = s[torch.tensor(chosen)]
        if norm:
            d = w[0].clone()
            for j in range(1, top_k):
                d = d + w[j]
            w = w / (d + 1e-20)
        idx_out.append(chosen)
        w_out.append(w * rsf)
    return torch.tensor(idx_out, dtype=torch.int32).view(T, top_k), torch.stack(w_out).view(T, top_k)


@pytest.mark.parametrize("E,n_group,topk_group,top_k", [(256, 8, 4, 8), (64, 8, 3, 6), (37, 1, 1, 5), (12, 4, 2, 3), (8, 8, 3, 2)])
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_route_matches_brute_force(E, n_group, topk_group, top_k, score_func, with_bias):
    T = 19
    logits = torch.randn(T, E) * 2
    bias = torch.randn(E) * 0.3 - 0.8 if with_bias else None  # makes many biased scores negative
    idx, w = ops.moe_route(logits, bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
                           routed_scaling_factor=1.7, score_func=score_func)
    bi, bw = _brute_route(logits, bias, top_k, n_group, topk_group, 1.7, True, score_func)
    assert idx.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(idx, bi)
    # NOTE: torch's CPU sigmoid/softmax is vectorized differently for a row than for a matrix (last ulp)
    torch.testing.assert_close(w, bw, rtol=3e-7, atol=1e-7)


def test_route_ties_lowest_index():
    E = 16
    logits = torch.zeros(3, E)  # every score equal
    idx, w = ops.moe_route(logits, None, top_k=4, n_group=4, topk_group=2, routed_scaling_factor=1.0)
    # groups 0 and 1 win the group tie; experts 0..3 win the expert tie
    assert idx.tolist() == [[0, 1, 2, 3]] * 3
    assert torch.allclose(w, torch.full_like(w, 0.25))
    logits[:, 9] = 5.0
    logits[:, 13] = 5.0
    idx, _ = ops.moe_route(logits, None, top_k=3, n_group=4, topk_group=2, routed_scaling_factor=1.0)
    assert idx.tolist() == [[9, 13, 8]] * 3


def test_route_nan_group_score_ranks_last():
    """A group holding +inf and -inf selection scores sums to NaN: it must rank as -inf (torch's sort
    would put NaN first), on every path."""
    E = 8
    logits = torch.zeros(4, E)
    logits[1, 1] = float("nan")  # row 1: NaN score -> -inf selection score, same as the -inf bias
    bias = torch.zeros(E)
    bias[0], bias[1] = float("inf"), float("-inf")  # group 0 = [+inf, -inf] -> NaN group score
    bias[6] = 0.25  # group 3 is the best finite group
    idx, w = ops.moe_route(logits, bias, top_k=3, n_group=4, topk_group=2, routed_scaling_factor=1.0)
    # kept groups: 3 (score 1.25), then 1 (1.0, lowest index among the ties 1, 2); group 0 dropped
    assert idx.tolist() == [[6, 2, 3]] * 4
    assert torch.isfinite(w).all()


def test_route_negative_biased_scores_use_minus_inf():
    """With every biased score negative, masking with 0 would pick experts from dropped groups."""
    E, G = 16, 4
    logits = torch.randn(5, E)
    bias = torch.full((E,), -3.0)
    bias[:4] = -2.0  # group 0 best
    idx, _ = ops.moe_route(logits, bias, top_k=4, n_group=G, topk_group=1, routed_scaling_factor=1.0)
    assert (idx < 4).all()


def test_route_weights_unbiased_and_no_norm():
    logits = torch.randn(11, 32)
    bias = torch.randn(32)
    idx, w = ops.moe_route(logits, bias, top_k=4, n_group=4, topk_group=2, routed_scaling_factor=3.0, norm_topk_prob=False)
    s = logits.sigmoid()
    assert torch.equal(w, s.gather(1, idx.long()) * 3.0)


def _hf_router(E, n_group, topk_group, top_k, rsf, hidden=24):
    cfg_mod = pytest.importorskip("transformers.models.deepseek_v3.configuration_deepseek_v3")
    mod = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    cfg = cfg_mod.DeepseekV3Config(hidden_size=hidden, n_routed_experts=E, num_experts_per_tok=top_k, n_group=n_group,
                                   topk_group=topk_group, routed_scaling_factor=rsf, norm_topk_prob=True,
                                   moe_intermediate_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    r = mod.DeepseekV3TopkRouter(cfg)
    return r


@pytest.mark.parametrize("E,n_group,topk_group,top_k", [(256, 8, 4, 8), (64, 8, 3, 6), (32, 1, 1, 4)])
def test_route_matches_transformers(E, n_group, topk_group, top_k):
    r = _hf_router(E, n_group, topk_group, top_k, 2.5)
    T = 23
    with torch.no_grad():
        r.weight.normal_()
        r.e_score_correction_bias.copy_(torch.randn(E) * 0.4 - 1.0)  # biased scores mostly negative
        h = torch.randn(T, r.hidden_dim)
        logits, hw, hi = r(h)
    idx, w = ops.moe_route(logits, r.e_score_correction_bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
                           routed_scaling_factor=2.5)
    # HF's topk is unsorted: compare per token as sets, weights matched by expert.
    hs, ho = hi.sort(dim=1)
    ms, mo = idx.long().sort(dim=1)
    assert torch.equal(hs, ms)
    torch.testing.assert_close(w.gather(1, mo), hw.gather(1, ho), rtol=2e-7, atol=1e-7)


def _deepseek_gate(logits, bias, top_k, n_group, topk_group, rsf, score_func):
    """DeepSeek-V3's published reference gate (inference/model.py, Gate.forward), written out again:
    group scores are the group max without a bias and the sum of the top-2 biased scores with one;
    torch.topk selection (the inputs below have no ties); sigmoid weights normalized, softmax not."""
    s = logits.float().softmax(-1) if score_func == "softmax" else logits.float().sigmoid()
    c = s + bias if bias is not None else s
    T, E = c.shape
    if n_group > 1:
        cg = c.view(T, n_group, -1)
        gs = cg.amax(-1) if bias is None else cg.topk(2, -1).values.sum(-1)
        drop = torch.ones(T, n_group, dtype=torch.bool).scatter_(1, gs.topk(topk_group, -1).indices, False)
        c = cg.masked_fill(drop.unsqueeze(-1), float("-inf")).flatten(1)
    idx = c.topk(top_k, -1).indices
    w = s.gather(1, idx)
    if score_func == "sigmoid":
        w = w / w.sum(-1, keepdim=True)
    return idx, w * rsf


def test_route_group_score_rule_of_the_reference_gate():
    """Without a correction bias a group scores by its best expert (V2's rule, kept by DeepSeek's reference
    gate); with one, by the sum of its two best biased scores (V3). A hand case where the rules disagree."""
    s = torch.tensor([[0.90, 0.10, 0.60, 0.60]])
    logits = torch.log(s / (1 - s))  # sigmoid(logits) = s
    kw = dict(top_k=1, n_group=2, topk_group=1, routed_scaling_factor=1.0)
    idx, _ = ops.moe_route(logits, None, **kw)
    assert idx.tolist() == [[0]]  # group 0 (max 0.9 > 0.6) wins; the top-2 sum would pick group 1 (1.2 > 1.0)
    idx, _ = ops.moe_route(logits, torch.zeros(4), **kw)
    assert idx.tolist() == [[2]]  # with a (zero) bias: the top-2 sum, group 1


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("E,n_group,topk_group,top_k", [(64, 8, 3, 6), (160, 8, 3, 6), (32, 4, 2, 4)])
def test_route_matches_deepseek_reference_gate(E, n_group, topk_group, top_k, score_func, with_bias):
    """Random logits vs the published reference gate, experts compared as sets per token (its topk is
    unordered in ties only; distinct random scores have none)."""
    T = 257
    logits = torch.randn(T, E) * 2
    bias = torch.randn(E) * 0.3 if with_bias else None
    idx, w = ops.moe_route(logits, bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
                           routed_scaling_factor=2.5, norm_topk_prob=score_func == "sigmoid", score_func=score_func)
    ri, rw = _deepseek_gate(logits, bias, top_k, n_group, topk_group, 2.5, score_func)
    ms, mo = idx.long().sort(1)
    rs, ro = ri.sort(1)
    assert torch.equal(ms, rs)
    torch.testing.assert_close(w.gather(1, mo), rw.gather(1, ro), rtol=1e-6, atol=1e-7)
    if not with_bias:
        # the rule matters on random inputs: the top-2 sum would change the experts of some tokens
        t2, _ = ops.moe_route(logits, torch.zeros(E), top_k=top_k, n_group=n_group, topk_group=topk_group,
                              routed_scaling_factor=2.5, score_func=score_func)
        assert (t2.long().sort(1).values != rs).any(1).float().mean() > 0.05


def test_route_matches_transformers_deepseek_v2_group_limited_greedy():
    """transformers' DeepSeek-V2 router (softmax, group max, no bias, no normalization) as an outside oracle."""
    mod = pytest.importorskip("transformers.models.deepseek_v2.modeling_deepseek_v2")
    cfg_mod = pytest.importorskip("transformers.models.deepseek_v2.configuration_deepseek_v2")
    E, n_group, topk_group, top_k = 64, 8, 3, 6
    cfg = cfg_mod.DeepseekV2Config(hidden_size=32, n_routed_experts=E, num_experts_per_tok=top_k, n_group=n_group,
                                   topk_group=topk_group, topk_method="group_limited_greedy", routed_scaling_factor=1.5,
                                   moe_intermediate_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    r = mod.DeepseekV2TopkRouter(cfg)
    with torch.no_grad():
        r.weight.normal_()
        logits, hw, hi = r(torch.randn(41, 32))
    idx, w = ops.moe_route(logits, None, top_k=top_k, n_group=n_group, topk_group=topk_group,
                           routed_scaling_factor=1.5, norm_topk_prob=False, score_func="softmax")
    hs, ho = hi.sort(1)
    ms, mo = idx.long().sort(1)
    assert torch.equal(hs, ms)
    torch.testing.assert_close(w.gather(1, mo), hw.gather(1, ho), rtol=1e-6, atol=1e-7)


def test_route_empty_and_bf16_input():
    idx, w = ops.moe_route(torch.randn(0, 64), None, top_k=4, n_group=8, topk_group=2, routed_scaling_factor=1.0)
    assert idx.shape == (0, 4) and w.shape == (0, 4)
    l = torch.randn(7, 64).bfloat16()
    i1, w1 = ops.moe_route(l, None, top_k=4, n_group=8, topk_group=2, routed_scaling_factor=1.0)
    i2, w2 = ref.moe_route(l.float(), None, top_k=4, n_group=8, topk_group=2, routed_scaling_factor=1.0)
    assert torch.equal(i1, i2) and torch.equal(w1, w2)


def test_route_bad_inputs():
    l = torch.randn(4, 64)
    with pytest.raises(ValueError, match="n_group"):
        ops.moe_route(l, None, top_k=2, n_group=7, topk_group=2, routed_scaling_factor=1.0)
    with pytest.raises(ValueError, match="topk_group"):
        ops.moe_route(l, None, top_k=2, n_group=8, topk_group=9, routed_scaling_factor=1.0)
    with pytest.raises(ValueError, match="top_k"):
        ops.moe_route(l, None, top_k=17, n_group=8, topk_group=2, routed_scaling_factor=1.0)
    with pytest.raises(ValueError, match=r"'bias' must have shape \(64,\)"):
        ops.moe_route(l, torch.zeros(63), top_k=2, n_group=8, topk_group=2, routed_scaling_factor=1.0)
    with pytest.raises(ValueError, match="score_func"):
        ops.moe_route(l, None, top_k=2, n_group=8, topk_group=2, routed_scaling_factor=1.0, score_func="relu")
    with pytest.raises(TypeError, match="router_logits"):
        ops.moe_route(l.long(), None, top_k=2, n_group=8, topk_group=2, routed_scaling_factor=1.0)


def test_route_opcheck_and_compile():
    l = torch.randn(9, 64)
    b = torch.randn(64)
    torch.library.opcheck(torch.ops.dsmoe.moe_route.default, (l, b, 4, 8, 2, 2.5, True, "sigmoid"))
    f = torch.compile(lambda l, b: ops.moe_route(l, b, top_k=4, n_group=8, topk_group=2, routed_scaling_factor=2.5),
                      fullgraph=True, backend="aot_eager")
    i1, w1 = f(l, b)
    i2, w2 = ops.moe_route(l, b, top_k=4, n_group=8, topk_group=2, routed_scaling_factor=2.5)
    assert torch.equal(i1, i2) and torch.equal(w1, w2)


# ----------------------------------------------------------------------------- permutation
def _rand_topk(T, k, E, skip_frac=0.1):
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)]) if T else torch.empty(0, k, dtype=torch.long)
    if T and skip_frac:
        idx[torch.rand(T, k) < skip_frac] = -1
    return idx.to(torch.int32)


@pytest.mark.parametrize("T,k,E,align", [(33, 4, 10, 8), (50, 8, 64, 128), (1, 1, 3, 1), (0, 3, 5, 4), (17, 3, 7, 16)])
def test_permute_layout_exact(T, k, E, align):
    idx = _rand_topk(T, k, E)
    H = 40
    x = torch.randn(T, H)
    x_perm, m_idx, tpe, row_map = ops.moe_permute(x, idx, E, alignment=align)
    # independent construction with python loops
    rows, m_exp = [], []
    for e in range(E):
        pairs = [(t, j) for t in range(T) for j in range(k) if int(idx[t, j]) == e]
        assert int(tpe[e]) == len(pairs)
        start = len(m_exp)
        assert start % align == 0
        for p in pairs:
            rows.append(p)
            m_exp.append(e)
        while len(m_exp) % align:
            m_exp.append(-1)
            rows.append(None)
        for n, p in enumerate(pairs):
            assert int(row_map[p]) == start + n
    assert m_idx.tolist() == m_exp
    assert x_perm.shape == (len(m_exp), H)
    for r, p in enumerate(rows):
        if p is None:
            assert (x_perm[r] == 0).all()
        else:
            assert torch.equal(x_perm[r], x[p[0]])
    assert (row_map[idx < 0] == -1).all()
    assert m_idx.dtype == tpe.dtype == row_map.dtype == torch.int32


def test_permute_max_rows_and_bound():
    T, k, E, a = 21, 4, 9, 8
    idx = _rand_topk(T, k, E, 0.0)
    mr = ops.moe_permute_max_rows(T, k, E, a)
    assert mr >= T * k and mr % a == 0
    xp, m, tpe, rm = ops.moe_permute(torch.randn(T, 16), idx, E, alignment=a, max_rows=mr)
    assert xp.shape[0] == mr
    xe, me, _, rme = ops.moe_permute(xp.new_zeros(0, 16) if False else torch.randn(T, 16), idx, E, alignment=a)
    assert torch.equal(rm, rme) and torch.equal(m[: me.shape[0]], me) and (m[me.shape[0]:] == -1).all()
    # worst case: every expert gets exactly one row past a multiple of a
    T2, k2, E2 = 9, 1, 9
    idx2 = torch.arange(9, dtype=torch.int32).view(9, 1)
    xp2, m2, *_ = ops.moe_permute(torch.randn(T2, 4), idx2, E2, alignment=a)
    assert xp2.shape[0] == ops.moe_permute_max_rows(T2, k2, E2, a) == 72
    with pytest.raises(ValueError, match="max_rows"):
        ops.moe_permute(torch.randn(T, 16), idx, E, alignment=a, max_rows=mr - a)


def test_permute_unpermute_roundtrip_and_grad():
    T, k, E, H = 13, 3, 6, 5
    idx = _rand_topk(T, k, E, 0.2)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    xp, m, tpe, rm = ops.moe_permute(x, idx, E, alignment=4)
    y = ops.moe_unpermute(xp, rm, w)
    expect = ((idx >= 0).double() * w).sum(1, keepdim=True) * x
    torch.testing.assert_close(y, expect)

    def f(x, w):
        xp, _, _, rm = ops.moe_permute(x, idx, E, alignment=4)
        return ops.moe_unpermute(xp * 1.5 + xp ** 2, rm, w)

    assert torch.autograd.gradcheck(f, (x, w))
    # each op alone
    yp = torch.randn(xp.shape[0], H, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda yp, w: ops.moe_unpermute(yp, rm, w), (yp, w))
    assert torch.autograd.gradcheck(lambda x: ops.moe_permute(x, idx, E, alignment=4)[0], (x,))


def test_unpermute_skips_and_none_weights():
    T, k, E, H = 8, 2, 4, 6
    idx = _rand_topk(T, k, E, 0.3)
    x = torch.randn(T, H)
    xp, m, tpe, rm = ops.moe_permute(x, idx, E, alignment=2)
    y = ops.moe_unpermute(xp, rm, None)
    torch.testing.assert_close(y, (idx >= 0).sum(1, keepdim=True).float() * x)


def test_permute_fp8():
    T, k, E, H = 19, 4, 8, 256
    idx = _rand_topk(T, k, E)
    x = torch.randn(T, H, dtype=torch.bfloat16)
    q, s, m, tpe, rm = ops.moe_permute(x, idx, E, alignment=16, quantize_fp8=True)
    xq, xs = ref.per_token_group_quant_fp8(x, 128)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (q.shape[0], 2)
    for t in range(T):
        for j in range(k):
            r = int(rm[t, j])
            if r >= 0:
                assert torch.equal(q[r].view(torch.uint8), xq[t].view(torch.uint8)) and torch.equal(s[r], xs[t])
    pad = m < 0
    assert (q[pad].view(torch.uint8) == 0).all()
    assert torch.allclose(s[pad], torch.full_like(s[pad], 1e-4 / 448))
    with pytest.raises(ValueError, match="multiple of 128"):
        ops.moe_permute(torch.randn(T, 200), idx, E, quantize_fp8=True)


def test_permute_bad_inputs():
    x = torch.randn(5, 8)
    idx = _rand_topk(5, 2, 4)
    bad = idx.clone()
    bad[2, 1] = 4
    with pytest.raises(ValueError, match=r"topk_idx.*\[-1, 4\)"):
        ops.moe_permute(x, bad, 4)
    bad[2, 1] = -2
    with pytest.raises(ValueError, match="topk_idx"):
        ops.moe_permute(x, bad, 4)
    with pytest.raises(ValueError, match="one per token"):
        ops.moe_permute(torch.randn(6, 8), idx, 4)
    with pytest.raises(TypeError, match="topk_idx"):
        ops.moe_permute(x, idx.float(), 4)
    xp, m, tpe, rm = ops.moe_permute(x, idx, 4, alignment=2)
    with pytest.raises(ValueError, match="topk_weights"):
        ops.moe_unpermute(xp, rm, torch.rand(5, 3))
    with pytest.raises(ValueError, match="row_map"):
        ops.moe_unpermute(xp[:1], rm, None)


def test_permute_opcheck_compile_fixed_shape():
    T, k, E = 12, 2, 5
    idx = _rand_topk(T, k, E)
    x = torch.randn(T, 8)
    mr = ops.moe_permute_max_rows(T, k, E, 4)
    m, tpe, rm = torch.ops.dsmoe.moe_permute_layout(idx, E, 4, mr)
    torch.library.opcheck(torch.ops.dsmoe.moe_permute_layout.default, (idx, E, 4, mr))
    torch.library.opcheck(torch.ops.dsmoe.moe_scatter_rows.default, (x, rm, None, m, mr))
    torch.library.opcheck(torch.ops.dsmoe.moe_unpermute.default, (torch.randn(mr, 8), rm, torch.rand(T, k)))

    def f(x, idx, w):
        xp, m, tpe, rm = ops.moe_permute(x, idx, E, alignment=4, max_rows=mr)
        return ops.moe_unpermute(xp * 2, rm, w)

    w = torch.rand(T, k)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(cf(x, idx, w), f(x, idx, w))


def test_permute_deterministic():
    idx = _rand_topk(40, 4, 16)
    x = torch.randn(40, 32)
    assert digest(*ops.moe_permute(x, idx, 16)) == digest(*ops.moe_permute(x, idx, 16))


# ----------------------------------------------------------------------------- balancing
def test_expert_load_and_bias_update():
    idx = torch.tensor([[0, 1], [1, -1], [1, 3]], dtype=torch.int32)
    load = ops.expert_load(idx, 4)
    assert load.tolist() == [1, 3, 0, 1]
    b = torch.zeros(4)
    out = ops.update_expert_bias(b, load, 0.001)
    assert out is b
    # mean 1.25: above -> -gamma, below -> +gamma
    assert torch.allclose(b, torch.tensor([0.001, -0.001, 0.001, 0.001]))
    b2 = torch.zeros(3)
    ops.update_expert_bias(b2, torch.tensor([2, 2, 2]), 0.1)
    assert (b2 == 0).all()
    with pytest.raises(ValueError, match="load"):
        ops.update_expert_bias(torch.zeros(4), torch.zeros(5), 0.1)
    with pytest.raises(ValueError, match="topk_idx"):
        ops.expert_load(torch.tensor([[4]]), 4)


def test_bias_update_balances_routing():
    """A few hundred aux-loss-free steps on a skewed router must lower the max/mean load."""
    E, T = 32, 512
    w = torch.randn(E, 16)
    w[:4] *= 3  # hot experts
    h = torch.randn(T, 16)
    logits = h @ w.T
    bias = torch.zeros(E)
    ratios = []
    for _ in range(300):
        idx, _ = ops.moe_route(logits, bias, top_k=4, n_group=4, topk_group=2, routed_scaling_factor=1.0)
        load = ops.expert_load(idx, E).float()
        ratios.append((load.max() / load.mean()).item())
        ops.update_expert_bias(bias, load, 0.01)
    # NOTE: the sign update makes the load oscillate step to step, so the last step alone is a noisy
    # statistic (it missed 0.7x for ~2% of seeds); the mean of the last 50 steps stays <= 0.66x over 200
    # seeds, against ~1.0x for a bias update that does nothing.
    assert sum(ratios[-50:]) / 50 < 0.72 * ratios[0]


def test_sequence_balance_loss():
    B, S, E, k = 3, 10, 8, 2
    s = torch.rand(B, S, E, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.stack([torch.randperm(E)[:k] for _ in range(S)]) for _ in range(B)])
    loss = ops.sequence_balance_loss(s, idx, alpha=0.01)
    # explicit per-sequence formula
    tot = 0.0
    for b in range(B):
        f = torch.zeros(E, dtype=torch.float64)
        for t in range(S):
            for e in idx[b, t].tolist():
                f[e] += E / (k * S)
        P = (s[b] / s[b].sum(-1, keepdim=True)).mean(0)
        tot = tot + 0.01 * (f * P).sum()
    torch.testing.assert_close(loss, tot / B)
    assert torch.autograd.gradcheck(lambda s: ops.sequence_balance_loss(s, idx, alpha=0.01), (s,))
    # perfectly uniform routing and scores: loss = alpha
    s_u = torch.ones(1, 8, 8)
    idx_u = torch.arange(8).view(1, 8, 1).repeat(1, 1, 1)
    torch.testing.assert_close(ops.sequence_balance_loss(s_u, idx_u, alpha=1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="leading dims"):
        ops.sequence_balance_loss(s, idx[:, :5])


def test_scalar_arguments_are_checked_before_use():
    """Scalars that used to reach float() unchecked (a bare 'could not convert string to float')."""
    logits, bias = torch.randn(3, 16), torch.zeros(16)
    kw = dict(top_k=2, n_group=4, topk_group=2)
    for bad in ("2.5", None, float("nan"), float("inf"), True):
        with pytest.raises((TypeError, ValueError), match=r"dsmoe\.moe_route: argument 'routed_scaling_factor'"):
            ops.moe_route(logits, bias, routed_scaling_factor=bad, **kw)
    idx, _ = ops.moe_route(logits, bias, routed_scaling_factor=2, **kw)  # an int is a number
    s = torch.rand(3, 16)
    with pytest.raises(TypeError, match=r"dsmoe\.sequence_balance_loss: argument 'alpha' must be a float, got str"):
        ops.sequence_balance_loss(s, idx, alpha="0.1")
    with pytest.raises(ValueError, match=r"dsmoe\.sequence_balance_loss: argument 'alpha' must be >= 0"):
        ops.sequence_balance_loss(s, idx, alpha=-1.0)
    with pytest.raises(TypeError, match=r"dsmoe\.update_expert_bias: argument 'gamma' must be a float, got str"):
        ops.update_expert_bias(torch.zeros(16), ops.expert_load(idx, 16), "1e-3")
    with pytest.raises(ValueError, match=r"dsmoe\.update_expert_bias: argument 'gamma' must be >= 0"):
        ops.update_expert_bias(torch.zeros(16), ops.expert_load(idx, 16), -1e-3)


def test_index_range_messages_are_uniform():
    """expert_load, sequence_balance_loss, moe_permute and moe_unpermute share one range check and one message."""
    idx = torch.tensor([[0, 5], [-1, 2]], dtype=torch.int32)
    msg = r"argument 'topk_idx': values must be in \[-1, 4\) \(-1 = skipped\), got range \[-1, 5\]"
    with pytest.raises(ValueError, match=r"dsmoe\.expert_load: " + msg):
        ops.expert_load(idx, 4)
    with pytest.raises(ValueError, match=r"dsmoe\.sequence_balance_loss: " + msg):
        ops.sequence_balance_loss(torch.rand(2, 4), idx)
    with pytest.raises(ValueError, match=r"dsmoe\.moe_permute: " + msg):
        ops.moe_permute(torch.randn(2, 8), idx, 4)
    with pytest.raises(ValueError, match=r"dsmoe\.expert_load: argument 'topk_idx': values must be in \[-1, 4\)"):
        ops.expert_load(torch.tensor([-2, 0]), 4)
    y, _, _, rm = ops.moe_permute(torch.randn(2, 8), idx.clamp(max=3), 4, alignment=1)
    with pytest.raises(ValueError, match=r"dsmoe\.moe_unpermute: argument 'row_map': values must be in \[-1, 1\)"):
        ops.moe_unpermute(y[:1], rm, None)
    with pytest.raises(ValueError, match=r"hidden size \(last dim\)=100 must be a multiple of 128 with quantize_fp8=True"):
        ops.moe_permute(torch.randn(2, 100), idx.clamp(max=3), 4, quantize_fp8=True)


def test_route_all_nan_token_is_contained():
    logits = torch.randn(5, 16)
    bias = torch.randn(16) * 0.1
    clean_idx, clean_w = ops.moe_route(logits, bias, top_k=3, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    logits[2] = float("nan")
    idx, w = ops.moe_route(logits, bias, top_k=3, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    # the NaN token: lowest-index experts of the lowest-index groups, NaN weights (documented)
    assert idx[2].tolist() == [0, 1, 2] and torch.isnan(w[2]).all()
    keep = torch.tensor([0, 1, 3, 4])
    assert torch.equal(idx[keep], clean_idx[keep]) and torch.equal(w[keep], clean_w[keep])


# ----------------------------------------------------------------------------- zero sizes
@pytest.mark.parametrize("T,all_skipped", [(0, False), (6, True), (5, False)])
@pytest.mark.parametrize("mode", ["eager", "compile", "compile_fixed"])
def test_zero_tokens_and_zero_rows_forward_backward(T, all_skipped, mode):
    """T = 0 and R = 0 (every topk_idx entry -1) are sizes like any other: forward, backward (input and
    weight gradients), eager and under torch.compile (exact unbacked R and a fixed max_rows)."""
    k, E, H, a = 3, 5, 7, 4
    idx = _rand_topk(T, k, E, 0.2)
    if all_skipped:
        idx.fill_(-1)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    mr = ops.moe_permute_max_rows(T, k, E, a) if mode == "compile_fixed" else None

    def f(x, idx, w):
        xp, m, tpe, rm = ops.moe_permute(x, idx, E, alignment=a, max_rows=mr)
        return ops.moe_unpermute(xp * 1.5 + xp ** 2, rm, w), m, tpe

    g = f if mode == "eager" else torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    y, m, tpe = g(x, idx, w)
    gy = torch.randn(T, H, dtype=torch.float64)
    (y * gy).sum().backward()
    # independent: y[t] = sum_j w[t, j] * (1.5 x + x^2)[t] over the kept slots
    keep = (idx >= 0).double()
    xd = x.detach()
    torch.testing.assert_close(y, (keep * w.detach()).sum(1, keepdim=True) * (1.5 * xd + xd ** 2))
    torch.testing.assert_close(x.grad, (keep * w.detach()).sum(1, keepdim=True) * (1.5 + 2 * xd) * gy)
    torch.testing.assert_close(w.grad, keep * ((1.5 * xd + xd ** 2) * gy).sum(1, keepdim=True))
    assert tpe.tolist() == ops.expert_load(idx, E).tolist()
    if mr is None:
        assert m.shape[0] == (0 if (T == 0 or all_skipped) else m.shape[0])
    assert (m[m >= 0].shape[0]) == int((idx >= 0).sum())


@pytest.mark.parametrize("T", [0, 4])
def test_zero_sizes_other_moe_ops(T):
    """moe_route with T = 0 (eager and compiled), the fused FP8 permute with no token or no kept pair,
    expert_load and sequence_balance_loss on empty inputs, moe_unpermute of an empty y_perm."""
    l = torch.randn(T, 16)
    f = torch.compile(lambda l: ops.moe_route(l, None, top_k=2, n_group=4, topk_group=2, routed_scaling_factor=1.0),
                      fullgraph=True, dynamic=True, backend="aot_eager")
    i1, w1 = f(l)
    i2, w2 = ops.moe_route(l, None, top_k=2, n_group=4, topk_group=2, routed_scaling_factor=1.0)
    assert i1.shape == (T, 2) and torch.equal(i1, i2) and torch.equal(w1, w2)
    idx = torch.full((T, 2), -1, dtype=torch.int32)
    q, s, m, tpe, rm = ops.moe_permute(torch.randn(T, 128), idx, 16, quantize_fp8=True)
    assert q.shape == (0, 128) and s.shape == (0, 1) and m.shape == (0,) and (tpe == 0).all() and (rm == -1).all()
    assert ops.expert_load(idx, 16).tolist() == [0] * 16
    y = ops.moe_unpermute(torch.randn(0, 9), rm, torch.rand(T, 2))
    assert y.shape == (T, 9) and (y == 0).all()
    loss = ops.sequence_balance_loss(torch.rand(T, 16), idx)
    assert loss.item() == 0.0


def test_sequence_balance_loss_degenerate_cases():
    """Scores that all underflow to 0 for a token, k = 0, no sequence: finite, defined values and gradients."""
    S, E, k = 6, 8, 2
    logits = torch.randn(S, E, dtype=torch.float64)
    logits[2] = -800.0  # sigmoid underflows to exactly 0 in fp64 for every expert
    s = logits.sigmoid().requires_grad_(True)
    assert (s[2] == 0).all()
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(S)])
    loss = ops.sequence_balance_loss(s, idx, alpha=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and (s.grad[2] == 0).all()
    # independent: the underflowed token adds nothing to P; f counts every token's picks
    f = torch.zeros(E, dtype=torch.float64)
    for t in range(S):
        for e in idx[t].tolist():
            f[e] += E / (k * S)
    sd = s.detach()
    P = sum(sd[t] / sd[t].sum() for t in range(S) if t != 2) / S
    torch.testing.assert_close(loss.detach(), 0.1 * (f * P).sum())
    # k = 0: no slot routed, loss 0 (and differentiable)
    s0 = torch.rand(2, S, E, requires_grad=True)
    l0 = ops.sequence_balance_loss(s0, torch.empty(2, S, 0, dtype=torch.long))
    l0.backward()
    assert l0.item() == 0.0 and (s0.grad == 0).all()
    # no sequence
    assert ops.sequence_balance_loss(torch.rand(0, S, E), torch.zeros(0, S, k, dtype=torch.long)).item() == 0.0


def test_update_expert_bias_rejects_non_finite_load():
    b = torch.zeros(4)
    for bad in (float("nan"), float("inf")):
        load = torch.tensor([1.0, bad, 2.0, 3.0])
        with pytest.raises(ValueError, match=r"dsmoe\.update_expert_bias: argument 'load' must be finite.*first at expert 1"):
            ops.update_expert_bias(b, load, 0.1)
        assert (b == 0).all()  # nothing applied before the error
    with pytest.raises(TypeError, match="'load'"):
        ops.update_expert_bias(b, torch.ones(4, dtype=torch.bool), 0.1)
    # where values cannot be read back (compiled), the documented fallback: the bias is left unchanged
    f = torch.compile(lambda b, l: ops.update_expert_bias(b, l, 0.1), fullgraph=True, backend="aot_eager")
    f(b, torch.tensor([1.0, float("nan"), 2.0, 3.0]))
    assert (b == 0).all()
    f(b, torch.tensor([1.0, 5.0, 2.0, 4.0]))
    assert b.tolist() == pytest.approx([0.1, -0.1, 0.1, -0.1])
    # integer counts: no check needed, the usual step; an all-zero load is a no-op
    ops.update_expert_bias(b, torch.zeros(4, dtype=torch.int64), 0.1)
    assert b.tolist() == pytest.approx([0.1, -0.1, 0.1, -0.1])
