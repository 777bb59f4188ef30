"""dsmoe.compat.deep_gemm: DeepGEMM's Python API, called the way DeepGEMM's own tests and the
frameworks' call sites call it (positional and keyword forms, the older names), against fp64 products
of the dequantized operands computed here with plain torch.

Each GEMM test runs on the CPU (references) and, marked gpu, on CUDA (the kernels). Outputs start
NaN-poisoned: rows the op must write lose the NaN, rows it must not write (-1 rows of the contiguous
layout, psum gaps, rows past masked_m, columns outside a strided ``d`` view) keep it.
"""
import random

import pytest
import torch

import dsmoe.compat.deep_gemm as deep_gemm
from dsmoe.compat.deep_gemm.testing import calc_diff, count_bytes, get_arch_major
from dsmoe.compat.deep_gemm.utils import (align, ceil_div, ceil_to_ue8m0, per_block_cast_to_fp8,
                                          per_channel_cast_to_fp8, per_token_cast_to_fp8)
from dsmoe.compat.deep_gemm.utils.layout import get_mn_major_tma_aligned_tensor
from util import DEV, poison, rel_err

DEVICES = ["cpu", pytest.param(DEV, marks=pytest.mark.gpu, id="gpu")]
FP8 = torch.float8_e4m3fn


def f32_tol(device) -> float:
    # CPU references sum fp32 block products (~1e-7 relative); the tensor cores accumulate in ~14 bits
    # before each promotion (see tests/test_gemm_gpu.py).
    return 1e-5 if torch.device(device).type == "cpu" else 5e-4


BF16_TOL = 2e-3  # vs the fp64 product rounded to bf16: only the rare one-step rounding flip remains


# ----------------------------------------------------------------------------- independent dequantization
def deq_rows(q, s, gran=128):
    """1 x gran scales along the last dim: q [..., K], s [..., ceil(K/gran)]."""
    K = q.shape[-1]
    return q.double() * s.double().repeat_interleave(gran, dim=-1)[..., :K]


def deq_blocks(q, s, gran=128):
    """gran x gran scales: q [..., N, K], s [..., ceil(N/gran), ceil(K/gran)]."""
    N, K = q.shape[-2:]
    full = s.double().repeat_interleave(gran, dim=-2)[..., :N, :].repeat_interleave(gran, dim=-1)[..., :K]
    return q.double() * full


def deq_cols(q, s, gran=128):
    """gran x 1 scales down the rows: q [T, MN], s [T/gran, MN]."""
    return q.double() * s.double().repeat_interleave(gran, dim=0)


def check_bf16(d, ref64, device):
    assert not torch.isnan(d).any()
    assert rel_err(d, ref64.to(torch.bfloat16)) < BF16_TOL
    assert calc_diff(d, ref64) < 1e-5


def check_f32(d, ref64, device):
    assert not torch.isnan(d).any()
    assert rel_err(d, ref64) < f32_tol(device)


def quant_a(M, K, device):
    return per_token_cast_to_fp8(torch.randn(M, K, device=device, dtype=torch.bfloat16), use_ue8m0=False)


def quant_w(N, K, device):
    return per_block_cast_to_fp8(torch.randn(N, K, device=device, dtype=torch.bfloat16), use_ue8m0=False)


def mn_major_unpadded(sf):
    """The same scale values laid out with stride 1 along MN and no TMA padding (a [.., kb, mn]
    buffer transposed), as a framework's own quantizer may produce them."""
    t = torch.empty(*sf.shape[:-2], sf.shape[-1], sf.shape[-2], dtype=sf.dtype, device=sf.device).transpose(-1, -2)
    t.copy_(sf)
    assert t.stride(-2) == 1 and torch.equal(t, sf)
    return t


def quant_w_grouped(G, N, K, device):
    pairs = [quant_w(N, K, device) for _ in range(G)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


# ----------------------------------------------------------------------------- dense NT
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M,N,K", [(1, 128, 128), (37, 192, 384), (130, 320, 256), (0, 128, 128),
                                   (5, 100, 200), (64, 7, 130)])
def test_fp8_gemm_nt_bf16(device, M, N, K):
    a, b = quant_a(M, K, device), quant_w(N, K, device)
    ref = deq_rows(*a) @ deq_blocks(*b).t()
    d = poison((M, N), torch.bfloat16, device)
    assert deep_gemm.fp8_gemm_nt(a, b, d) is None  # SGLang: fp8_gemm_nt(lhs, rhs, out)
    check_bf16(d, ref, device)

    # vLLM: its wrapper adds disable_ue8m0_cast; DeepGEMM's tests pass c/recipe by keyword
    d2 = poison((M, N), torch.bfloat16, device)
    deep_gemm.fp8_gemm_nt(a=a, b=b, d=d2, c=None, recipe=None, compiled_dims="nk", disable_ue8m0_cast=True)
    assert torch.equal(d2, d)

    # the first API's name, with the LHS scales pre-transposed as its callers did
    d3 = poison((M, N), torch.bfloat16, device)
    deep_gemm.gemm_fp8_fp8_bf16_nt((a[0], deep_gemm.get_col_major_tma_aligned_tensor(a[1])), b, d3)
    assert torch.equal(d3, d)

    # MN-major scales without TMA padding, and row slices of a wider MN-major scale buffer (SGLang's
    # warmup slices [:m] of buffers quantized for max_m)
    d4 = poison((M, N), torch.bfloat16, device)
    deep_gemm.fp8_gemm_nt((a[0], mn_major_unpadded(a[1])), b, d4)
    assert torch.equal(d4, d)
    wide = get_mn_major_tma_aligned_tensor(torch.cat([a[1], torch.rand(9, a[1].shape[1], device=device)]))
    d5 = poison((M, N), torch.bfloat16, device)
    deep_gemm.fp8_gemm_nt((a[0], wide[:M]), b, d5)
    assert torch.equal(d5, d)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M,N,K", [(33, 192, 256), (128, 100, 384)])
