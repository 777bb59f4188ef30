"""dsmoe.compat.flash_mla called the way FlashMLA's own tests (tests/test_flash_mla_decoding.py of 2025,
tests/test_flash_mla_dense_decoding.py of 2026), SGLang (flashmla_backend.py) and vLLM (v1 flashmla
backend, old and current) call FlashMLA, checked against an fp64 attention written here (pages gathered
by hand, masked softmax per query).

Inputs follow FlashMLA's tests: random page permutations, page tables padded to 256 tokens, NaN in every
unused page and in the slots past each sequence, sentinel ids (FlashMLA's 2147480000, SGLang's -1 and
its CUDA-graph fill 1) in the table past each sequence, zero-length sequences, causal with s_q > 1, h_q
not a multiple of 64, and the 656-byte FP8 cache built here in FlashMLA's layout (pages 65 tokens apart,
power-of-two scales as FlashMLA's 2026 quant.py builds them, or raw ``amax / 448`` fp32 scales as its 2025
one did).

CPU tier (the reference path): out within 2^-8 relative (its bf16 rounding) or 2e-5 absolute, lse within
1e-5. GPU tier (the kernels): FlashMLA's own test tolerances (out 8e-4 abs or 2.01/128 rel, cosine diff
5e-6; lse 1e-6 abs) on FlashMLA's own input distribution, lse relative 1e-5 (dsmoe's kernel bound,
tighter than FlashMLA's 8/65536). The compat module calls the ops through ``dsmoe.ops``, so the
mutations of tests/mutations.py reach it: under DSMOE_TEST_GPU_ON_CPU=1 the GPU tier fails with each of
mla_decode_lse_off, _drop_row, _out_scale and _unwritten_lse.
"""
from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import dsmoe.compat.flash_mla as flash_mla
from util import DEV, sync

SENTINEL = 2147480000  # FlashMLA's tests' id for table entries past a sequence
D, DV = 576, 512


# ----------------------------------------------------------------------------- builders (independent of dsmoe)
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def fp8_quantize_flashmla(kv: torch.Tensor, pow2: bool = True) -> torch.Tensor:
    """bf16 ``[nb, 64, 1, 576]`` -> float8_e4m3fn ``[nb, 64, 1, 656]`` in FlashMLA's layout (512 e4m3, 4 fp32
    scales per 128 values, 64 bf16 rope), pages 65 tokens apart; NaN tokens: all bytes 0xff. Scales
    ``amax / 448`` rounded up to a power of two (FlashMLA's 2026 tests), or as they are with ``pow2=False``
    (its 2025 tests): the layout takes any fp32 scale."""
    nb = kv.shape[0]
    x = kv.squeeze(2).float()
    bad = torch.isnan(x).any(-1)
    x = torch.nan_to_num(x, nan=0.0)
    buf = torch.zeros(nb, 65, 656, dtype=torch.uint8)
    out = buf[:, :64]
    lat = x[..., :512].reshape(nb, 64, 4, 128)
    scale = lat.abs().amax(-1) / 448.0
    scale = torch.pow(2.0, torch.ceil(torch.log2(scale.clamp(min=1e-4)))) if pow2 else scale.clamp(min=1e-30)
    out[..., :512] = (lat / scale.unsqueeze(-1)).to(torch.float8_e4m3fn).reshape(nb, 64, 512).view(torch.uint8)
    out[..., 512:528] = scale.contiguous().view(torch.uint8).reshape(nb, 64, 16)
    out[..., 528:] = x[..., 512:].to(torch.bfloat16).contiguous().view(torch.uint8).reshape(nb, 64, 128)
    out[bad] = 0xFF
    return out.view(torch.float8_e4m3fn).view(nb, 64, 1, 656)


def fp8_dequantize_flashmla(cache: torch.Tensor) -> torch.Tensor:
    """FlashMLA's dequantization: latent ``bf16(e4m3 * scale)``, rope as stored; ``[nb, 64, 1, 576]`` bf16."""
    b = cache.view(torch.uint8).squeeze(2)
    nb = b.shape[0]
    e4 = b[..., :512].contiguous().view(torch.float8_e4m3fn).float().reshape(nb, 64, 4, 128)
    sc = b[..., 512:528].contiguous().view(torch.float32).reshape(nb, 64, 4, 1)
    lat = (e4 * sc).reshape(nb, 64, 512).to(torch.bfloat16)
    rope = b[..., 528:].contiguous().view(torch.bfloat16)
    return torch.cat([lat, rope], -1).unsqueeze(2)


def make_case(seqlens, s_q, h_q, *, fp8=False, sentinel=SENTINEL, q_std=1.0, k_std=0.5, flashmla_dist=False,
              device="cpu"):
    """FlashMLA-style decode inputs: ``(q, k_cache, block_table, cache_seqlens, kv_values)``; kv_values is the
    bf16 cache the kernel sees (the FP8 cache dequantized), NaN where nothing may be read."""
    b = len(seqlens)
    max_pad = _cdiv(max(list(seqlens) + [1]), 256) * 256
    mb = max_pad // 64
    bt = torch.randperm(b * mb).to(torch.int32).view(b, mb)
    if flashmla_dist:  # FlashMLA's test distribution (the GPU tier's tolerances are FlashMLA's for it)
        q = torch.randn(b, s_q, h_q, D).clamp(-1, 1)
        kv = (torch.randn(b * mb, 64, 1, D) / 10).clamp(-1, 1)
    else:
        q = torch.randn(b, s_q, h_q, D) * q_std
        kv = torch.randn(b * mb, 64, 1, D) * k_std
    kv = kv.bfloat16()
    for i, n in enumerate(seqlens):
        nblk = _cdiv(n, 64)
        kv[bt[i, nblk:].long()] = float("nan")
        if n % 64:
            kv[int(bt[i, nblk - 1]), n % 64:] = float("nan")
        bt[i, nblk:] = sentinel
    cache = fp8_quantize_flashmla(kv, pow2=fp8 != "fp32") if fp8 else kv
    values = fp8_dequantize_flashmla(cache) if fp8 else kv
    cs = torch.tensor(list(seqlens), dtype=torch.int32)
    return q.bfloat16().to(device), cache.to(device), bt.to(device), cs.to(device), values


