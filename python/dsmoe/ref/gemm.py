"""Reference FP8 block-scaled GEMMs: the specification of dsmoe's GEMM kernels and their CPU path.

Semantics (DeepSeek-V3's ``fp8_gemm``): the reduction dim K is cut into 128-wide blocks; per block the
FP8 product is formed in fp32 and *promoted* into an fp32 accumulator with both dequantization scales:

    acc[m, n] += (A[m, blk] . B[n, blk]) * (a_scale[m, blk] * b_scale[n, blk])

``a_scale`` is per row and K block (1x128). ``b_scale`` is per 128x128 block of B for the NT GEMMs
(``b_scales[n // 128, blk]``) and per row and K block (1x128) for the weight-gradient TN GEMMs, whose
reduction dim is the token dim. The result is cast to the output dtype once, at the end.

Layouts:
- NT: ``a [M, K]`` e4m3, ``a_scales [M, K/128]`` fp32 (any strides: row-major or the MN-major layout of
  ``per_token_group_quant_fp8(..., column_major_scales=True)``), ``b [N, K]`` e4m3,
  ``b_scales [ceil(N/128), K/128]`` fp32, ``d [M, N]``.
- contiguous grouped: ``a [M_sum, K]`` rows grouped by expert, ``m_indices [M_sum]`` int32 with the
  group of each row or -1 for padding rows; ``b [G, N, K]``, ``b_scales [G, ceil(N/128), K/128]``.
  Padding rows of ``out`` are never written. Any ``m_indices`` (what the kernel does, exactly): rows go
  in aligned blocks of 128; a block's group is the id of its first row; a row is computed with that
  group and written iff its id equals it and it lies in ``[0, G)``; every other row is padding (an id
  outside ``[0, G)``, a row of another group inside the block, every row of a block whose first id is
  not a group).
- masked grouped: ``a [G, M_max, K]``, ``masked_m [G]`` int32: rows ``>= masked_m[g]`` of group g are
  never written (``masked_m`` is clamped to ``[0, M_max]``).
- TN (weight gradient): operands are the transposes of the token-major tensors, quantized 1x128 along
  the token dim T: ``a [M, T]`` (= dY^T) with ``a_scales [M, T/128]``, ``b [N, T]`` (= X^T) with
  ``b_scales [N, T/128]``; ``d [M, N] = a @ b^T`` in fp32. The k-grouped variant splits T into
  consecutive groups of ``group_sizes[g]`` tokens (each a multiple of 128) and writes ``d [G, M, N]``.
  With ``accumulate=True`` the result is added to ``out`` (``out += a @ b^T``). Any ``group_sizes``
  (what the kernel does, exactly): group g takes ``max(size, 0) // 128`` blocks of 128 tokens, cut
  where T ends; every group's ``d[g]`` is written (0 for an empty group, unchanged with accumulate);
  tokens past the last group contribute nothing.

These functions are vectorized over K blocks (batched matmuls in fp32, in chunks that bound memory);
Python loops run over K-block chunks and groups only, never over rows.
"""
from __future__ import annotations

import torch

from .quant import per_token_group_quant_fp8

__all__ = [
    "BLOCK_K",
    "M_ALIGNMENT",
    "get_m_alignment_for_contiguous_layout",
    "fp8_gemm_nt",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
    "fp8_gemm_tn",
    "k_grouped_fp8_gemm_tn_contiguous",
    "per_token_group_quant_fp8_transposed",
]

BLOCK_K = 128
M_ALIGNMENT = 128
# Upper bound on the fp32 elements of one chunk of per-block partial products.
_CHUNK_ELEMS = 1 << 24


def get_m_alignment_for_contiguous_layout() -> int:
    """Row alignment of each group in the contiguous grouped layout (each group's rows start at a
    multiple of this and are padded with -1 rows up to one)."""
    return M_ALIGNMENT