def test_fp8_gemm_nt_fp32_out(device, M, N, K):
    a, b = quant_a(M, K, device), quant_w(N, K, device)
    ref = deq_rows(*a) @ deq_blocks(*b).t()
    d = poison((M, N), torch.float32, device)
    deep_gemm.fp8_gemm_nt(a, b, d, recipe=(1, 128, 128))
    check_f32(d, ref, device)
    d2 = poison((M, N), torch.float32, device)
    deep_gemm.fp8_gemm_nt(a, b, d2, recipe_a=(1, 128), recipe_b=(128, 128))
    assert torch.equal(d2, d)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M,N,K", [(96, 256, 384), (3, 100, 256)])
def test_fp8_gemm_nt_wgrad_recipe_accumulates_c(device, M, N, K):
    """DeepGEMM's Hopper wgrad case: recipe (1, 1, 128) (1x128 scales on b too), fp32 d, c = d."""
    a = quant_a(M, K, device)
    b = per_token_cast_to_fp8(torch.randn(N, K, device=device, dtype=torch.bfloat16), use_ue8m0=False)
    c0 = torch.randn(M, N, device=device) * 32
    ref = deq_rows(*a) @ deq_rows(*b).t() + c0.double()
    d = c0.clone()
    deep_gemm.fp8_gemm_nt(a, b, d, c=d, disable_ue8m0_cast=True, recipe=(1, 1, 128))
    check_f32(d, ref, device)

    # c a separate tensor: d is overwritten with c + a @ b^T, c is left alone
    c = c0.clone()
    d2 = poison((M, N), torch.float32, device)
    deep_gemm.fp8_gemm_nt(a, b, d2, c, (1, 1, 128))
    check_f32(d2, ref, device)
    assert torch.equal(c, c0)

    # recipe_a/recipe_b form of the same recipe; no c: plain write
    d3 = poison((M, N), torch.float32, device)
    deep_gemm.fp8_gemm_nt(a, b, d3, recipe_a=(1, 128), recipe_b=(1, 128))
    check_f32(d3, deq_rows(*a) @ deq_rows(*b).t(), device)

    # the first API's wgrad name: out += lhs @ rhs^T, scales given transposed as its k-grouped callers did
    d4 = c0.clone()
    deep_gemm.wgrad_gemm_fp8_fp8_fp32_nt((a[0], a[1].t().contiguous()), b, d4)
    check_f32(d4, ref, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm_nt_c_with_block_recipe(device, out_dtype):
    M, N, K = 50, 192, 256
    a, b = quant_a(M, K, device), quant_w(N, K, device)
    c = (torch.randn(M, N, device=device) * 8).to(out_dtype)
    ref = deq_rows(*a) @ deq_blocks(*b).t() + c.double()
    d = poison((M, N), out_dtype, device)
    deep_gemm.fp8_gemm_nt(a, b, d, c=c)
    (check_f32 if out_dtype == torch.float32 else check_bf16)(d, ref, device)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_gemm_nt_k_zero_and_operand_views(device):
    M, N = 9, 64
    a = (torch.empty(M, 0, dtype=FP8, device=device), torch.empty(M, 0, device=device))
    b = (torch.empty(N, 0, dtype=FP8, device=device), torch.empty(1, 0, device=device))
    d = poison((M, N), torch.float32, device)
    deep_gemm.fp8_gemm_nt(a, b, d)
    assert torch.equal(d, torch.zeros_like(d))
    c = torch.randn(M, N, device=device)
    deep_gemm.fp8_gemm_nt(a, b, d, c=c)
    assert torch.equal(d, c)

    # K-major operands with padded rows (a slice of a wider buffer), as DeepGEMM allows
    K = 256
    xa, sa = quant_a(M, K + 128, device)
    a = (xa[:, :K], sa[:, :2])
    bq = quant_w(N, K, device)
    ref = deq_rows(a[0], a[1]) @ deq_blocks(*bq).t()
    d = poison((M, N), torch.bfloat16, device)
    deep_gemm.fp8_gemm_nt(a, bq, d)
    check_bf16(d, ref, device)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_gemm_nt_writes_into_strided_d_view(device):
    """d may be a column slice of a wider buffer (N-major, padded rows): only its elements change."""
    M, N, K = 40, 192, 256
    a, b = quant_a(M, K, device), quant_w(N, K, device)
    ref = deq_rows(*a) @ deq_blocks(*b).t()
    for dtype in (torch.bfloat16, torch.float32):
        big = poison((M, N + 64), dtype, device)
        d = big[:, 32:32 + N]
        assert not d.is_contiguous() and d.stride(-1) == 1
        deep_gemm.fp8_gemm_nt(a, b, d)
        (check_f32 if dtype == torch.float32 else check_bf16)(d, ref, device)
        assert torch.isnan(big[:, :32]).all() and torch.isnan(big[:, 32 + N:]).all()
    # the wgrad recipe accumulating into a strided view
    b1 = per_token_cast_to_fp8(torch.randn(N, K, device=device), use_ue8m0=False)
    big = torch.randn(M, N + 64, device=device)
    before = big.clone()
    d = big[:, 64:]
    deep_gemm.fp8_gemm_nt(a, b1, d, c=d, recipe=(1, 1, 128))
    check_f32(d, deq_rows(*a) @ deq_rows(*b1).t() + before[:, 64:].double(), device)
    assert torch.equal(big[:, :64], before[:, :64])


# ----------------------------------------------------------------------------- M-grouped contiguous
def make_contiguous(G, N, K, device, expected_m=100, zero_group=True):
    """Groups of random sizes (one possibly empty), each padded to 128 rows with -1 rows, and a
    trailing all -1 block (frameworks size the buffer for the worst case)."""
    ms = [max(0, int(expected_m * random.uniform(0.3, 1.7))) for _ in range(G)]
    if zero_group and G > 1:
        ms[random.randrange(G)] = 0
    aligned = [align(m, 128) for m in ms]
    M = sum(aligned) + 128
    idx = torch.full((M,), -1, dtype=torch.int32)
    start = 0
    for g, (m, am) in enumerate(zip(ms, aligned)):
        idx[start:start + m] = g
        start += am
    a = quant_a(M, K, device)
    b = quant_w_grouped(G, N, K, device)
    return a, b, idx.to(device), M


def deepgemm_block_rows(idx):
    """The group each row is computed with by DeepGEMM's Hopper contiguous kernels (128-row blocks, the
    group read from the block's first row, blocks starting with -1 skipped): -1 where not written."""
    eff = idx.cpu().tolist()
    for s in range(0, len(eff), 128):
        if eff[s] >= 0:
            eff[s:s + 128] = [eff[s] if v < 0 else v for v in eff[s:s + 128]]
    return torch.tensor(eff, dtype=torch.int32, device=idx.device)


def contiguous_ref(a, b, idx):
    A = deq_rows(*a)
    B = deq_blocks(*b)
    ref = torch.zeros(A.shape[0], B.shape[1], dtype=torch.float64, device=A.device)
    for g in range(B.shape[0]):
        rows = (idx == g).nonzero().squeeze(1)
        ref[rows] = A[rows] @ B[g].t()
    return ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("G,N,K", [(4, 192, 256), (3, 100, 200)])
def test_m_grouped_contiguous(device, G, N, K):
    random.seed(torch.initial_seed())
    a, b, idx, M = make_contiguous(G, N, K, device)
    rows = deepgemm_block_rows(idx)
    ref = contiguous_ref(a, b, rows)
    valid = rows >= 0
    assert (idx[valid] < 0).any() and not valid[-128:].any()  # padding rows computed, last block skipped
    d = poison((M, N), torch.bfloat16, device)
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, idx)  # SGLang / vLLM: positional m_indices
    check_bf16(d[valid], ref[valid], device)
    assert torch.isnan(d[~valid]).all()  # blocks starting with -1 are not written

    d2 = poison((M, N), torch.bfloat16, device)
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d2, grouped_layout=idx, disable_ue8m0_cast=True,
                                               use_psum_layout=False, recipe=None)
    d3 = poison((M, N), torch.bfloat16, device)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a, b, d3, m_indices=idx)
    assert torch.equal(d2[valid], d[valid]) and torch.equal(d3[valid], d[valid])
    assert torch.isnan(d2[~valid]).all() and torch.isnan(d3[~valid]).all()

    # scales as SGLang's and vLLM's quantizers hand them over: MN-major (column-major, TMA-aligned)
    for sf in (get_mn_major_tma_aligned_tensor(a[1]), mn_major_unpadded(a[1])):
        d4 = poison((M, N), torch.bfloat16, device)
        deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a[0], sf), b, d4, idx)
        assert torch.equal(d4[valid], d[valid]) and torch.isnan(d4[~valid]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_m_grouped_contiguous_psum_layout(device):
    """grouped_layout [G] of cumulative row ends; group g starts at the previous end rounded up to 128."""
    G, N, K = 3, 128, 256
    ms = [70, 0, 150]
    ends, start = [], 0
    for m in ms:
        ends.append(start + m)
        start = align(start + m, 128)
    M = start + 128  # a trailing block no group reaches
    a = quant_a(M, K, device)
    b = quant_w_grouped(G, N, K, device)
    idx = torch.full((M,), -1, dtype=torch.int32)
    s = 0
    for g, e in enumerate(ends):
        idx[s:e] = g
        s = align(e, 128)
    rows = deepgemm_block_rows(idx).to(device)
    ref = contiguous_ref(a, b, rows)
    valid = rows >= 0
    assert valid[:start].all() and not valid[start:].any()
    d = poison((M, N), torch.bfloat16, device)
    psum = torch.tensor(ends, dtype=torch.int32, device=device)
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, psum, use_psum_layout=True, expected_m_for_psum_layout=100)
    check_bf16(d[valid], ref[valid], device)
    assert torch.isnan(d[~valid]).all()

    d2 = poison((M, N), torch.bfloat16, device)
    for bad in ([70, 100, 300], [70, 128, M + 1]):
        with pytest.raises(ValueError, match=r"'grouped_layout' \(psum layout\) entry"):
            deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d2, torch.tensor(bad, dtype=torch.int32, device=device),
                                                       use_psum_layout=True)
    assert torch.isnan(d2).all()