def attention_fp64(q, values, block_table, seqlens, scale, causal, dv=DV):
    """fp64 ``(out [b, s_q, h_q, dv], lse [b, h_q, s_q])``: query j of sequence i sees its first
    ``n - s_q + j + 1`` tokens (causal) or all n; a query that sees none: out 0, lse +inf."""
    q = q.cpu().double()
    values, block_table = values.cpu(), block_table.cpu()
    b, s_q, h_q, _ = q.shape
    out = torch.zeros(b, s_q, h_q, dv, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), float("inf"), dtype=torch.float64)
    for i in range(b):
        n = int(seqlens[i])
        if n == 0:
            continue
        pages = [values[int(block_table[i, j]), :, 0] for j in range(_cdiv(n, 64))]
        k = torch.cat(pages)[:n].double()
        for j in range(s_q):
            vis = min(n, max(0, n - s_q + j + 1)) if causal else n
            if vis == 0:
                continue
            s = q[i, j] @ k[:vis].T * scale
            l_ = torch.logsumexp(s, -1)
            out[i, j] = torch.exp(s - l_[:, None]) @ k[:vis, :dv]
            lse[i, :, j] = l_
    return out, lse


def check(out, lse, ref_out, ref_lse, *, gpu=False):
    b, s_q, h_q, dv = ref_out.shape
    assert out.shape == (b, s_q, h_q, dv) and out.dtype == torch.bfloat16
    assert lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32
    out, lse = out.cpu().double(), lse.cpu().double()
    assert not torch.isnan(out).any(), "NaN in out (an unused page leaked, or an element was not written)"
    assert not torch.isnan(lse).any()
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty) and bool((lse[empty] > 0).all()), \
        "lse must be +inf exactly where nothing is seen"
    assert bool((out[empty.transpose(1, 2)] == 0).all()), "out must be 0 where nothing is seen"
    # GPU: FlashMLA's test bounds, except lse relative 1e-5 (dsmoe's kernel bound, tests/test_mla_gpu.py)
    # instead of FlashMLA's 8/65536
    o_abs, o_rel, l_abs, l_rel = (8e-4, 2.01 / 128, 1e-6, 1e-5) if gpu else (2e-5, 2.0 ** -8, 1e-5, 1e-5)
    err = (out - ref_out).abs()
    ok = (err <= o_abs) | (err <= o_rel * ref_out.abs())
    assert bool(ok.all()), f"out: {int((~ok).sum())} of {ok.numel()} off, max err {err.max().item():.3g}"
    fin = ~empty
    lerr = (lse[fin] - ref_lse[fin]).abs()
    assert bool(((lerr <= l_abs) | (lerr <= l_rel * ref_lse[fin].abs())).all()), f"lse: max err {lerr.max().item():.3g}"
    den = (out * out + ref_out * ref_out).sum()
    cos = 0.0 if den == 0 else float(1 - 2 * (out * ref_out).sum() / den)
    # the bf16 rounding of out alone gives up to (2^-9)^2 / 2 = 1.9e-6
    assert cos < (5e-6 if gpu else 4e-6), f"cosine diff {cos}"


def _seqlens(b, s_q, base, zero=False):
    """FlashMLA's varlen draw: lengths normal around base (sd base / 2), at least s_q; some zeros if asked."""
    lens = [max(int(random_normal(base, base / 2)), s_q) for _ in range(b)]
    if zero:
        mask = torch.randn(b) > 0
        mask[0] = True
        lens = [0 if m else n for n, m in zip(lens, mask.tolist())]
    return lens


def random_normal(mu, sigma):
    return float(torch.randn(()) * sigma + mu)


# ----------------------------------------------------------------------------- FlashMLA's tests' call forms
CASES = [  # b, s_q, h_q, seqlens (None: FlashMLA's varlen draw around 140), causal, fp8 ("fp32": scales not
    # powers of two), sentinel
    (1, 1, 128, [20], False, False, SENTINEL),
    (2, 2, 16, [140, 1], True, False, SENTINEL),
    (3, 1, 3, [63, 64, 65], False, True, SENTINEL),
    (6, 2, 63, None, True, False, -1),
    (6, 2, 9, None, False, True, -1),
    (4, 2, 1, [1, 257, 2, 130], True, True, SENTINEL),
    (5, 1, 126, None, True, False, SENTINEL),
    (2, 4, 64, [4, 300], True, False, -1),
    (3, 2, 5, [129, 0, 70], True, "fp32", SENTINEL),
]


@pytest.mark.parametrize("b,s_q,h_q,seqlens,causal,fp8,sentinel", CASES)
def test_classic_interface_as_flashmla_2025_tests(b, s_q, h_q, seqlens, causal, fp8, sentinel):
    seqlens = seqlens or _seqlens(b, s_q, 140)
    q, blocked_k, block_table, cache_seqlens, values = make_case(seqlens, s_q, h_q, fp8=fp8, sentinel=sentinel)
    h_kv, dv, topk = 1, DV, None
    tile_scheduler_metadata, num_splits = flash_mla.get_mla_metadata(
        cache_seqlens, s_q * h_q // h_kv, h_kv, h_q, bool(fp8), topk)
    assert tile_scheduler_metadata.dtype == torch.int32 and tile_scheduler_metadata.shape[1] == 8
    assert num_splits.dtype == torch.int32 and num_splits.shape == (b + 1,)
    out, lse = flash_mla.flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, dv, tile_scheduler_metadata,
                                                num_splits, causal=causal, is_fp8_kvcache=bool(fp8), indices=None)
    check(out, lse, *attention_fp64(q, values, block_table, seqlens, D ** -0.5, causal))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("h_q", [1, 3, 64, 128])