def _scaled_block_gemm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """a [M, K] fp8, sa [M, K/128], b [N, K] fp8, sb [N, K/128] (per-row scale of B, already expanded
    from 128x128 blocks where that applies) -> fp32 [M, N] with per-block promotion."""
    M, K = a.shape
    N = b.shape[0]
    kb = K // BLOCK_K
    acc = torch.zeros(M, N, dtype=torch.float32, device=a.device)
    if M == 0 or N == 0 or kb == 0:
        return acc
    A = a.float().reshape(M, kb, BLOCK_K).transpose(0, 1)  # [kb, M, 128]
    B = b.float().reshape(N, kb, BLOCK_K).transpose(0, 1)  # [kb, N, 128]
    sa = sa.float().t()  # [kb, M]
    sb = sb.float().t()  # [kb, N]
    chunk = max(1, _CHUNK_ELEMS // (M * N))
    for k0 in range(0, kb, chunk):
        k1 = min(kb, k0 + chunk)
        part = torch.bmm(A[k0:k1], B[k0:k1].transpose(1, 2))  # [c, M, N], exact-ish fp32 block products
        part.mul_(sa[k0:k1, :, None] * sb[k0:k1, None, :])
        acc += part.sum(0)
    return acc


def _expand_block_scales(b_scales: torch.Tensor, N: int) -> torch.Tensor:
    """[ceil(N/128), kb] -> [N, kb]"""
    return b_scales.float().repeat_interleave(BLOCK_K, dim=0)[:N]


def fp8_gemm_nt(a, a_scales, b, b_scales, *, out=None, out_dtype=None):
    """d [M, N] = a [M, K] @ b [N, K]^T with 1x128 scales on a and 128x128 scales on b; a new tensor of
    ``out_dtype`` (default bfloat16) or written into ``out`` (then ``out_dtype``, if given, must match)."""
    if out is not None and out_dtype is not None and out.dtype != out_dtype:
        raise TypeError(f"fp8_gemm_nt: out_dtype={out_dtype} disagrees with out.dtype={out.dtype}")
    N = b.shape[0]
    d = _scaled_block_gemm(a, a_scales, b, _expand_block_scales(b_scales, N))
    if out is None:
        return d.to(out_dtype or torch.bfloat16)
    out.copy_(d)
    return out


def m_grouped_fp8_gemm_nt_contiguous(a, a_scales, b, b_scales, m_indices, *, out=None):
    """d [M_sum, N] (bf16): row r uses group ``m_indices[r]``; rows with -1 are not written (their
    content is whatever ``out`` held; uninitialized when ``out`` is None)."""
    G, N, _ = b.shape
    M = a.shape[0]
    if out is None:
        out = torch.empty(M, N, dtype=torch.bfloat16, device=a.device)
    idx = m_indices.to(torch.int64)
    # the group of each row's aligned block: the id of the block's first row (the kernel reads that one)
    first = idx[torch.arange(M, device=idx.device) // M_ALIGNMENT * M_ALIGNMENT]
    row_g = torch.where((idx == first) & (first >= 0) & (first < G), idx, torch.full_like(idx, -1))
    for g in torch.unique(row_g[row_g >= 0]).tolist():
        rows = (row_g == g).nonzero().squeeze(1)
        d = _scaled_block_gemm(a[rows], a_scales[rows], b[g], _expand_block_scales(b_scales[g], N))
        out.index_copy_(0, rows, d.to(out.dtype))
    return out


def m_grouped_fp8_gemm_nt_masked(a, a_scales, b, b_scales, masked_m, expected_m=None, *, out=None):
    """d [G, M_max, N] (bf16): rows ``< masked_m[g]`` of each group; other rows are not written.
    ``expected_m`` is only a tiling hint for the kernel."""
    G, M_max, _ = a.shape
    N = b.shape[1]
    if out is None:
        out = torch.empty(G, M_max, N, dtype=torch.bfloat16, device=a.device)
    for g, m in enumerate(masked_m.tolist()):
        m = max(0, min(int(m), M_max))
        if m == 0:
            continue
        d = _scaled_block_gemm(a[g, :m], a_scales[g, :m], b[g], _expand_block_scales(b_scales[g], N))
        out[g, :m] = d.to(out.dtype)
    return out


def fp8_gemm_tn(a, a_scales, b, b_scales, *, out=None, accumulate=False):
    """d [M, N] fp32 = a [M, T] @ b [N, T]^T, both 1x128-scaled along T (weight gradient)."""
    d = _scaled_block_gemm(a, a_scales, b, b_scales)
    if out is None:
        return d
    if accumulate:
        out += d
    else:
        out.copy_(d)
    return out


def k_grouped_fp8_gemm_tn_contiguous(a, a_scales, b, b_scales, group_sizes, *, out=None, accumulate=False):
    """d [G, M, N] fp32: ``d[g] (+)= a[:, T_g] @ b[:, T_g]^T`` where T_g is the g-th run of
    ``group_sizes[g]`` consecutive tokens (each a multiple of 128, summing to T; other sizes: see the
    module docstring)."""
    M, N = a.shape[0], b.shape[0]
    sizes = [int(s) for s in group_sizes.tolist()]
    G = len(sizes)
    if out is None:
        out = torch.zeros(G, M, N, dtype=torch.float32, device=a.device)
        accumulate = False
    total_blocks = a.shape[1] // BLOCK_K
    k0 = 0
    for g, tg in enumerate(sizes):
        kb = max(0, min(max(tg, 0) // BLOCK_K, total_blocks - k0))
        k1 = k0 + kb
        c0, c1 = k0 * BLOCK_K, k1 * BLOCK_K
        d = _scaled_block_gemm(a[:, c0:c1], a_scales[:, k0:k1], b[:, c0:c1], b_scales[:, k0:k1])
        if accumulate:
            out[g] += d
        else:
            out[g].copy_(d)
        k0 = k1
    return out


def per_token_group_quant_fp8_transposed(x: torch.Tensor, *, scale_ue8m0: bool = False):
    """x [T, K] (fp32/fp16/bf16) -> (x^T quantized 1x128 along T: e4m3 [K, T_pad], scales fp32
    [K, T_pad/128] MN-major (stride (1, K rounded up to 4)), with T_pad = T rounded up to 128 and the
    padding tokens zero (they do not change any group's amax). The operands of the TN GEMMs."""
    T, K = x.shape
    t_pad = -(-T // BLOCK_K) * BLOCK_K
    xt = x.new_zeros(K, t_pad)
    xt[:, :T] = x.t()
    return per_token_group_quant_fp8(xt, BLOCK_K, scale_ue8m0=scale_ue8m0, column_major_scales=True)