@pytest.mark.parametrize("device", DEVICES)
def test_m_grouped_contiguous_empty_m(device):
    a = (torch.empty(0, 256, dtype=FP8, device=device), torch.empty(0, 2, device=device))
    b = quant_w_grouped(2, 128, 256, device)
    d = torch.empty(0, 128, dtype=torch.bfloat16, device=device)
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, torch.empty(0, dtype=torch.int32, device=device))


# ----------------------------------------------------------------------------- M-grouped masked
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("G,M_max,N,K", [(4, 70, 192, 256), (3, 128, 100, 384)])
def test_m_grouped_masked(device, G, M_max, N, K):
    x = torch.randn(G, M_max, K, device=device, dtype=torch.bfloat16)
    qa = [per_token_cast_to_fp8(x[g], use_ue8m0=False) for g in range(G)]
    a = (torch.stack([q for q, _ in qa]), torch.stack([s for _, s in qa]))
    b = quant_w_grouped(G, N, K, device)
    masked = torch.randint(0, M_max + 1, (G,), dtype=torch.int32)
    masked[0], masked[-1] = 0, M_max
    masked_m = masked.to(device)
    ref = torch.einsum("gmk,gnk->gmn", deq_rows(*a), deq_blocks(*b))
    expected_m = max(1, int(masked.float().mean()))

    outs = []
    for call in (
        lambda d: deep_gemm.fp8_m_grouped_gemm_nt_masked(a, b, d, masked_m, expected_m),  # SGLang / vLLM
        lambda d: deep_gemm.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, expected_m, disable_ue8m0_cast=True,
                                                         recipe=(1, 128, 128)),  # DeepGEMM's tests
        lambda d: deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(a, b, d, masked_m, expected_m),  # first API
        # DeepEP's low-latency dispatch hands the scales over per expert column-major ([G, kb, M_max]
        # transposed, M_max not padded); SGLang re-lays them with get_mn_major_tma_aligned_tensor
        lambda d: deep_gemm.fp8_m_grouped_gemm_nt_masked((a[0], mn_major_unpadded(a[1])), b, d, masked_m, expected_m),
        lambda d: deep_gemm.fp8_m_grouped_gemm_nt_masked((a[0], get_mn_major_tma_aligned_tensor(a[1])), b, d,
                                                         masked_m, expected_m),
    ):
        d = poison((G, M_max, N), torch.bfloat16, device)
        call(d)
        for g in range(G):
            m = int(masked[g])
            if m:
                check_bf16(d[g, :m], ref[g, :m], device)
            assert torch.isnan(d[g, m:]).all()
        outs.append(d)
    assert all(torch.equal(torch.nan_to_num(o), torch.nan_to_num(outs[0])) for o in outs)