def test_lazy_interface_as_flashmla_2026_tests(h_q, causal):
    s_q = 2
    seqlens = _seqlens(5, s_q, 140, zero=True)
    q, blocked_k, block_table, cache_seqlens, values = make_case(seqlens, s_q, h_q)
    tile_scheduler_metadata, num_splits = flash_mla.get_mla_metadata()
    assert isinstance(tile_scheduler_metadata, flash_mla.FlashMLASchedMeta) and num_splits is None
    assert not tile_scheduler_metadata.have_initialized
    out, lse = flash_mla.flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, DV, tile_scheduler_metadata,
                                                num_splits, causal=causal)
    ref = attention_fp64(q, values, block_table, seqlens, D ** -0.5, causal)
    check(out, lse, *ref)
    sm = tile_scheduler_metadata
    assert sm.have_initialized and sm.config.b == 5 and sm.config.s_q == s_q and sm.config.h_q == h_q
    assert sm.config.causal == causal and sm.config.is_fp8_kvcache is False and sm.config.topk is None
    md = sm.tile_scheduler_metadata
    # every layer of the step reuses it: same schedule tensors, same result
    out2, lse2 = flash_mla.flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, DV, sm, None, causal=causal)
    assert sm.tile_scheduler_metadata is md
    assert torch.equal(out2, out) and torch.equal(lse2, lse)


def test_lazy_metadata_must_match_its_first_call():
    seqlens = [70, 3]
    q, k, bt, cs, _ = make_case(seqlens, 1, 16)
    sm, _ = flash_mla.get_mla_metadata()
    flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, sm, causal=False)
    with pytest.raises(ValueError, match="causal"):
        flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, sm, causal=True)
    q3, k3, bt3, cs3, _ = make_case([5, 6, 7], 1, 16)
    with pytest.raises(ValueError, match="b=2"):
        flash_mla.flash_mla_with_kvcache(q3, k3, bt3, cs3, DV, sm)
    with pytest.raises(ValueError, match="h_q"):
        flash_mla.flash_mla_with_kvcache(q[:, :, :8], k, bt, cs, DV, sm)
    with pytest.raises(ValueError, match="num_splits"):
        flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, sm, sm.num_splits)
    # a rejected first call leaves a fresh object unfilled
    fresh, _ = flash_mla.get_mla_metadata()
    with pytest.raises(TypeError):
        flash_mla.flash_mla_with_kvcache(q.float(), k, bt, cs, DV, fresh)
    assert not fresh.have_initialized and fresh.tile_scheduler_metadata is None


def test_get_mla_metadata_forms():
    cs = torch.tensor([0, 1, 64, 65, 1000], dtype=torch.int32)
    md, ns = flash_mla.get_mla_metadata(cs, 128, 1)
    assert md.dtype == ns.dtype == torch.int32 and md.shape[1] == 8 and ns.shape == (6,)
    assert md.device == cs.device and ns.device == cs.device
    assert int(ns[0]) == 0 and bool((ns[1:] >= ns[:-1] + 1).all()), "every sequence has at least one split"
    for kw in ({"num_heads_q": 128}, {"is_fp8_kvcache": True}, {"num_heads_q": 128, "is_fp8_kvcache": False, "topk": None}):
        md2, ns2 = flash_mla.get_mla_metadata(cs, 128, 1, **kw)
        assert torch.equal(md2, md) and torch.equal(ns2, ns)
    md3, ns3 = flash_mla.get_mla_metadata(cache_seqlens=cs, num_heads_per_head_k=128, num_heads_k=1)  # 2025-04 name
    assert torch.equal(md3, md) and torch.equal(ns3, ns)
    lazy = flash_mla.get_mla_metadata()
    assert isinstance(lazy, tuple) and len(lazy) == 2 and lazy[1] is None
    assert lazy[0] == flash_mla.FlashMLASchedMeta() and lazy[0] is not flash_mla.get_mla_metadata()[0]


def test_signatures_are_flashmla_s():
    params = inspect.signature(flash_mla.flash_mla_with_kvcache).parameters
    assert list(params)[:16] == ["q", "k_cache", "block_table", "cache_seqlens", "head_dim_v", "tile_scheduler_metadata",
                                 "num_splits", "softmax_scale", "causal", "is_fp8_kvcache", "indices", "attn_sink",
                                 "extra_k_cache", "extra_indices_in_kvcache", "topk_length", "extra_topk_length"]
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    assert defaults == {"num_splits": None, "softmax_scale": None, "causal": False, "is_fp8_kvcache": False,
                        "indices": None, "attn_sink": None, "extra_k_cache": None, "extra_indices_in_kvcache": None,
                        "topk_length": None, "extra_topk_length": None}
    params = inspect.signature(flash_mla.get_mla_metadata).parameters
    assert list(params)[:6] == ["cache_seqlens", "num_q_tokens_per_head_k", "num_heads_k", "num_heads_q",
                                "is_fp8_kvcache", "topk"]
    assert {f.name for f in dataclasses.fields(flash_mla.FlashMLASchedMeta.Config)} == {
        "b", "s_q", "h_q", "page_block_size", "h_k", "causal", "is_fp8_kvcache", "topk", "extra_page_block_size",
        "extra_topk"}
    for name in ("get_mla_metadata", "flash_mla_with_kvcache", "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func",
                 "flash_attn_varlen_kvpacked_func", "flash_mla_sparse_fwd", "FlashMLASchedMeta"):
        assert name in flash_mla.__all__


