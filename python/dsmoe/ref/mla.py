"""Reference MLA (multi-head latent attention) decoding over a paged latent KV cache.

This module is the specification of ``dsmoe.ops.mla`` and its CPU path. Everything is computed in fp32.

Math (DeepSeek-V3, one layer, one decode step)
----------------------------------------------
Per token the cache holds ``c = [kv_a_layernorm(latent) (512) | rope(k_rope) (64)]`` (576 values), one
"KV head" shared by all query heads. ``kv_b_proj.weight`` is ``[H * (128 + 128), 512]``; per head ``h``
its rows are ``[W_UK[h] (128 x 512) | W_UV[h] (128 x 512)]``.

Un-absorbed (naive) form, per head ``h``, query ``q = [q_nope (128) | q_rope (64)]``::

    k_nope[t] = W_UK[h] @ c[t, :512]        v[t] = W_UV[h] @ c[t, :512]         (128 each)
    s[t]      = (q_nope . k_nope[t] + q_rope . c[t, 512:]) * softmax_scale
    out_h     = sum_t softmax(s)[t] * v[t]                                        (128)

Absorbed form (what the kernel computes): ``q_abs = W_UK[h]^T @ q_nope`` (512) so that
``q_nope . k_nope[t] = q_abs . c[t, :512]``; with ``Q = [q_abs | q_rope]`` (576)::

    s[t] = (Q . c[t]) * softmax_scale          o = sum_t softmax(s)[t] * c[t, :512]    (512)
    out_h = W_UV[h] @ o                                                                (128)

i.e. multi-query attention with d_qk = 576, d_v = 512 and V = K[:, :512]. ``lse = ln sum_t exp(s[t])``
(natural log of the scaled scores).

Other sizes: everything in this module except the FP8 cache layout takes any ``kv_lora_rank`` (the
latent width, ``head_dim_v``), any even rope width and any head count; the cache then holds
``kv_lora_rank + rope`` values per token and ``d_qk`` is that sum. The numbers above are V3's (and the
kernel's). The FP8 layout below exists for the 576-value cache only.

Cache layout and masking
------------------------
``kv_cache [num_blocks, 64, 1, 576]`` bf16, paged in blocks of 64 tokens: token ``t`` of sequence ``b`` is
``kv_cache[block_table[b, t // 64], t % 64, 0]``. Only the first ``cache_seqlens[b]`` tokens exist; other
slots and pages may hold anything (NaN included) and are never read into the result.
With ``causal=True`` the last ``s_q`` cache tokens are the ``s_q`` new queries: query ``i`` (0-based) sees
cache positions ``< cache_seqlens[b] - s_q + i + 1``. A query that sees no token (zero-length sequence, or
causal with ``seqlen < s_q``) gives ``out = 0`` and ``lse = +inf``.

FP8 cache (656 bytes per token, ``[num_blocks, 64, 1, 656]`` float8_e4m3fn or uint8 bytes)
-----------------------------------------------------------------------------------------
=============  ======  ==========================================================================
bytes          count   content
=============  ======  ==========================================================================
0   .. 511     512     latent (the first 512 cache values) as e4m3, value ``j`` at byte ``j``
512 .. 527     4       fp32 (little-endian) dequantization scales, scale ``g`` covers values
                       ``128 g .. 128 g + 127``: ``latent[j] ~= e4m3[j] * scale[j // 128]``
528 .. 655     64      rope part (cache values 512..575) as bf16, unquantized (little-endian)
=============  ======  ==========================================================================

Quantization follows V3's activation rule per 128 values: ``scale = max(amax, 1e-4) / 448`` (optionally
rounded up to a power of two), ``e4m3 = RNE(x / scale)`` saturated to +-448. The dequantized cache, which
the kernel and this reference both use, is ``bf16(fp32(e4m3) * scale)``.

Split-KV schedule (``get_mla_metadata``)
----------------------------------------
See :func:`get_mla_metadata` for the format of ``tile_scheduler_metadata`` and ``num_splits``.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "MLA_BLOCK_SIZE",
    "MLA_D_QK",
    "MLA_D_V",
    "MLA_D_ROPE",
    "MLA_FP8_BYTES_PER_TOKEN",
    "MLA_METADATA_FIELDS",
    "MLA_FIXED_OVERHEAD_BLOCKS",
    "mla_num_sm_parts",
    "get_mla_metadata",
    "mla_decode_with_kvcache",
    "mla_decode_split",
    "mla_kvcache_append",
    "quantize_mla_kvcache_fp8",
    "dequantize_mla_kvcache_fp8",
    "mla_absorb_q",
    "mla_unabsorb_out",
    "mla_decode_unabsorbed",
    "rms_norm",
    "apply_rope",
]

MLA_BLOCK_SIZE = 64           # tokens per page
MLA_D_QK = 576                # 512 latent + 64 rope
MLA_D_V = 512                 # V = K[:, :512]
MLA_D_ROPE = 64
MLA_FP8_BYTES_PER_TOKEN = 656  # 512 e4m3 + 4 fp32 scales + 64 bf16
MLA_METADATA_FIELDS = 8       # int32 per row of tile_scheduler_metadata
MLA_FIXED_OVERHEAD_BLOCKS = 5  # cost of one (batch, split) in the schedule, in 64-token blocks
_M_TILE = 64                  # query rows (heads x s_q) per CTA of the kernel

_FP8 = torch.float8_e4m3fn
_FP8_MAX = 448.0
_AMAX_FLOOR = 1e-4


# ----------------------------------------------------------------------------- schedule
def mla_num_sm_parts(num_sms: int, num_q_tokens_per_head_k: int, num_heads_k: int) -> int:
    """How many split-KV parts (CTAs per M tile) the kernel launches: ``num_sms / (h_k * m_tiles)``, at least 1.

    ``m_tiles = ceil(num_q_tokens_per_head_k / 64)`` (each CTA holds 64 query rows = heads x s_q)."""
    m_tiles = max(1, -(-num_q_tokens_per_head_k // _M_TILE))
    return max(1, num_sms // (num_heads_k * m_tiles))


def get_mla_metadata(cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int,
                     num_sm_parts: int):
    """The split-KV schedule: ``(tile_scheduler_metadata int32 [P, 8], num_splits int32 [B + 1])``.

    Work model: sequence ``b`` has ``n_b = ceil(seqlen_b / 64)`` blocks and ``u_b = max(n_b, 1)`` work
    items (a zero-length sequence still has one empty item: someone must write out = 0, lse = +inf).
    Items are laid on a line, each sequence preceded by ``F = 5`` overhead units::

        S_b = sum_{j < b} (u_j + F)          position of item k of sequence b: S_b + F + k
        T   = S_B                            L = ceil(T / P)        owner(b, k) = (S_b + F + k) // L

    Part ``i`` (one CTA per M tile) processes the items it owns, in order. The items of one sequence
    owned by one part form one *split*; ``first_b = owner(b, 0)``, ``last_b = owner(b, u_b - 1)`` and
    sequence ``b`` has ``last_b - first_b + 1`` splits.

    ``num_splits`` is the exclusive prefix sum of the split counts: splits of sequence ``b`` have global
    indices ``num_splits[b] .. num_splits[b + 1] - 1`` (so ``num_splits[B] <= B + P - 1``). A sequence
    with exactly one split is written by its part straight to ``out``/``lse``; otherwise each split
    writes fp32 partials (``o``, ``lse``) at its global index and a combine pass merges them.

    Row ``i`` of ``tile_scheduler_metadata`` (int32)::

        [0] begin_b      first sequence with an item owned by part i
        [1] begin_blk    first block of begin_b processed by part i
        [2] end_b        last sequence with an item owned by part i (end_b < begin_b: part i is idle)
        [3] end_blk      one past the last block of end_b processed by part i (clipped to n_end_b)
        [4] begin_split  local split index of begin_b's split in part i (i - first_begin_b);
                         every later sequence of the part starts its first split (local index 0)
        [5..7] 0         reserved

    For sequences strictly between begin_b and end_b the part processes all blocks; for begin_b it starts
    at begin_blk; for end_b it stops at end_blk (when begin_b == end_b both apply).
    """
    seqlens = cache_seqlens.to(torch.int64).cpu() if cache_seqlens.device.type != "cpu" else cache_seqlens.to(torch.int64)
    B = seqlens.numel()
    P = int(num_sm_parts)
    F = MLA_FIXED_OVERHEAD_BLOCKS
    n_blk = (seqlens + MLA_BLOCK_SIZE - 1) // MLA_BLOCK_SIZE
    units = n_blk.clamp(min=1)
    cost = units + F
    S = torch.cumsum(cost, 0) - cost                  # exclusive prefix
    T = int(cost.sum()) if B else 0
    L = max(1, -(-T // P))
    first = (S + F) // L
    last = (S + F + units - 1) // L
    n_splits = last - first + 1
    num_splits = torch.zeros(B + 1, dtype=torch.int64)
    num_splits[1:] = torch.cumsum(n_splits, 0)
    md = torch.zeros(P, MLA_METADATA_FIELDS, dtype=torch.int64)
    parts = torch.arange(P, dtype=torch.int64)
    # begin_b: first b with last_b >= i; end_b: last b with first_b <= i (both monotone in b).
    begin_b = torch.searchsorted(last, parts, right=False)
    end_b = torch.searchsorted(first, parts, right=True) - 1
    idle = (begin_b > end_b) | (begin_b >= B) | (end_b < 0)
    bb = begin_b.clamp(0, max(B - 1, 0))
    eb = end_b.clamp(0, max(B - 1, 0))
    if B:
        begin_blk = (parts * L - (S[bb] + F)).clamp(min=0)
        end_blk = torch.minimum(((parts + 1) * L - (S[eb] + F)), n_blk[eb]).clamp(min=0)
        begin_split = parts - first[bb]
    else:
        begin_blk = end_blk = begin_split = torch.zeros(P, dtype=torch.int64)
    md[:, 0] = torch.where(idle, 0, bb)
    md[:, 1] = torch.where(idle, 0, begin_blk)
    md[:, 2] = torch.where(idle, -1, eb)
    md[:, 3] = torch.where(idle, 0, end_blk)
    md[:, 4] = torch.where(idle, 0, begin_split)
    dev = cache_seqlens.device
    return md.to(torch.int32).to(dev), num_splits.to(torch.int32).to(dev)


# ----------------------------------------------------------------------------- FP8 cache
def quantize_mla_kvcache_fp8(kv_cache: torch.Tensor, *, scale_ue8m0: bool = False) -> torch.Tensor:
    """bf16 cache ``[..., 576]`` -> FP8 cache ``[..., 656]`` (float8_e4m3fn bytes, layout in the module doc)."""
    from .quant import to_fp8, ue8m0_round_up

    lead = kv_cache.shape[:-1]
    x = kv_cache.float()
    lat = x[..., :MLA_D_V].reshape(*lead, 4, 128)
    amax = lat.abs().amax(-1) if lat.numel() else lat.new_zeros(*lead, 4)
    scale = amax.clamp(min=_AMAX_FLOOR) / _FP8_MAX
    if scale_ue8m0:
        scale = ue8m0_round_up(scale)
    q = to_fp8(lat / scale.unsqueeze(-1)).reshape(*lead, MLA_D_V)
    out = torch.empty(*lead, MLA_FP8_BYTES_PER_TOKEN, dtype=torch.uint8, device=kv_cache.device)
    out[..., :512] = q.view(torch.uint8)
    out[..., 512:528] = scale.contiguous().view(torch.uint8).reshape(*lead, 16)
    out[..., 528:656] = kv_cache[..., MLA_D_V:].to(torch.bfloat16).contiguous().view(torch.uint8).reshape(*lead, 128)
    return out.view(_FP8)


def dequantize_mla_kvcache_fp8(kv_fp8: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """FP8 cache ``[..., 656]`` -> ``[..., 576]``: latent ``bf16(fp32(e4m3) * scale)``, rope as stored."""
    b = kv_fp8.view(torch.uint8)
    lead = b.shape[:-1]
    q = b[..., :512].contiguous().view(_FP8).float().reshape(*lead, 4, 128)
    scale = b[..., 512:528].contiguous().view(torch.float32).reshape(*lead, 4)
    lat = (q * scale.unsqueeze(-1)).reshape(*lead, 512).to(torch.bfloat16)
    rope = b[..., 528:656].contiguous().view(torch.bfloat16).reshape(*lead, 64)
    return torch.cat([lat, rope], -1).to(out_dtype)


def _is_fp8_cache(kv_cache: torch.Tensor) -> bool:
    return kv_cache.shape[-1] == MLA_FP8_BYTES_PER_TOKEN and kv_cache.dtype in (_FP8, torch.uint8)


# ----------------------------------------------------------------------------- decode
def _gather_seq(kv: torch.Tensor, block_table: torch.Tensor, b: int, n: int) -> torch.Tensor:
    """fp32 ``[n, d_qk]``: the first n cache tokens of sequence b (pages gathered, FP8 dequantized)."""
    nblk = -(-n // MLA_BLOCK_SIZE)
    pages = kv[block_table[b, :nblk].long()]           # [nblk, 64, 1, D]
    if _is_fp8_cache(kv):
        pages = dequantize_mla_kvcache_fp8(pages)
    return pages.reshape(nblk * MLA_BLOCK_SIZE, -1)[:n].float()


def _attend(q: torch.Tensor, k: torch.Tensor, dv: int, scale: float, limits: torch.Tensor):
    """q fp32 ``[s_q, H, d_qk]``, k fp32 ``[n, d_qk]``; query i sees keys ``< limits[i]``.

    Returns un-normalized-free ``o [s_q, H, dv]`` and ``lse [H, s_q]`` (+inf where nothing is seen)."""
    n = k.shape[0]
    s = torch.einsum("qhd,nd->qhn", q, k) * scale
    vis = torch.arange(n, device=k.device).view(1, 1, n) < limits.view(-1, 1, 1)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)                        # -inf where nothing is visible
    empty = torch.isneginf(lse)
    p = torch.exp(s - torch.where(empty, 0.0, lse).unsqueeze(-1))
    p = p.masked_fill(~vis, 0.0)
    o = torch.einsum("qhn,nd->qhd", p, k[:, :dv])
    lse = torch.where(empty, float("inf"), lse)
    return o, lse.transpose(0, 1)


def mla_decode_with_kvcache(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                            cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
                            causal: bool = False):
    """Absorbed-form reference (fp32): ``(out [B, s_q, H, head_dim_v] q.dtype, lse fp32 [B, H, s_q])``.

    ``kv_cache`` is bf16 ``[num_blocks, 64, 1, d_qk]`` (any ``d_qk``, the last dim of q; V = the first
    ``head_dim_v`` values) or the 656-byte FP8 layout (``d_qk`` 576, dequantized first).
    Masking and empty rows as in the module doc. ``tile_scheduler_metadata`` does not change the result
    (see :func:`mla_decode_split` for the split computation)."""
    B, s_q, H, _ = q.shape
    out = torch.zeros(B, s_q, H, head_dim_v, dtype=torch.float32, device=q.device)
    lse = torch.full((B, H, s_q), float("inf"), dtype=torch.float32, device=q.device)
    seqlens = cache_seqlens.tolist()
    for b in range(B):
        n = int(seqlens[b])
        if n <= 0:
            continue
        k = _gather_seq(kv_cache, block_table, b, n).to(q.device)
        limits = _limits(n, s_q, causal, q.device)
        o, l_ = _attend(q[b].float(), k, head_dim_v, softmax_scale, limits)
        out[b], lse[b] = o, l_
    return out.to(q.dtype), lse


def _limits(n: int, s_q: int, causal: bool, device) -> torch.Tensor:
    if causal:
        return (n - s_q + 1 + torch.arange(s_q, device=device)).clamp(min=0)
    return torch.full((s_q,), n, dtype=torch.int64, device=device)


def mla_decode_split(q, kv_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                     num_splits, softmax_scale, causal=False):
    """The same attention computed the way the kernel does: per part and split as the metadata says,
    fp32 partials ``(o, lse)`` per split, then the LSE-weighted combine::

        lse = ln sum_s exp(lse_s)        out = sum_s exp(lse_s - lse) * o_s

    Splits of a sequence with a single split are its result directly. Used to test the schedule."""
    B, s_q, H, _ = q.shape
    md = tile_scheduler_metadata.cpu().tolist()
    ns = num_splits.cpu().tolist()
    seqlens = cache_seqlens.cpu().tolist()
    n_total = ns[B]
    o_acc = torch.full((n_total, s_q, H, head_dim_v), float("nan"))
    l_acc = torch.full((n_total, H, s_q), float("nan"))
    out = torch.full((B, s_q, H, head_dim_v), float("nan"))
    lse = torch.full((B, H, s_q), float("nan"))
    visits = [0] * B
    for row in md:
        b0, blk0, b1, blk1, split0 = row[:5]
        for b in range(b0, b1 + 1):
            n = int(seqlens[b])
            nblk = -(-n // MLA_BLOCK_SIZE)
            lo = blk0 if b == b0 else 0
            hi = min(blk1, nblk) if b == b1 else nblk
            local = split0 if b == b0 else 0
            visits[b] += 1
            tok0, tok1 = lo * MLA_BLOCK_SIZE, min(hi * MLA_BLOCK_SIZE, n)
            lim = _limits(n, s_q, causal, "cpu")
            if tok1 > tok0:
                k = _gather_seq(kv_cache.cpu(), block_table.cpu(), b, n)[tok0:tok1]
                o, l_ = _attend(q[b].float().cpu(), k, head_dim_v, softmax_scale, (lim - tok0).clamp(min=0))
            else:
                o, l_ = torch.zeros(s_q, H, head_dim_v), torch.full((H, s_q), float("inf"))
            if ns[b + 1] - ns[b] == 1:
                out[b], lse[b] = o, l_
            else:
                o_acc[ns[b] + local], l_acc[ns[b] + local] = o, l_
    for b in range(B):
        k = ns[b + 1] - ns[b]
        if k <= 1:
            continue
        ls = l_acc[ns[b]:ns[b + 1]]                       # [k, H, s_q]; +inf = empty split
        ls_m = torch.where(torch.isinf(ls), float("-inf"), ls)
        tot = torch.logsumexp(ls_m, 0)                    # -inf if all empty
        empty = torch.isneginf(tot)
        w = torch.exp(ls_m - torch.where(empty, 0.0, tot)).masked_fill(torch.isinf(ls), 0.0)  # [k, H, s_q]
        o = (w.permute(0, 2, 1).unsqueeze(-1) * torch.nan_to_num(o_acc[ns[b]:ns[b + 1]])).sum(0)
        out[b] = o
        lse[b] = torch.where(empty, float("inf"), tot)
    assert all(v >= 1 for v in visits), "every sequence must be visited by at least one part"
    return out.to(q.dtype).to(q.device), lse.to(q.device)


# ----------------------------------------------------------------------------- un-absorbed form
def _split_kv_b(w_kv_b: torch.Tensor, H: int, d_nope: int = 128, d_v: int = 128):
    w = w_kv_b.float().view(H, d_nope + d_v, w_kv_b.shape[-1])
    return w[:, :d_nope], w[:, d_nope:]              # W_UK [H, d_nope, kv_lora], W_UV [H, d_v, kv_lora]


def mla_absorb_q(q_nope: torch.Tensor, q_rope: torch.Tensor, w_kv_b: torch.Tensor) -> torch.Tensor:
    """``[q_nope @ W_UK[h] | q_rope]`` per head: ``[..., H, d_nope] + [..., H, rope] -> [..., H, kv_lora + rope]``
    (fp32; V3: 128 + 64 -> 576; ``kv_lora`` is the last dim of ``w_kv_b``)."""
    H, d_nope = q_nope.shape[-2], q_nope.shape[-1]
    w_uk, _ = _split_kv_b(w_kv_b, H, d_nope, w_kv_b.shape[0] // H - d_nope)
    q_abs = torch.einsum("...hn,hnc->...hc", q_nope.float(), w_uk)
    return torch.cat([q_abs, q_rope.float()], -1)


def mla_unabsorb_out(o: torch.Tensor, w_kv_b: torch.Tensor, d_nope: int = 128) -> torch.Tensor:
    """Per head ``W_UV[h] @ o``: ``[..., H, kv_lora] -> [..., H, d_v]`` (fp32)."""
    H = o.shape[-2]
    _, w_uv = _split_kv_b(w_kv_b, H, d_nope, w_kv_b.shape[0] // H - d_nope)
    return torch.einsum("...hc,hvc->...hv", o.float(), w_uv)


def mla_decode_unabsorbed(q_nope, q_rope, kv_cache, block_table, cache_seqlens, w_kv_b, softmax_scale,
                          causal=False):
    """Naive MLA decode from the un-absorbed weights (fp32): per head, k/v expanded from the latent.

    q_nope ``[B, s_q, H, d_nope]``, q_rope ``[B, s_q, H, rope]``, w_kv_b ``[H * (d_nope + d_v), kv_lora]``
    (V3: 128, 64, 128, 512). Returns ``(out fp32 [B, s_q, H, d_v], lse fp32 [B, H, s_q])``."""
    B, s_q, H, d_nope = q_nope.shape
    d_v = w_kv_b.shape[0] // H - d_nope
    L = w_kv_b.shape[-1]
    w_uk, w_uv = _split_kv_b(w_kv_b, H, d_nope, d_v)
    dev = q_nope.device
    out = torch.zeros(B, s_q, H, d_v, device=dev)
    lse = torch.full((B, H, s_q), float("inf"), device=dev)
    seqlens = cache_seqlens.tolist()
    for b in range(B):
        n = int(seqlens[b])
        if n <= 0:
            continue
        c = _gather_seq(kv_cache, block_table, b, n).to(dev)    # [n, kv_lora + rope]
        k_nope = torch.einsum("hdc,nc->hnd", w_uk, c[:, :L])     # [H, n, d_nope]
        v = torch.einsum("hdc,nc->hnd", w_uv, c[:, :L])          # [H, n, d_v]
        s = (torch.einsum("qhd,hnd->qhn", q_nope[b].float(), k_nope)
             + torch.einsum("qhr,nr->qhn", q_rope[b].float(), c[:, L:])) * softmax_scale
        vis = torch.arange(n, device=dev).view(1, 1, n) < _limits(n, s_q, causal, dev).view(-1, 1, 1)
        s = s.masked_fill(~vis, float("-inf"))
        l_ = torch.logsumexp(s, -1)
        empty = torch.isneginf(l_)
        p = torch.exp(s - torch.where(empty, 0.0, l_).unsqueeze(-1)).masked_fill(~vis, 0.0)
        out[b] = torch.einsum("qhn,hnd->qhd", p, v)
        lse[b] = torch.where(empty, float("inf"), l_).transpose(0, 1)
    return out, lse


# ----------------------------------------------------------------------------- append
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """V3/HF RMSNorm: normalize in fp32, cast to x's dtype, multiply by the weight (in x's dtype)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(x.dtype) * y.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """Rotates ``x [T, r]`` (r even; V3: 64) by angles with ``cos, sin [T, r/2]`` (fp32); result in x's dtype.

    interleaved=True: pairs ``(x[2i], x[2i+1])`` (DeepSeek's official code), written back in place order.
    interleaved=False: pairs ``(x[i], x[i + r/2])`` (rotate_half / NeoX; HF after its de-interleave)."""
    xf = x.float()
    c, s = cos.float(), sin.float()
    h = x.shape[-1] // 2
    if interleaved:
        a, b = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2)
    else:
        a, b = xf[..., :h], xf[..., h:]
        out = torch.cat([a * c - b * s, a * s + b * c], -1)
    return out.to(x.dtype)