# ----------------------------------------------------------------------------- K-grouped (weight gradients)
def make_k_grouped(G, M, N, device, expected_k=256):
    ks = [align(max(1, int(expected_k * random.uniform(0.5, 1.5))), 128) for _ in range(G)]
    if G > 1:
        ks[random.randrange(G)] = 0
    T = sum(ks)
    x = torch.randn(T, M, device=device, dtype=torch.bfloat16)
    y = torch.randn(T, N, device=device, dtype=torch.bfloat16)
    a = per_channel_cast_to_fp8(x, use_ue8m0=False) if T else (torch.empty(0, M, dtype=FP8, device=device),
                                                              torch.empty(0, M, device=device))
    b = per_channel_cast_to_fp8(y, use_ue8m0=False) if T else (torch.empty(0, N, dtype=FP8, device=device),
                                                              torch.empty(0, N, device=device))
    A, B = deq_cols(*a), deq_cols(*b)
    prod = torch.zeros(G, M, N, dtype=torch.float64, device=device)
    s = 0
    for g, k in enumerate(ks):
        prod[g] = A[s:s + k].t() @ B[s:s + k]
        s += k
    return ks, a, b, prod


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("G,M,N", [(4, 40, 128), (3, 64, 96)])
def test_k_grouped_tn_contiguous(device, G, M, N):
    random.seed(torch.initial_seed())
    ks, a, b, prod = make_k_grouped(G, M, N, device)
    layout = torch.tensor(ks, dtype=torch.int32, device=device)
    c0 = torch.randn(G, M, N, device=device) * 32
    d = c0.clone()
    # DeepGEMM's test: k_grouped(a, b, d, ks_cpu, grouped_layout, c, recipe=..., use_psum_layout=False), c is d
    deep_gemm.k_grouped_fp8_gemm_tn_contiguous(a, b, d, ks, layout, d, recipe=(1, 1, 128), use_psum_layout=False)
    check_f32(d, prod + c0.double(), device)

    # the older keyword names; c separate; c None writes the product
    d2 = poison((G, M, N), torch.float32, device)
    deep_gemm.k_grouped_fp8_gemm_tn_contiguous(a, b, d2, ks=ks, ks_tensor=layout, c=c0)
    check_f32(d2, prod + c0.double(), device)
    d3 = poison((G, M, N), torch.float32, device)
    deep_gemm.k_grouped_fp8_gemm_tn_contiguous(a, b, d3, ks, layout)
    check_f32(d3, prod, device)


@pytest.mark.parametrize("device", DEVICES)
def test_k_grouped_nt_contiguous_hopper_layout(device):
    """DeepGEMM's Hopper K-grouped layout: each group's [M, k] K-major block flattened one after
    another; scales [M, sum_k / 128]. Also the first API's k_grouped_wgrad name (same flat layout,
    scales [sum_k / 128, M], accumulating)."""
    random.seed(torch.initial_seed())
    G, M, N = 3, 48, 128
    ks, a, b, prod = make_k_grouped(G, M, N, device)

    def flatten(q):
        parts, s = [], 0
        for k in ks:
            parts.append(q[s:s + k].t().reshape(-1))
            s += k
        return torch.cat(parts)

    fa, fb = flatten(a[0]), flatten(b[0])
    layout = torch.tensor(ks, dtype=torch.int32, device=device)
    c0 = torch.randn(G, M, N, device=device)
    d = c0.clone()
    deep_gemm.k_grouped_fp8_gemm_nt_contiguous((fa, a[1].t()), (fb, b[1].t()), d, ks, layout, d, recipe=(1, 1, 128))
    check_f32(d, prod + c0.double(), device)

    d2 = c0.clone()
    deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt((fa, a[1]), (fb, b[1]), d2, ks)
    check_f32(d2, prod + c0.double(), device)