# ----------------------------------------------------------------------------- semantics
def test_default_softmax_scale_is_d_qk_rsqrt():
    seqlens = [77, 200]
    q, k, bt, cs, values = make_case(seqlens, 1, 16)
    md, ns = flash_mla.get_mla_metadata(cs, 16, 1)
    out, lse = flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, md, ns)
    out_e, lse_e = flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, md, ns, softmax_scale=1 / 24)
    assert torch.equal(out, out_e) and torch.equal(lse, lse_e)
    out_v3, lse_v3 = flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, md, ns, 0.135234)
    check(out_v3, lse_v3, *attention_fp64(q, values, bt, seqlens, 0.135234, False))
    assert not torch.allclose(lse_v3, lse)


def test_unused_pages_and_sentinels_do_not_matter():
    """Same result whatever the unused pages hold (NaN, inf, random) and whatever the table holds past each
    sequence (FlashMLA's sentinel, -1, 1)."""
    seqlens = [65, 1, 128]
    q, k, bt, cs, _ = make_case(seqlens, 2, 16)
    md, ns = flash_mla.get_mla_metadata(cs, 32, 1)
    base = flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, md, ns, causal=True)
    k2 = torch.where(torch.isnan(k), torch.full_like(k, float("inf")), k)
    bt2 = bt.clone()
    bt2[bt2 == SENTINEL] = -1
    bt3 = bt.clone()
    bt3[bt3 == SENTINEL] = 1
    for kk, tt in ((k2, bt), (k, bt2), (torch.nan_to_num(k, nan=3.0), bt3)):
        got = flash_mla.flash_mla_with_kvcache(q, kk, tt, cs, DV, md, ns, causal=True)
        assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_zero_length_sequences(causal, fp8):
    """FlashMLA's corner case: some sequences of length 0 (out 0, lse +inf); causal with fewer tokens than
    s_q leaves the first queries with nothing to see."""
    seqlens = [0, 130, 0, 1, 67]
    q, k, bt, cs, values = make_case(seqlens, 2, 24, fp8=fp8)
    md, ns = flash_mla.get_mla_metadata(cs, 48, 1)
    out, lse = flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, md, ns, causal=causal, is_fp8_kvcache=fp8)
    ref = attention_fp64(q, values, bt, seqlens, D ** -0.5, causal)
    check(out, lse, *ref)
    assert bool(torch.isinf(lse[0]).all()) and bool((out[0] == 0).all())
    assert bool(torch.isinf(lse[3, :, 0]).all()) == causal


def test_empty_batch_and_all_empty():
    q = torch.randn(0, 1, 16, D).bfloat16()
    k = torch.zeros(2, 64, 1, D, dtype=torch.bfloat16)
    bt = torch.zeros(0, 1, dtype=torch.int32)
    cs = torch.zeros(0, dtype=torch.int32)
    md, ns = flash_mla.get_mla_metadata(cs, 16, 1)
    out, lse = flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, md, ns)
    assert out.shape == (0, 1, 16, DV) and lse.shape == (0, 16, 1)
    q, k, bt, cs, _ = make_case([0, 0, 0], 1, 16)
    sm, _ = flash_mla.get_mla_metadata()
    out, lse = flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, sm)
    assert bool((out == 0).all()) and bool(torch.isposinf(lse).all())


@pytest.mark.parametrize("view", ["float8_e4m3fn", "uint8", "int8"])
def test_fp8_cache_byte_views(view):
    """FlashMLA accepts the 656-byte cache as float8_e4m3fn, uint8 or int8: the same bytes, the same result."""
    seqlens = [100, 31]
    q, k, bt, cs, values = make_case(seqlens, 1, 32, fp8=True)
    assert k.stride(0) == 65 * 656, "pages 65 tokens apart, as FlashMLA's test builds the cache"
    md, ns = flash_mla.get_mla_metadata(cs, 32, 1, 32, True)
    out, lse = flash_mla.flash_mla_with_kvcache(q, k.view(getattr(torch, view)), bt, cs, DV, md, ns, is_fp8_kvcache=True)
    check(out, lse, *attention_fp64(q, values, bt, seqlens, D ** -0.5, False))


