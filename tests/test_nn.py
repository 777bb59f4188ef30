"""dsmoe.nn: FP8Linear numerics and gradients, grouped FP8 experts, gate/bias balancing, RoPE, RMSNorm."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsmoe import ops
from dsmoe.models import DeepseekV3Config
from dsmoe.nn import FP8Linear, MoE, RMSNorm, fp8_autocast, set_fp8
from dsmoe.nn.rope import apply_rope, yarn_inv_freq
from util import calc_diff, rel_err


def _emulated_fp8_linear(x, w):
    """Independent FP8 forward: quantize with dsmoe.ref-equivalent ops, dequantize, fp64 matmul."""
    K = x.shape[-1]
    pad = (-K) % 128
    xp = F.pad(x.reshape(-1, K), (0, pad))
    wp = F.pad(w, (0, pad, 0, (-w.shape[0]) % 128))
    xq, xs = ops.per_token_group_quant_fp8(xp)
    wq, ws = ops.per_block_quant_fp8(wp)
    xd = ops.per_token_group_dequant_fp8(xq, xs, out_dtype=torch.float32).double()
    wd = ops.per_block_dequant_fp8(wq, ws, out_dtype=torch.float32).double()
    return (xd @ wd.T)[:, : w.shape[0]].reshape(*x.shape[:-1], w.shape[0])


@pytest.mark.parametrize("M,K,N", [(5, 256, 128), (37, 200, 72), (1, 128, 320), (130, 96, 136)])
def test_fp8_linear_forward_is_fp8_product(M, K, N):
    lin = FP8Linear(K, N)
    x = torch.randn(M, K)
    y = lin(x)
    ref = _emulated_fp8_linear(x, lin.weight.detach())
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert rel_err(y, ref) < 1e-5
    exact = x.double() @ lin.weight.detach().double().T
    e = rel_err(y, exact)
    assert 1e-4 < e < 0.06, e   # really FP8 (not exact), within what e4m3 rounding explains


@pytest.mark.parametrize("shape,K,N", [((3, 7), 256, 128), ((50,), 160, 200), ((2, 129), 128, 256)])
def test_fp8_linear_grads_match_bf16_autograd(shape, K, N):
    lin = FP8Linear(K, N)
    x = torch.randn(*shape, K, requires_grad=True)
    g = torch.randn(*shape, N)
    (lin(x) * g).sum().backward()
    dx, dw = x.grad.clone(), lin.weight.grad.clone()
    x.grad = None
    lin.weight.grad = None
    with fp8_autocast(False):
        (lin(x) * g).sum().backward()
    assert rel_err(dx, x.grad) < 0.08 and calc_diff(dx, x.grad) < 2e-3
    assert rel_err(dw, lin.weight.grad) < 0.08 and calc_diff(dw, lin.weight.grad) < 2e-3
    assert not torch.equal(dw, lin.weight.grad)  # the FP8 path really ran
    # Wgrad in FP8 equals the product of the token-dim (1x128 along M) quantized operands
    M = x[..., 0].numel()
    gq, gs = ops.per_token_group_quant_fp8_transposed(F.pad(g.reshape(M, N), (0, (-N) % 128)).contiguous())
    xq, xs = ops.per_token_group_quant_fp8_transposed(F.pad(x.detach().reshape(M, K), (0, (-K) % 128)).contiguous())
    deq = lambda q, s: (q.float().view(q.shape[0], -1, 128) * s.contiguous().unsqueeze(-1)).view(q.shape[0], -1)  # noqa
    ref_dw = (deq(gq, gs).double() @ deq(xq, xs).double().T)[:N, :K]
    assert rel_err(dw, ref_dw) < 1e-5


def _deq_rows(x):
    """deq(quant(x)) with 1x128 groups along the last dim (zero-padded to a multiple of 128), fp64."""
    K = x.shape[-1]
    q, sc = ops.per_token_group_quant_fp8(F.pad(x, (0, (-K) % 128)).contiguous())
    return ops.per_token_group_dequant_fp8(q, sc, out_dtype=torch.float32).double()


def _deq_block(w):
    """deq(quant(W)) with 128x128 blocks (zero-padded), fp64 ``[Np, Kp]``."""
    wp = F.pad(w, (0, (-w.shape[1]) % 128, 0, (-w.shape[0]) % 128))
    q, sc = ops.per_block_quant_fp8(wp.contiguous())
    return ops.per_block_dequant_fp8(q, sc, out_dtype=torch.float32).double()


def _deq_tokens(x):
    """deq(quant(x)) with 1x128 groups along the token dim (rows), returned transposed ``[K, M]``, fp64."""
    q, sc = ops.per_token_group_quant_fp8_transposed(x.contiguous())
    return (q.float().view(q.shape[0], -1, 128) * sc.contiguous().unsqueeze(-1)).view(q.shape[0], -1).double()


@pytest.mark.parametrize("shape,K,N", [((3, 7), 256, 128), ((50,), 160, 200), ((2, 129), 128, 256), ((1,), 96, 72)])
def test_fp8_linear_dgrad_is_the_fp8_product(shape, K, N):
    """Dgrad ``dx = deq(quant(dy)) @ deq(Wq)``: dy quantized 1x128 along N, the forward's 128x128 weight
    blocks reused (transposed) — the exact product, computed here in fp64."""
    lin = FP8Linear(K, N)
    x = torch.randn(*shape, K, requires_grad=True)
    g = torch.randn(*shape, N)
    (lin(x) * g).sum().backward()
    M = x[..., 0].numel()
    gd = _deq_rows(g.reshape(M, N))                              # [M, Np]
    wd = _deq_block(lin.weight.detach())                         # [Np, Kp]
    ref = (gd @ wd)[:, :K].reshape(*shape, K)
    assert rel_err(x.grad, ref) < 1e-5, rel_err(x.grad, ref)


def _grouped_layout(T, k, E, H, starve=()):
    """A contiguous grouped-GEMM layout from random routing (experts in ``starve`` get no token)."""
    from dsmoe.nn.moe import _BLOCK
    live = [e for e in range(E) if e not in starve]
    idx = torch.stack([torch.tensor(live)[torch.randperm(len(live))[:k]] for _ in range(T)]).int()
    x_perm, m_idx, tpe, _ = ops.moe_permute(torch.randn(T, H), idx, E, alignment=_BLOCK)
    gs = ((tpe + _BLOCK - 1) // _BLOCK * _BLOCK).int()
    gs[-1] += x_perm.shape[0] - gs.sum()
    return x_perm, m_idx, gs


@pytest.mark.parametrize("E,T,K,N", [(4, 50, 160, 72), (3, 130, 128, 256), (5, 7, 96, 200)])
def test_grouped_fp8_experts_are_the_per_expert_fp8_products(E, T, K, N):
    """The grouped FP8 expert GEMMs against the exact emulation, per expert, in fp64:
    forward ``y_r = deq(quant(x_r)) @ deq(Wq_e)^T``, Dgrad ``dx_r = deq(quant(dy_r)) @ deq(Wq_e)`` and the
    k-grouped Wgrad ``dW_e = sum_{r in e} deq_tok(dy)_r^T deq_tok(x)_r`` (1x128 groups along tokens, inside
    each 128-aligned expert segment); padding rows (m_indices -1) give 0 and get 0."""
    from dsmoe.nn.moe import _GroupedLinearFn
    x, m_idx, gs = _grouped_layout(T, 2, E, K, starve=(1,))
    x = x.detach().requires_grad_()
    w = (torch.randn(E, N, K) * 0.05).requires_grad_()
    y = _GroupedLinearFn.apply(x, w, m_idx, gs, True)
    gy = torch.randn_like(y)
    y.backward(gy)
    valid = m_idx >= 0
    assert bool((~valid).any()), "the layout should have padding rows"
    y_ref = torch.zeros(x.shape[0], N, dtype=torch.float64)
    dx_ref = torch.zeros(x.shape[0], K, dtype=torch.float64)
    xd, gd = _deq_rows(x.detach()), _deq_rows(gy)                 # per-row groups: rows of one expert only
    gz = torch.where(valid[:, None], gy, 0.0)
    gtd = _deq_tokens(F.pad(gz, (0, (-N) % 128)))                 # [Np, R]
    xtd = _deq_tokens(F.pad(x.detach(), (0, (-K) % 128)))         # [Kp, R]
    dw_ref = torch.zeros(E, N, K, dtype=torch.float64)
    for e in range(E):
        rows = (m_idx == e).nonzero().squeeze(1)
        wd = _deq_block(w.detach()[e])
        y_ref[rows] = (xd[rows] @ wd.T)[:, :N]
        dx_ref[rows] = (gd[rows] @ wd)[:, :K]
        dw_ref[e] = (gtd[:, rows] @ xtd[:, rows].T)[:N, :K]
    assert (y[~valid] == 0).all() and (x.grad[~valid] == 0).all()
    # the m-grouped GEMM writes bf16 (its API, as DeepGEMM's): the exact product, rounded once to bf16
    for got, want in ((y, y_ref), (x.grad, dx_ref)):
        assert ((got.double() - want).abs() <= 2**-8 * want.abs() + 1e-6 * want.abs().max()).all()   # half a bf16 ulp
        assert rel_err(got, want.bfloat16()) < 1e-4, rel_err(got, want.bfloat16())
    assert rel_err(w.grad, dw_ref) < 1e-5, rel_err(w.grad, dw_ref)
    assert (w.grad[1] == 0).all()                                 # the starved expert


def test_fp8_linear_empty_and_switches():
    lin = FP8Linear(128, 128)
    x = torch.randn(0, 128, requires_grad=True)
    y = lin(x)
    assert y.shape == (0, 128)
    y.sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() == 0
    set_fp8(lin, False)
    x = torch.randn(4, 128)
    assert torch.equal(lin(x), F.linear(x, lin.weight))


def test_fp8_serving_weight_matches_dequantized():
    lin = FP8Linear(256, 192)
    wq, ws = ops.per_block_quant_fp8(lin.weight.detach())
    lin.load_fp8(wq, ws)
    assert lin.weight.dtype == torch.float8_e4m3fn and not lin.weight.requires_grad
    x = torch.randn(9, 256)
    wd = ops.per_block_dequant_fp8(wq, ws, out_dtype=torch.float32)
    with fp8_autocast(False):
        assert torch.allclose(lin(x), x @ wd.T, atol=1e-5)
    y = lin(x)                                   # activations quantized too
    assert rel_err(y, x @ wd.T) < 0.05
    with pytest.raises(ValueError, match="weight_scale_inv shape"):
        lin.load_fp8(wq, ws[:, :1])


def test_rmsnorm_hf_semantics():
    n = RMSNorm(48)
    with torch.no_grad():
        n.weight.copy_(torch.randn(48))
    x = torch.randn(3, 5, 48, dtype=torch.bfloat16)
    xf = x.float()
    ref = n.weight.to(torch.bfloat16) * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(n(x), ref)


def test_yarn_frequencies_v3_and_rope_is_a_rotation():
    inv, att = yarn_inv_freq(64, 10000.0, {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    base = 1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64)
    assert att == 1.0
    # high frequencies (first dims) kept, low frequencies divided by the factor
    assert torch.allclose(inv[:5], base[:5]) and torch.allclose(inv[-3:], base[-3:] / 40)
    x = torch.randn(2, 6, 3, 64)
    ang = torch.arange(6).float()[:, None] * inv
    y = apply_rope(x, ang.cos()[None], ang.sin()[None], interleave=True)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    # interleaved form == complex multiplication of pairs (x[2i], x[2i+1]), written de-interleaved
    xc = torch.view_as_complex(x.reshape(2, 6, 3, 32, 2).contiguous())
    zc = xc * torch.polar(torch.ones_like(ang), ang)[None, :, None, :]
    assert torch.allclose(torch.cat([zc.real, zc.imag], -1), y, atol=1e-5)


def _moe_cfg(**kw):
    d = dict(vocab_size=16, hidden_size=128, moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2,
             n_group=2, topk_group=1, n_shared_experts=1, num_hidden_layers=1, first_k_dense_replace=0,
             intermediate_size=64, num_attention_heads=1, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8,
             qk_nope_head_dim=8, v_head_dim=8)
    d.update(kw)
    return DeepseekV3Config(**d)


def _moe_reference(moe: MoE, x):
    """Per-token loop over the selected experts (fp64), independent of permute/grouped GEMM."""
    cfg = moe.cfg
    x2 = x.reshape(-1, x.shape[-1]).double()
    logits = x2 @ moe.gate.weight.double().T
    s = logits.sigmoid()
    c = s + moe.gate.e_score_correction_bias.double()
    G = cfg.n_routed_experts // cfg.n_group
    gs = c.view(-1, cfg.n_group, G).topk(2, -1).values.sum(-1)
    keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gs.topk(cfg.topk_group, -1).indices, True)
    c = c.masked_fill(~keep.repeat_interleave(G, 1), float("-inf"))
    idx = c.topk(cfg.num_experts_per_tok, -1).indices
    w = s.gather(1, idx)
    w = w / w.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    ex = moe.experts
    out = torch.zeros_like(x2)
    for t in range(x2.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            h = F.silu(x2[t] @ ex.gate_proj[e].double().T) * (x2[t] @ ex.up_proj[e].double().T)
            out[t] += w[t, j] * (h @ ex.down_proj[e].double().T)
    sh = moe.shared_experts
    hs = F.silu(x2 @ sh.gate_proj.weight.double().T) * (x2 @ sh.up_proj.weight.double().T)
    return (out + hs @ sh.down_proj.weight.double().T).view(x.shape)


def test_moe_bf16_matches_per_token_reference_and_fp8_is_close():
    moe = MoE(_moe_cfg(), fp8=False).eval()
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.3 - 1.0)   # negative biased scores
    x = torch.randn(3, 11, 128)
    ref = _moe_reference(moe, x)
    assert rel_err(moe(x), ref) < 1e-6
    set_fp8(moe, True)
    y8 = moe(x)
    assert 1e-3 < rel_err(y8, ref) < 0.1 and calc_diff(y8, ref) < 5e-3   # three chained e4m3 GEMMs


def test_moe_fp8_grads_every_param_and_close_to_bf16():
    moe = MoE(_moe_cfg(), fp8=True).train()
    x = torch.randn(2, 70, 128, requires_grad=True)
    g = torch.randn(2, 70, 128)
    ((moe(x) * g).sum() + moe.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    assert all(v is not None and v.abs().sum() > 0 for v in grads.values()), [n for n, v in grads.items() if v is None]
    dx = x.grad.clone()
    moe.zero_grad()
    x.grad = None
    with fp8_autocast(False):
        ((moe(x) * g).sum() + moe.aux_loss).backward()
    for n, p in moe.named_parameters():
        assert calc_diff(grads[n], p.grad) < 5e-3, n
    assert calc_diff(dx, x.grad) < 5e-3


def test_aux_loss_free_bias_moves_load_toward_balance():
    torch.manual_seed(0)
    moe = MoE(_moe_cfg(n_group=1, topk_group=1), fp8=False).train()
    with torch.no_grad():   # skewed router: experts 0 and 1 win for most tokens
        moe.gate.weight.normal_(0, 0.05)
        moe.gate.weight[:2] += 0.03
    x = torch.randn(4, 64, 128) + 1.0
    loads = []
    for _ in range(80):
        with torch.no_grad():
            moe(x)
        loads.append(moe.update_bias(gamma=0.01))

    def imbalance(ls):
        load = torch.stack(ls).float().mean(0)
        return (load.max() / load.mean()).item()
    first, last = imbalance(loads[:1]), imbalance(loads[-10:])
    assert first > 3.0, first
    assert last < 0.5 * first and last < 1.6, (first, last)
    b = moe.gate.e_score_correction_bias
    assert b[:2].max() < b[2:].min()   # the hot experts were pushed down
    assert moe.load.sum() == 0          # reset after each update


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("shape", [(2, 0, 128), (0, 128), (0, 5, 128)])
def test_moe_zero_tokens_forward_backward(fp8, shape):
    """A batch without tokens (a starved rank, an empty microbatch) runs forward and backward."""
    moe = MoE(_moe_cfg(), fp8=fp8).train()
    x = torch.randn(*shape, requires_grad=True)
    y = moe(x)
    assert y.shape == x.shape
    (y.sum() + moe.aux_loss).backward()
    assert x.grad.shape == x.shape
    assert moe.aux_loss.item() == 0.0 and moe.load.sum() == 0
    for n, p in moe.named_parameters():
        assert p.grad is None or (p.grad == 0).all(), n


def test_moe_update_bias_nan_load_raises():
    """A NaN in the accumulated load used to be skipped silently (NaN > 0 is False)."""
    moe = MoE(_moe_cfg(), fp8=False).train()
    moe.load[3] = float("nan")
    with pytest.raises(ValueError, match=r"argument 'load' must be finite"):
        moe.update_bias(0.01)
    assert (moe.gate.e_score_correction_bias == 0).all()


def test_fp8_linear_wrong_width_names_the_layer():
    lin = FP8Linear(256, 128)
    for fp8 in (True, False):
        lin.fp8 = fp8
        with pytest.raises(ValueError, match=r"FP8Linear\(in_features=256, out_features=128\): argument 'x' must "
                                             r"have in_features=256 in its last dim, got shape \(3, 200\)"):
            lin(torch.randn(3, 200))
    with pytest.raises(ValueError, match=r"in_features=256.*got shape \(\)"):
        lin(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"argument 'in_features' must be an int >= 0, got -1"):
        FP8Linear(-1, 128)
    served = FP8Linear(256, 128)
    served.load_fp8(*ops.per_block_quant_fp8(torch.randn(128, 256), (128, 128)))
    with pytest.raises(ValueError, match=r"FP8Linear\(in_features=256, out_features=128\)"):
        served(torch.randn(2, 5, 255))


@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("K,N", [(0, 128), (128, 0), (0, 0), (72, 0)])
def test_fp8_linear_zero_features(fp8, K, N):
    """An empty weight is a product of nothing: zeros out, zero (or empty) gradients, FP8 or not."""
    lin = FP8Linear(K, N, fp8=fp8)
    x = torch.randn(2, 3, K, requires_grad=True)
    y = lin(x)
    assert y.shape == (2, 3, N) and (y == 0).all()
    (y.sum() * 2).backward()
    assert x.grad.shape == x.shape and (x.grad == 0).all()
    assert lin.weight.grad.shape == (N, K)