@pytest.mark.parametrize("device", DEVICES)
def test_k_grouped_all_empty_groups(device):
    G, M, N = 2, 16, 64
    a = (torch.empty(0, M, dtype=FP8, device=device), torch.empty(0, M, device=device))
    b = (torch.empty(0, N, dtype=FP8, device=device), torch.empty(0, N, device=device))
    layout = torch.zeros(G, dtype=torch.int32, device=device)
    c = torch.randn(G, M, N, device=device)
    d = poison((G, M, N), torch.float32, device)
    deep_gemm.k_grouped_fp8_gemm_tn_contiguous(a, b, d, [0, 0], layout, c)
    assert torch.equal(d, c)
    deep_gemm.k_grouped_fp8_gemm_tn_contiguous(a, b, d, [0, 0], layout)
    assert torch.equal(d, torch.zeros_like(d))


# ----------------------------------------------------------------------------- what is not implemented
def test_unsupported_raise_not_implemented():
    M, N, K = 8, 128, 256
    a, b = quant_a(M, K, "cpu"), quant_w(N, K, "cpu")
    d = poison((M, N), torch.bfloat16, "cpu")
    with pytest.raises(NotImplementedError, match=r"recipe=\(1, 1, 32\).*\(1, 128, 128\)"):
        deep_gemm.fp8_gemm_nt(a, b, d, recipe=(1, 1, 32))
    with pytest.raises(NotImplementedError, match="recipe_a"):
        deep_gemm.fp8_gemm_nt(a, b, d, recipe_a=(1, 32), recipe_b=(1, 32))
    with pytest.raises(NotImplementedError, match="UE8M0"):
        deep_gemm.fp8_gemm_nt((a[0], a[1].view(torch.int32)), b, d)
    with pytest.raises(NotImplementedError, match="FP4"):
        deep_gemm.fp8_gemm_nt((torch.zeros(M, K // 2, dtype=torch.int8), a[1]), b, d)
    with pytest.raises(NotImplementedError, match="MN-major"):
        deep_gemm.fp8_gemm_nt((a[0].t().contiguous().t(), a[1]), b, d)
    with pytest.raises(NotImplementedError, match="K-major"):  # b given [K, N] row-major: N-major after the swap
        deep_gemm.fp8_gemm_nn(a, (b[0].t().contiguous(), b[1].t().contiguous()), d)
    # an NN call whose transposed view is K-major works
    dn = poison((M, N), torch.bfloat16, "cpu")
    deep_gemm.fp8_gemm_nn(a, (b[0].t(), b[1].t()), dn)
    check_bf16(dn, deq_rows(*a) @ deq_blocks(*b).t(), "cpu")

    G = 2
    bg = quant_w_grouped(G, N, K, "cpu")
    idx = torch.zeros(128, dtype=torch.int32)
    ag = quant_a(128, K, "cpu")
    dg = poison((128, N), torch.bfloat16, "cpu")
    with pytest.raises(NotImplementedError, match="M-grouped"):
        deep_gemm.m_grouped_fp8_gemm_nt_contiguous(ag, bg, dg, idx, recipe=(1, 1, 128))
    with pytest.raises(NotImplementedError, match="overlap"):
        deep_gemm.fp8_m_grouped_gemm_nt_masked((ag[0].view(1, 128, K).expand(G, 128, K).contiguous(),
                                                ag[1].expand(G, 128, 2).contiguous()), bg,
                                               poison((G, 128, N), torch.bfloat16, "cpu"),
                                               torch.zeros(G, dtype=torch.int32), 1, enable_overlap=True)
    dk = torch.zeros(1, 8, 64)
    ak = (torch.zeros(128, 8, dtype=FP8), torch.ones(1, 8))
    bk = (torch.zeros(128, 64, dtype=FP8), torch.ones(1, 64))
    lay = torch.tensor([128], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="psum"):
        deep_gemm.k_grouped_fp8_gemm_tn_contiguous(ak, bk, dk, [128], lay, use_psum_layout=True)
    with pytest.raises(NotImplementedError, match=r"\(1, 1, 128\)"):
        deep_gemm.k_grouped_fp8_gemm_tn_contiguous(ak, bk, dk, [128], lay, recipe=(1, 1, 32))
    with pytest.raises(NotImplementedError, match="128"):
        deep_gemm.set_mk_alignment_for_contiguous_layout(64)
    deep_gemm.set_mk_alignment_for_contiguous_layout(128)
    with pytest.raises(NotImplementedError, match=r"\(1, 32\)"):
        deep_gemm.transform_sf_into_required_layout(torch.ones(N, K // 32), N, K, (1, 32))
    assert torch.equal(d.isnan(), torch.ones_like(d, dtype=torch.bool))  # nothing ran


# ----------------------------------------------------------------------------- bad arguments
def _raises(exc, match, fn, *args, **kw):
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kw)
    assert isinstance(info.value, RuntimeError)  # what DeepGEMM raises for a failed host check
    return info.value


def test_bad_arguments_name_the_argument_before_running():
    M, N, K = 8, 128, 256
    a, b = quant_a(M, K, "cpu"), quant_w(N, K, "cpu")
    d = poison((M, N), torch.bfloat16, "cpu")
    f = deep_gemm.fp8_gemm_nt
    _raises(TypeError, r"'d' must have dtype bfloat16 or float32, got float16", f, a, b,
            torch.empty(M, N, dtype=torch.float16))
    _raises(ValueError, r"'d' must have shape \(8, 128\), got \(8, 64\)", f, a, b, d[:, :64].contiguous())
    _raises(ValueError, r"'d' must be N-major", f, a, b, torch.empty(N, M, dtype=torch.bfloat16).t())
    _raises(ValueError, r"'a\[1\]' \(scaling factors\) must have shape \(8, 2\), got \(8, 1\)", f, (a[0], a[1][:, :1]), b, d)
    _raises(ValueError, r"'b\[1\]' \(scaling factors\) must have shape \(128, 2\)", f, a, b, d, recipe=(1, 1, 128))
    _raises(ValueError, r"'b\[0\]' must have K=256", f, a, (b[0][:, :128].contiguous(), b[1]), d)
    _raises(TypeError, r"'a\[0\]' must have dtype float8_e4m3fn, got bfloat16", f, (a[0].bfloat16(), a[1]), b, d)
    _raises(TypeError, r"'b\[1\]' must have dtype float32", f, a, (b[0], b[1].double()), d)
    _raises(TypeError, r"'a' must be a pair", f, a[0], b, d)
    _raises(ValueError, r"'c' must have shape", f, a, b, torch.zeros(M, N), c=torch.zeros(M, 64))
    _raises(TypeError, r"'c' must have dtype float32", f, a, b, torch.zeros(M, N), c=torch.zeros(M, N, dtype=torch.bfloat16))
    _raises(ValueError, r"'recipe' must be None when", f, a, b, d, recipe=(1, 128, 128), recipe_a=(1, 128), recipe_b=(128, 128))
    _raises(TypeError, r"'compiled_dims' must be a str", f, a, b, d, compiled_dims=3)
    assert torch.isnan(d).all()

    G = 2
    bg = quant_w_grouped(G, N, K, "cpu")
    ag = quant_a(128, K, "cpu")
    dg = poison((128, N), torch.bfloat16, "cpu")
    idx = torch.zeros(128, dtype=torch.int32)
    g = deep_gemm.m_grouped_fp8_gemm_nt_contiguous
    _raises(TypeError, r"'grouped_layout' must have dtype int32, got int64", g, ag, bg, dg, idx.long())
    _raises(ValueError, r"'grouped_layout' must have shape \(128,\), got \(64,\)", g, ag, bg, dg, idx[:64])
    _raises(TypeError, r"'d' must have dtype bfloat16, got float32", g, ag, bg, torch.empty(128, N), idx)
    _raises(ValueError, r"'b\[1\]' \(scaling factors\) must have shape \(2, 1, 2\)", g, ag, (bg[0], bg[1][:1]), dg, idx)
    _raises(ValueError, r"values must be in \[-1, 2\)", g, ag, bg, dg, torch.full((128,), 5, dtype=torch.int32))
    _raises(ValueError, r"older name", g, ag, bg, dg, idx, m_indices=idx)
    mixed = torch.cat([torch.zeros(64, dtype=torch.int32), torch.full((32,), -1, dtype=torch.int32),
                       torch.ones(32, dtype=torch.int32)])
    _raises(ValueError, r"'grouped_layout'.*one group", g, ag, bg, dg, mixed)  # two groups in one 128-row block
    _raises(ValueError, r"'grouped_layout'.*one group", g, ag, bg, dg, mixed.flip(0).contiguous())  # group after -1
    with pytest.raises(TypeError, match="missing required argument 'grouped_layout'"):
        g(ag, bg, dg)
    assert torch.isnan(dg).all()

    am = (ag[0].view(1, 128, K).expand(G, 128, K).contiguous(), ag[1].expand(G, 128, 2).contiguous())
    dm = poison((G, 128, N), torch.bfloat16, "cpu")
    mm = deep_gemm.m_grouped_fp8_gemm_nt_masked
    _raises(ValueError, r"'masked_m' must have shape \(2,\), got \(3,\)", mm, am, bg, dm, torch.zeros(3, dtype=torch.int32), 4)
    _raises(TypeError, r"'expected_m' must be an int", mm, am, bg, dm, torch.zeros(G, dtype=torch.int32), 4.5)
    _raises(ValueError, r"'d' must be contiguous", mm, am, bg, dm.transpose(0, 1).contiguous().transpose(0, 1),
            torch.zeros(G, dtype=torch.int32), 4)
    _raises(ValueError, r"'masked_m'.*values must be in \[0, M_max=128\]", mm, am, bg, dm,
            torch.tensor([1, 129], dtype=torch.int32), 4)
    assert torch.isnan(dm).all()

    k = deep_gemm.k_grouped_fp8_gemm_tn_contiguous
    dk = torch.zeros(2, 8, 64)
    ak = (torch.zeros(256, 8, dtype=FP8), torch.ones(2, 8))
    bk = (torch.zeros(256, 64, dtype=FP8), torch.ones(2, 64))
    lay = torch.tensor([128, 128], dtype=torch.int32)
    _raises(ValueError, r"'ks_cpu' each group's K must be a multiple of 128.*got 100", k, ak, bk, dk, [100, 156], lay)
    _raises(ValueError, r"'ks_cpu' must have one entry per group of 'd' \(2\), got 1", k, ak, bk, dk, [256], lay[:1])
    _raises(ValueError, r"'a\[0\]' must have shape \(384, 8\)", k, ak, bk, dk, [128, 256],
            torch.tensor([128, 256], dtype=torch.int32))
    _raises(ValueError, r"'ks_cpu' \(the K of each group", k, ak, bk, dk, None, lay)
    _raises(ValueError, r"'d' must be contiguous", k, ak, bk, torch.zeros(2, 64, 8).transpose(1, 2), [128, 128], lay)


# ----------------------------------------------------------------------------- layout helpers and runtime settings
def test_layout_helpers():
    assert deep_gemm.get_tma_aligned_size(13, 4) == 16 and deep_gemm.get_tma_aligned_size(16, 4) == 16
    assert deep_gemm.get_tma_aligned_size(3, 2) == 8 and deep_gemm.get_tma_aligned_size(0, 4) == 0
    with pytest.raises(ValueError, match="'element_size' must divide 16"):
        deep_gemm.get_tma_aligned_size(8, 3)
    assert deep_gemm.ceil_div(257, 128) == 3 and deep_gemm.align(257, 128) == 384
    for f in (deep_gemm.get_mk_alignment_for_contiguous_layout, deep_gemm.get_m_alignment_for_contiguous_layout,
              deep_gemm.get_k_alignment_for_contiguous_layout, deep_gemm.get_theoretical_mk_alignment_for_contiguous_layout):
        assert f() == 128
    assert get_arch_major() == 9

    for shape in ((13, 3), (3, 7, 2), (16, 1)):
        sf = torch.randn(*shape)
        t = get_mn_major_tma_aligned_tensor(sf)
        mn, k = shape[-2:]
        amn = align(mn, 4)
        assert torch.equal(t, sf) and t.shape == sf.shape
        assert t.stride()[-2:] == (1, amn)
        if len(shape) == 3:
            assert t.stride(0) == amn * k
        assert get_mn_major_tma_aligned_tensor(t) is t  # already laid out: no copy
        assert deep_gemm.get_col_major_tma_aligned_tensor(t) is t
    with pytest.raises(TypeError, match="'sf' must have dtype float32"):
        get_mn_major_tma_aligned_tensor(torch.ones(4, 2, dtype=torch.bfloat16))

    tr = deep_gemm.transform_sf_into_required_layout
    sfa = torch.randn(3, 37, 2)
    t = tr(sfa, 37, 256, (1, 128, 128), num_groups=3, is_sfa=True)
    assert torch.equal(t, sfa) and t.stride() == (40 * 2, 1, 40)
    assert tr(sfa[0], 37, 200, (1, 128)).stride() == (1, 40)
    sfb = torch.randn(2, 3, 2)
    assert tr(sfb, 300, 256, (1, 128, 128), 2, False) is sfb
    # vLLM's weight preparation: all keywords, its wrapper adding disable_ue8m0_cast
    assert tr(sf=sfb, mn=300, k=256, recipe=(1, 128, 128), num_groups=2, is_sfa=False, disable_ue8m0_cast=True) is sfb
    sfb_t = torch.randn(2, 2, 3).transpose(1, 2)
    assert tr(sfb_t, 300, 256, (128, 128), num_groups=2) is sfb_t
    with pytest.raises(ValueError, match="contiguous after transposing"):
        tr(torch.randn(3, 4)[:, ::2], 300, 256, (128, 128))
    with pytest.raises(ValueError, match=r"'sf' must have shape \(3, 2\)"):
        tr(torch.randn(3, 3), 300, 256, (128, 128))
    with pytest.raises(ValueError, match="'is_sfa' is required"):
        tr(sfb[0], 300, 256, (1, 128, 128))
    with pytest.raises(NotImplementedError, match="UE8M0"):
        tr(torch.ones(37, 1, dtype=torch.int32), 37, 256, (1, 128))


@pytest.fixture
def restore_num_sms():
    yield
    deep_gemm.set_num_sms(0)


def test_num_sms(restore_num_sms):
    base = deep_gemm.get_num_sms()
    assert base == (torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 0)
    deep_gemm.set_num_sms(2)
    assert deep_gemm.get_num_sms() == 2
    # SGLang's context manager: save, set, restore
    orig = deep_gemm.get_num_sms()
    deep_gemm.set_num_sms(1)
    deep_gemm.set_num_sms(orig)
    assert deep_gemm.get_num_sms() == 2
    deep_gemm.set_num_sms(0)
    assert deep_gemm.get_num_sms() == base
    with pytest.raises(ValueError, match="'new_num_sms' must be >= 0"):
        deep_gemm.set_num_sms(-1)
    with pytest.raises(TypeError, match="'new_num_sms' must be an int"):
        deep_gemm.set_num_sms(2.0)


@pytest.mark.gpu
@pytest.mark.cuda_only
def test_num_sms_caps_the_launch(restore_num_sms):
    import dsmoe.ops.gemm as gemm_ops
    total = torch.cuda.get_device_properties(0).multi_processor_count
    with pytest.raises(ValueError, match="at most the device's"):
        deep_gemm.set_num_sms(total + 1)
    deep_gemm.set_num_sms(8)
    assert gemm_ops._cfg("contiguous", 4096, 4096, 4096, torch.device("cuda")).num_ctas == 8
    M, N, K = 256, 512, 512
    a, b = quant_a(M, K, "cuda"), quant_w(N, K, "cuda")
    d = poison((M, N), torch.bfloat16, "cuda")
    deep_gemm.fp8_gemm_nt(a, b, d)
    check_bf16(d, deq_rows(*a) @ deq_blocks(*b).t(), "cuda")


# ----------------------------------------------------------------------------- cast helpers
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_cast_helpers(device, use_ue8m0):
    x = torch.randn(37, 200, device=device) * torch.logspace(-2, 2, 200, device=device)
    q, s = per_token_cast_to_fp8(x, use_ue8m0=use_ue8m0)
    xp = torch.nn.functional.pad(x, (0, 56))
    amax = xp.view(37, 2, 128).abs().amax(-1).clamp(min=1e-4)
    want = ceil_to_ue8m0(amax / 448) if use_ue8m0 else amax / 448
    assert q.shape == (37, 200) and q.dtype == FP8 and s.shape == (37, 2)
    assert q.is_contiguous() and s.is_contiguous()  # as the original returns them
    if device == "cpu":  # the documented values, e4m3(x / scale) (IEEE division: no CPU dependence)
        want_q = (xp.view(37, 2, 128) / s.unsqueeze(-1)).to(FP8).view(37, 256)[:, :200]
        assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(s, want)
    assert (deq_rows(q, s) - x.double()).abs().le(s.double().repeat_interleave(128, -1)[:, :200] * 16 + 1e-30).all()
    assert rel_err(deq_rows(q, s), x) < 0.05

    qb, sb = per_block_cast_to_fp8(x, use_ue8m0=use_ue8m0)
    xb = torch.nn.functional.pad(x, (0, 56, 0, 91)).view(1, 128, 2, 128)
    bmax = xb.abs().amax(dim=(1, 3)).clamp(min=1e-4).view(1, 2)
    assert torch.equal(sb, ceil_to_ue8m0(bmax / 448) if use_ue8m0 else bmax / 448)
    assert rel_err(deq_blocks(qb, sb), x) < 0.05
    assert qb.shape == x.shape and qb.is_contiguous() and sb.shape == (1, 2)

    y = torch.randn(256, 37, device=device)
    qc, sc = per_channel_cast_to_fp8(y, use_ue8m0=use_ue8m0)
    cmax = y.view(2, 128, 37).abs().amax(1).clamp(min=1e-4)
    assert qc.shape == y.shape and torch.equal(sc, ceil_to_ue8m0(cmax / 448) if use_ue8m0 else cmax / 448)
    assert rel_err(deq_cols(qc, sc), y) < 0.05

    if use_ue8m0:
        _, packed = per_token_cast_to_fp8(x, use_ue8m0=True, use_packed_ue8m0=True)
        assert packed.dtype == torch.int32 and packed.shape == (37, 1)
        exps = packed.view(torch.uint8).view(37, 4)[:, :2].int()
        assert torch.equal(exps, (s.view(torch.int32) >> 23))


def test_ceil_to_ue8m0_is_the_next_power_of_two():
    # independent of the bit manipulation: 2 ** ceil(log2 |x|) in fp64, clamped to UE8M0's exponent range
    x = torch.cat([torch.tensor([1.0, 1.5, -0.3, 448.0, 2.0 ** -126, 3e38]), torch.rand(200) * 10 ** torch.randn(200)])
    want = torch.exp2(torch.ceil(torch.log2(x.double().abs()))).clamp(2.0 ** -126, 2.0 ** 127).float()
    assert torch.equal(ceil_to_ue8m0(x), want)
    assert torch.equal(ceil_to_ue8m0(torch.zeros(3)), torch.full((3,), 2.0 ** -126))


def test_registered_under_deep_gemm_names(monkeypatch):
    """docs/compat.md's start-up aliasing: DeepGEMM's submodule imports resolve to this package."""
    import importlib
    import sys
    pre = "dsmoe.compat.deep_gemm"
    for k, m in list(sys.modules.items()):
        if k == pre or k.startswith(pre + "."):
            monkeypatch.setitem(sys.modules, "deep_gemm" + k[len(pre):], m)
    assert importlib.import_module("deep_gemm") is deep_gemm
    assert importlib.import_module("deep_gemm.utils.layout").get_mn_major_tma_aligned_tensor is get_mn_major_tma_aligned_tensor
    assert importlib.import_module("deep_gemm.utils").per_token_cast_to_fp8 is per_token_cast_to_fp8
    assert importlib.import_module("deep_gemm.testing").calc_diff is calc_diff


def test_testing_helpers():
    x = torch.randn(10, 10)
    assert calc_diff(x, x) == pytest.approx(0.0, abs=1e-12)
    assert calc_diff(x, -x) == pytest.approx(2.0)
    assert count_bytes(x, (x.half(), None)) == 400 + 200


def test_device_values_checked_before_writing():
    """grouped_layout must hold ks_cpu (checked on the host before d is touched)."""
    k = deep_gemm.k_grouped_fp8_gemm_tn_contiguous
    ak = (torch.zeros(256, 8, dtype=FP8), torch.ones(2, 8))
    bk = (torch.zeros(256, 64, dtype=FP8), torch.ones(2, 64))
    d = poison((2, 8, 64), torch.float32, "cpu")
    _raises(ValueError, r"'grouped_layout' must hold ks_cpu=\[128, 128\] on the device, got \[256, 0\]", k, ak, bk, d,
            [128, 128], torch.tensor([256, 0], dtype=torch.int32), torch.zeros(2, 8, 64))
    assert torch.isnan(d).all()


@pytest.mark.parametrize("device", DEVICES)
def test_framework_warmup_calls(device):
    """SGLang's pre-compile warmup: compile-mode switch, uninitialized inputs, keyword m_indices/masked_m/
    expected_m, row slices of preallocated buffers."""
    G, max_m, N, K = 2, 256, 128, 256
    old = deep_gemm.get_compile_mode()
    deep_gemm.set_compile_mode(1)
    assert deep_gemm.get_compile_mode() == 1
    lhs = quant_a(max_m, K, device)
    rhs = quant_w(N, K, device)
    out = torch.empty(max_m, N, dtype=torch.bfloat16, device=device)
    for m in (1, 77, 256):
        deep_gemm.fp8_gemm_nt((lhs[0][:m], lhs[1][:m]), rhs, out[:m])
        check_bf16(out[:m], deq_rows(lhs[0][:m], lhs[1][:m]) @ deq_blocks(*rhs).t(), device)
    rhs_g = quant_w_grouped(G, N, K, device)
    m_indices = torch.zeros(max_m, dtype=torch.int32, device=device)
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous((lhs[0][:128], lhs[1][:128]), rhs_g, out[:128], m_indices=m_indices[:128])
    check_bf16(out[:128], deq_rows(lhs[0][:128], lhs[1][:128]) @ deq_blocks(rhs_g[0][0], rhs_g[1][0]).t(), device)
    lhs_m = (torch.empty(G, max_m, K, dtype=FP8, device=device), torch.empty(G, max_m, 2, device=device))
    out_m = poison((G, max_m, N), torch.bfloat16, device)
    deep_gemm.fp8_m_grouped_gemm_nt_masked(lhs_m, rhs_g, out_m, masked_m=torch.zeros(G, dtype=torch.int32, device=device),
                                           expected_m=max_m)
    assert torch.isnan(out_m).all()
    deep_gemm.set_compile_mode(old)