# ----------------------------------------------------------------------------- framework call sites
def test_sglang_decode_and_cuda_graph_buffers():
    """SGLang's FlashMLABackend: metadata from seq_lens with Q_LEN * num_q_heads; the CUDA-graph path copies
    it into buffers made for max_bs, passes num_splits[:bs + 1] and a slice of a table filled with 1; the
    cache is the token pool viewed as pages; keyword call, causal=True, the layer's scaling."""
    PAGE_SIZE, Q_LEN, H, max_bs, max_context_len = 64, 1, 16, 6, 700
    scaling = 0.1352
    seqlens = [300, 1, 64, 190]
    bs = len(seqlens)
    q, k, bt, cs, values = make_case(seqlens, Q_LEN, H)
    k_buffer = k.view(-1, 1, D)  # the pool: [tokens, 1, kv_cache_dim]
    cuda_graph_kv_indices = torch.full((max_bs, (max_context_len + PAGE_SIZE) // PAGE_SIZE), 1, dtype=torch.int32)
    max_seqlen_pad = _cdiv(max(seqlens), PAGE_SIZE)
    for i, n in enumerate(seqlens):
        cuda_graph_kv_indices[i, :_cdiv(n, 64)] = bt[i, :_cdiv(n, 64)]
    cuda_graph_mla_metadata, cuda_graph_num_splits = flash_mla.get_mla_metadata(
        torch.ones(max_bs, dtype=torch.int32), Q_LEN * H, 1)
    mla_metadata, num_splits = flash_mla.get_mla_metadata(cs.to(torch.int32), Q_LEN * H, 1)
    cuda_graph_mla_metadata.copy_(mla_metadata)
    cuda_graph_num_splits[: bs + 1].copy_(num_splits)
    reshape_q = q.view(bs, -1, H, D)
    o, _ = flash_mla.flash_mla_with_kvcache(
        q=reshape_q,
        k_cache=k_buffer.view(-1, PAGE_SIZE, 1, D),
        block_table=cuda_graph_kv_indices[:bs, :max_seqlen_pad],
        cache_seqlens=cs.to(torch.int32),
        head_dim_v=DV,
        tile_scheduler_metadata=cuda_graph_mla_metadata,
        num_splits=cuda_graph_num_splits[: bs + 1],
        softmax_scale=scaling,
        causal=True,
    )
    o = o.view(-1, H * DV)
    ref_out, ref_lse = attention_fp64(q, values, cuda_graph_kv_indices, seqlens, scaling, True)
    _, lse = flash_mla.flash_mla_with_kvcache(reshape_q, k, bt, cs, DV, mla_metadata, num_splits, scaling, True)
    check(o.view(bs, 1, H, DV), lse, ref_out, ref_lse)


def test_vllm_old_backend_with_cudagraph_buffers():
    """vLLM's v1 backend before FlashMLA's lazy interface: get_mla_metadata(seq_lens, num_q_heads, 1), the
    results copied into (num_sms, 8) / (max_num_seqs + 1) buffers, keyword call on the cache unsqueezed."""
    H, num_sms, max_num_seqs = 16, 132, 8
    seqlens = [5, 129, 64]
    q, k, bt, cs, values = make_case(seqlens, 1, H)
    kv_c_and_k_pe_cache = k.squeeze(2)
    tile_scheduler_metadata, num_splits = flash_mla.get_mla_metadata(cs, 1 * H, 1)
    cg_buf_tile_scheduler_metadata = torch.zeros((num_sms, 8), dtype=torch.int32)
    cg_buf_num_splits = torch.empty(max_num_seqs + 1, dtype=torch.int32)
    sm_parts = tile_scheduler_metadata.size(0)
    assert sm_parts <= cg_buf_tile_scheduler_metadata.size(0)
    view = cg_buf_tile_scheduler_metadata[:sm_parts]
    view.copy_(tile_scheduler_metadata)
    n = num_splits.size(0)
    ns_view = cg_buf_num_splits[:n]
    ns_view.copy_(num_splits)
    cg_buf_num_splits[n:].fill_(0)
    o, lse = flash_mla.flash_mla_with_kvcache(
        q=q, k_cache=kv_c_and_k_pe_cache.unsqueeze(-2), block_table=bt, cache_seqlens=cs, head_dim_v=DV,
        tile_scheduler_metadata=view, num_splits=ns_view, softmax_scale=0.125, causal=True)
    check(o, lse, *attention_fp64(q, values, bt, seqlens, 0.125, True))


def test_vllm_current_backend():
    """vLLM's current backend (FlashMLA's lazy interface): it passes the classic arguments, keeps only the
    first result and hands it back without num_splits, once per layer."""
    H, s_q = 32, 2
    seqlens = [40, 300]
    q, k, bt, cs, values = make_case(seqlens, s_q, H)
    num_q_tokens_per_head_k = s_q * H // 1
    scheduler_metadata, _ = flash_mla.get_mla_metadata(cs, num_q_tokens_per_head_k, 1, is_fp8_kvcache=False)
    plans = []
    for _layer in range(3):
        o, lse = flash_mla.flash_mla_with_kvcache(
            q=q, k_cache=k.squeeze(2).unsqueeze(-2), block_table=bt, cache_seqlens=cs, head_dim_v=DV,
            tile_scheduler_metadata=scheduler_metadata, softmax_scale=0.1, causal=True, is_fp8_kvcache=False)
        check(o, lse, *attention_fp64(q, values, bt, seqlens, 0.1, True))
        plans.append(getattr(scheduler_metadata, flash_mla._LAZY_ATTR).tile_scheduler_metadata)
    assert plans[0] is plans[1] is plans[2], "the first layer plans, the others reuse the plan"


def test_metadata_tensor_without_num_splits_is_a_lazy_handle():
    """Without num_splits the tensor is a handle: the schedule is planned by the first call from its own
    cache_seqlens (whatever the tensor holds), later calls must keep the first call's sizes and flags."""
    seqlens = [500, 3, 0, 129]
    q, k, bt, cs, values = make_case(seqlens, 1, 16)
    stale, _ = flash_mla.get_mla_metadata(torch.ones(4, dtype=torch.int32), 16, 1)
    stale.fill_(-7)
    out, lse = flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, stale)
    check(out, lse, *attention_fp64(q, values, bt, seqlens, D ** -0.5, False))
    with pytest.raises(ValueError, match="causal=False"):
        flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, stale, causal=True)
    fresh, _ = flash_mla.get_mla_metadata(cs, 16, 1)
    with pytest.raises(TypeError, match="'q'"):
        flash_mla.flash_mla_with_kvcache(q.float(), k, bt, cs, DV, fresh)
    assert getattr(fresh, flash_mla._LAZY_ATTR, None) is None, "a rejected call plans nothing"