def mla_kvcache_append(kv_cache: torch.Tensor, block_table: torch.Tensor, batch_ids: torch.Tensor,
                       positions: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor, *,
                       norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                       cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                       rope_interleaved: bool = True, scale_ue8m0: bool = False) -> None:
    """Writes T new tokens into the paged cache, in place.

    Token ``t`` goes to sequence ``batch_ids[t]`` at position ``positions[t]``, i.e. slot
    ``kv_cache[block_table[batch_ids[t], positions[t] // 64], positions[t] % 64, 0]``. Stored value::

        c = [rms_norm(latent[t], norm_weight, eps) if norm_weight is given else latent[t]    (kv_lora, bf16)
             | apply_rope(k_rope[t], cos[t], sin[t]) if cos/sin are given else k_rope[t]]     (rope, bf16)

    (V3: 512 + 64.) For an FP8 cache (576 values only) the bf16 ``c`` is quantized to the 656-byte layout
    (per 128 values). Tokens with a negative position are skipped (padding)."""
    lat = latent.to(torch.bfloat16)
    if norm_weight is not None:
        lat = rms_norm(latent.to(torch.bfloat16), norm_weight.to(torch.bfloat16), eps)
    kr = k_rope.to(torch.bfloat16)
    if cos is not None:
        kr = apply_rope(kr, cos, sin, rope_interleaved)
    c = torch.cat([lat, kr], -1)                                  # [T, kv_lora + rope] bf16
    keep = positions >= 0
    pos = positions[keep].long()
    bids = batch_ids[keep].long()
    c = c[keep]
    blocks = block_table[bids, pos // MLA_BLOCK_SIZE].long()
    offs = pos % MLA_BLOCK_SIZE
    if _is_fp8_cache(kv_cache):
        vals = quantize_mla_kvcache_fp8(c, scale_ue8m0=scale_ue8m0).view(torch.uint8)
        kv_cache.view(torch.uint8)[blocks, offs, 0] = vals
    else:
        kv_cache[blocks, offs, 0] = c.to(kv_cache.dtype)