def test_metadata_tensor_handle_kept_across_steps_never_uses_a_stale_plan():
    """A handle looks like classic metadata, which callers keep across steps (persistent buffers with the
    lengths written in place): its plan is reused only for the same, unwritten cache_seqlens tensor; an
    in-place update, another tensor or an untracked one (made under inference_mode) plans again, and each
    plan equals the classic metadata of the lengths at that call."""
    seqlens, new = [300, 200, 129], [64, 190, 0]
    q, k, bt, cs, values = make_case(seqlens, 1, 16)
    handle, _ = flash_mla.get_mla_metadata(cs, 16, 1)

    def plan():
        return getattr(handle, flash_mla._LAZY_ATTR)

    def classic(lens):
        return flash_mla.get_mla_metadata(torch.tensor(lens, dtype=torch.int32), 16, 1)

    flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, handle)
    p1 = plan()
    md1, ns1 = classic(seqlens)
    assert torch.equal(p1.tile_scheduler_metadata, md1) and torch.equal(p1.num_splits, ns1)
    flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, handle)
    assert plan() is p1, "same tensor, not written: the plan is reused (once per step, not per layer)"
    cs.copy_(torch.tensor(new, dtype=torch.int32))  # the next step's lengths, in place
    out, lse = flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, handle)
    check(out, lse, *attention_fp64(q, values, bt, new, D ** -0.5, False))
    p2 = plan()
    md2, ns2 = classic(new)
    assert p2 is not p1 and torch.equal(p2.tile_scheduler_metadata, md2) and torch.equal(p2.num_splits, ns2)
    assert not torch.equal(md2, md1), "the two steps' schedules differ (else this test proves nothing)"
    # a write through another view of the same storage bumps the shared version counter
    cs[:1].fill_(seqlens[0])
    flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, handle)
    p3 = plan()
    assert p3 is not p2 and torch.equal(p3.tile_scheduler_metadata, classic([300, 190, 0])[0])
    other = cs.clone()
    flash_mla.flash_mla_with_kvcache(q, k, bt, other, DV, handle)
    assert plan() is not p3, "another cache_seqlens tensor: planned again"
    with torch.inference_mode():
        untracked = cs.clone()
    plans = []
    for _ in range(2):
        flash_mla.flash_mla_with_kvcache(q, k, bt, untracked, DV, handle)
        plans.append(plan())
    assert plans[0] is not plans[1], "an inference tensor keeps no version counter: every call plans"


@pytest.mark.parametrize("initialized", [False, True])
def test_schedule_written_into_the_lazy_object_by_its_caller_is_replaced(initialized):
    """vLLM's batch-invariant mode writes FlashMLA's single-split schedule (one part over the whole batch,
    num_splits of zeros) into the lazy object: not dsmoe's format (zeros would leave every output
    unwritten on the GPU), so the module plans its own; its own plan is then reused."""
    seqlens = [70, 0, 300]
    q, k, bt, cs, values = make_case(seqlens, 1, 16)
    sm, _ = flash_mla.get_mla_metadata()
    if initialized:
        flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, sm, causal=True)
    B = q.shape[0]
    md = torch.zeros((1, 8), dtype=torch.int32)
    md[0, 2], md[0, 3] = B - 1, bt.shape[-1]
    sm.tile_scheduler_metadata, sm.num_splits = md, torch.zeros(B + 1, dtype=torch.int32)
    out, lse = flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, sm, causal=True)
    check(out, lse, *attention_fp64(q, values, bt, seqlens, D ** -0.5, True))
    ref_md, ref_ns = flash_mla.get_mla_metadata(cs, 16, 1)
    assert torch.equal(sm.tile_scheduler_metadata, ref_md) and torch.equal(sm.num_splits, ref_ns)
    mine = sm.tile_scheduler_metadata
    flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, sm, causal=True)
    assert sm.tile_scheduler_metadata is mine


# ----------------------------------------------------------------------------- unsupported and bad input
def _base():
    q, k, bt, cs, _ = make_case([70, 5], 1, 16)
    md, ns = flash_mla.get_mla_metadata(cs, 16, 1)
    return dict(q=q, k_cache=k, block_table=bt, cache_seqlens=cs, head_dim_v=DV, tile_scheduler_metadata=md,
                num_splits=ns)


@pytest.mark.parametrize("change,what", [
    ({"indices": torch.zeros(2, 1, 128, dtype=torch.int32)}, "indices"),
    ({"attn_sink": torch.zeros(16)}, "attn_sink"),
    ({"extra_k_cache": torch.zeros(1, 64, 1, 656, dtype=torch.uint8)}, "extra_k_cache"),
    ({"extra_indices_in_kvcache": torch.zeros(2, 1, 64, dtype=torch.int32)}, "extra_indices_in_kvcache"),
    ({"topk_length": torch.ones(2, dtype=torch.int32)}, "topk_length"),
    ({"extra_topk_length": torch.ones(2, dtype=torch.int32)}, "extra_topk_length"),
    ({"q": torch.zeros(2, 1, 16, D, dtype=torch.float16)}, "float16"),
    ({"q": torch.zeros(2, 1, 16, 512, dtype=torch.bfloat16)}, "512"),
    ({"k_cache": torch.zeros(4, 64, 2, D, dtype=torch.bfloat16)}, "num_heads_k=2"),
])
def test_unsupported_features_raise_not_implemented(change, what):
    args = {**_base(), **change}
    with pytest.raises(NotImplementedError, match=what) as e:
        flash_mla.flash_mla_with_kvcache(**args)
    assert "dense MLA decoding" in str(e.value)


def test_unsupported_entry_points_raise_not_implemented():
    cs = torch.ones(2, dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="sparse"):
        flash_mla.get_mla_metadata(cs, 128, 1, 128, True, 2048)
    with pytest.raises(NotImplementedError, match="num_heads_k=2"):
        flash_mla.get_mla_metadata(cs, 64, 2)
    z = torch.zeros(4, 1, 192, dtype=torch.bfloat16)
    i32 = torch.zeros(3, dtype=torch.int32)
    calls = [
        lambda: flash_mla.flash_mla_sparse_fwd(z, z, torch.zeros(4, 1, 64, dtype=torch.int32), 0.1),
        lambda: flash_mla.flash_mla_sparse_fwd(z, z, torch.zeros(4, 1, 64, dtype=torch.int32), 0.1, 512, None, None,
                                               indexer_topk=512),  # FlashMLA's newest signature
        lambda: flash_mla.flash_attn_varlen_func(z, z, z, i32, i32, 2, 2),
        lambda: flash_mla.flash_attn_varlen_qkvpacked_func(torch.zeros(4, 1, 576), i32, 2, 192),
        lambda: flash_mla.flash_attn_varlen_kvpacked_func(z, torch.zeros(4, 1, 384), i32, i32, 2, 2, 192),
    ]
    for c in calls:
        with pytest.raises(NotImplementedError, match="dense MLA decoding"):
            c()


def _bad_cases():
    i32 = torch.int32
    return [
        ({"q": torch.zeros(2, 1, 16, D)}, TypeError, "'q'"),
        ({"q": torch.zeros(2, 16, D, dtype=torch.bfloat16)}, ValueError, "'q'"),
        ({"q": torch.zeros(2, 1, 16, 320, dtype=torch.bfloat16)}, ValueError, "'q'.*576"),
        ({"q": torch.zeros(2, 0, 16, D, dtype=torch.bfloat16)}, ValueError, "'q'"),
        ({"q": torch.zeros(2, 1, 16, 2 * D, dtype=torch.bfloat16)[..., ::2]}, ValueError, "'q'"),
        ({"k_cache": torch.zeros(4, 32, 1, D, dtype=torch.bfloat16)}, ValueError, "'k_cache'.*64"),
        ({"k_cache": torch.zeros(4, 64, 1, 656, dtype=torch.float8_e4m3fn)}, TypeError, "is_fp8_kvcache=True"),
        ({"k_cache": torch.zeros(4, 64, 1, D, dtype=torch.bfloat16), "is_fp8_kvcache": True}, TypeError, "'k_cache'"),
        ({"k_cache": torch.zeros(4, 64, 1, D, dtype=torch.uint8), "is_fp8_kvcache": True}, ValueError, "656"),
        ({"k_cache": torch.zeros(4, 64, 1, 320, dtype=torch.bfloat16)}, ValueError, "'k_cache'"),
        ({"k_cache": torch.zeros(4, 64, 1, D)}, TypeError, "'k_cache'"),
        ({"head_dim_v": 576}, ValueError, "'head_dim_v'"),
        ({"block_table": torch.zeros(3, 4, dtype=i32)}, ValueError, "'block_table'"),
        ({"block_table": torch.zeros(2, 4, dtype=torch.int64)}, TypeError, "'block_table'"),
        ({"block_table": None}, ValueError, "'block_table'"),
        ({"cache_seqlens": torch.tensor([70, 5])}, TypeError, "'cache_seqlens'"),
        ({"cache_seqlens": torch.tensor([70, 5, 1], dtype=i32)}, ValueError, "'cache_seqlens'"),
        ({"cache_seqlens": torch.tensor([70, -1], dtype=i32)}, ValueError, "'cache_seqlens'"),
        ({"cache_seqlens": torch.tensor([70, 100000], dtype=i32)}, ValueError, "'cache_seqlens'"),
        ({"num_splits": torch.zeros(5, dtype=i32)}, ValueError, "'num_splits'"),
        ({"tile_scheduler_metadata": [0] * 8}, TypeError, "'tile_scheduler_metadata'"),
        ({"tile_scheduler_metadata": torch.zeros(132, 4, dtype=i32)}, ValueError, "'tile_scheduler_metadata'"),
        ({"softmax_scale": -1.0}, ValueError, "'softmax_scale'"),
        ({"softmax_scale": float("nan")}, ValueError, "'softmax_scale'"),
        ({"causal": "yes"}, TypeError, "'causal'"),
        ({"is_fp8_kvcache": 1}, TypeError, "'is_fp8_kvcache'"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_cases())))
def test_bad_input_names_the_argument(i):
    change, exc, pattern = _bad_cases()[i]
    args = {**_base(), **change}
    with pytest.raises(exc, match=pattern):
        flash_mla.flash_mla_with_kvcache(**args)


def test_bad_block_id_and_bad_metadata_arguments():
    args = _base()
    args["block_table"] = args["block_table"].clone()
    args["block_table"][1, 0] = 10 ** 6
    with pytest.raises(ValueError, match="'block_table'"):
        flash_mla.flash_mla_with_kvcache(**args)
    cs = torch.ones(2, dtype=torch.int32)
    for a, kw, exc, pat in [
        ((cs, 0, 1), {}, ValueError, "'num_q_tokens_per_head_k'"),
        ((cs, 16.0, 1), {}, ValueError, "'num_q_tokens_per_head_k'"),
        ((cs, 16, 0), {}, ValueError, "'num_heads_k'"),
        ((cs, 16, 1, 3), {}, ValueError, "'num_heads_q'"),
        ((cs.long(), 16, 1), {}, TypeError, "'cache_seqlens'"),
        ((cs, 16), {}, TypeError, "num_heads_k"),
        ((cs,), {"num_q_tokens_per_head_k": 16, "num_heads_per_head_k": 16, "num_heads_k": 1}, TypeError, "both"),
        ((cs, 16, 1), {"bogus": 1}, TypeError, "bogus"),
    ]:
        with pytest.raises(exc, match=pat):
            flash_mla.get_mla_metadata(*a, **kw)


# ----------------------------------------------------------------------------- GPU tier: the kernels
GPU_CASES = [  # b, s_q, h_q, seqlens, causal, fp8, lazy
    (4, 1, 128, [4096, 20, 0, 140], False, False, False),
    (6, 2, 128, [300, 0, 4100, 2, 65, 1000], True, False, True),
    (3, 2, 63, [1, 640, 129], True, True, False),
    (5, 1, 16, [77, 2000, 0, 64, 3], False, True, True),
    (16, 2, 3, None, True, False, False),
    (4, 2, 64, [700, 1, 0, 129], True, "fp32", True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("b,s_q,h_q,seqlens,causal,fp8,lazy", GPU_CASES)
def test_gpu_decode_matches_fp64(b, s_q, h_q, seqlens, causal, fp8, lazy):
    seqlens = seqlens or _seqlens(b, s_q, 1000, zero=True)
    q, k, bt, cs, values = make_case(seqlens, s_q, h_q, fp8=fp8, flashmla_dist=True, device=DEV)
    if lazy:
        md, ns = flash_mla.get_mla_metadata()
    else:
        md, ns = flash_mla.get_mla_metadata(cs, s_q * h_q, 1, h_q, bool(fp8), None)
    out, lse = flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, md, ns, causal=causal, is_fp8_kvcache=bool(fp8))
    sync()
    assert out.device == q.device and lse.device == q.device
    check(out, lse, *attention_fp64(q, values, bt, seqlens, D ** -0.5, causal), gpu=True)


@pytest.mark.gpu
@pytest.mark.cuda_only
def test_gpu_cuda_graph_sglang_replay():
    """SGLang's CUDA-graph decode: capture the call on persistent buffers, then replay for new lengths with
    the metadata recomputed outside and copied in (no host sync inside the captured call)."""
    H, bs = 16, 4
    seqlens = [100, 5000, 0, 64]
    q, k, bt, cs, values = make_case(seqlens, 1, H, flashmla_dist=True, device=DEV)
    md_buf, ns_buf = flash_mla.get_mla_metadata(torch.ones(bs, dtype=torch.int32, device=DEV), H, 1)
    md, ns = flash_mla.get_mla_metadata(cs, H, 1)
    md_buf.copy_(md)
    ns_buf.copy_(ns)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, md_buf, ns_buf, causal=True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out_g, lse_g = flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, md_buf, ns_buf, causal=True)
    out_g.fill_(float("nan"))
    g.replay()
    sync()
    check(out_g, lse_g, *attention_fp64(q, values, bt, seqlens, D ** -0.5, True), gpu=True)
    new = [64, 100, 0, 1]  # each new length within what the sequence's pages hold
    cs.copy_(torch.tensor(new, dtype=torch.int32))
    md, ns = flash_mla.get_mla_metadata(cs, H, 1)
    md_buf.copy_(md)
    ns_buf.copy_(ns)
    g.replay()
    sync()
    check(out_g, lse_g, *attention_fp64(q, values, bt, new, D ** -0.5, True), gpu=True)


@pytest.mark.gpu
@pytest.mark.cuda_only
@pytest.mark.parametrize("handle", [False, True])
def test_gpu_cuda_graph_lazy_metadata_planned_inside_capture(handle):
    """The lazy interface under capture (as frameworks use it): a fresh FlashMLASchedMeta (or, as vLLM's
    current backend passes it, a metadata tensor without num_splits) whose first call is captured records
    the planning too, so every replay plans from the live cache_seqlens."""
    H = 32
    seqlens = [300, 0, 4000, 65]
    q, k, bt, cs, values = make_case(seqlens, 2, H, flashmla_dist=True, device=DEV)
    warm, _ = flash_mla.get_mla_metadata()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, warm, causal=True)
    torch.cuda.current_stream().wait_stream(s)
    sched, _ = flash_mla.get_mla_metadata(cs, 2 * H, 1) if handle else flash_mla.get_mla_metadata()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out_g, lse_g = flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, sched, causal=True)
    assert (getattr(sched, flash_mla._LAZY_ATTR) if handle else sched).have_initialized
    for lens in (seqlens, [64, 0, 1, 2]):
        cs.copy_(torch.tensor(lens, dtype=torch.int32))
        out_g.fill_(float("nan"))
        g.replay()
        sync()
        check(out_g, lse_g, *attention_fp64(q, values, bt, lens, D ** -0.5, True), gpu=True)


@pytest.mark.gpu
@pytest.mark.cuda_only
def test_gpu_metadata_handle_kept_across_steps_and_captures():
    """One metadata tensor, passed without num_splits, kept for every step: eager steps with the lengths
    written in place, a warm-up call with it before capture (the capture must record its own planning),
    an eager call right after capture (the captured plan's buffers are not written until a replay)."""
    H = 32
    seqlens = [300, 0, 4000, 65]
    q, k, bt, cs, values = make_case(seqlens, 2, H, flashmla_dist=True, device=DEV)
    handle, _ = flash_mla.get_mla_metadata(cs, 2 * H, 1)

    def eager(lens):
        cs.copy_(torch.tensor(lens, dtype=torch.int32))
        out, lse = flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, handle, causal=True)
        sync()
        check(out, lse, *attention_fp64(q, values, bt, lens, D ** -0.5, True), gpu=True)

    eager(seqlens)
    eager([64, 0, 1, 2])
    eager(seqlens)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, handle, causal=True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out_g, lse_g = flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, handle, causal=True)
    out, lse = flash_mla.flash_mla_with_kvcache(q, k, bt, cs, DV, handle, causal=True)  # before any replay
    sync()
    check(out, lse, *attention_fp64(q, values, bt, seqlens, D ** -0.5, True), gpu=True)
    for lens in ([1, 0, 3000, 64], seqlens):
        cs.copy_(torch.tensor(lens, dtype=torch.int32))
        out_g.fill_(float("nan"))
        g.replay()
        sync()
        check(out_g, lse_g, *attention_fp64(q, values, bt, lens, D ** -0.5, True), gpu=True)
