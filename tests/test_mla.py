"""CPU tests of the MLA decode family: references, schedule, paging, FP8 cache, append, bad inputs,
torch.library / torch.compile integration. (GPU tests: tests/test_mla_gpu.py.)"""
from __future__ import annotations

import math

import pytest
import torch

from dsmoe import ops, ref
from dsmoe.ops import mla as ops_mla
from test_mla_util import HUGE_BLOCK_ID, dense_attention, gather_rows, lse_close, make_paged_cache
from util import calc_diff

SCALE = 0.135234


def _run(seqlens, s_q, H, causal, fp8=False, num_sms=132):
    cache, bt, cs, kv = make_paged_cache(seqlens, fp8=fp8)
    B = len(seqlens)
    q = torch.randn(B, s_q, H, 576).bfloat16()
    md, ns = ops.get_mla_metadata(cs, s_q * H, 1, num_sms=num_sms)
    out, lse = ops.mla_decode_with_kvcache(q, cache, bt, cs, 512, md, ns, SCALE, causal)
    return q, cache, bt, cs, kv, md, ns, out, lse


# ----------------------------------------------------------------------------- references
@pytest.mark.parametrize("causal", [False, True])
def test_absorbed_matches_unabsorbed(causal):
    H, s_q = 3, 2
    seqlens = [0, 1, 77, 200]
    cache, bt, cs, _ = make_paged_cache(seqlens)
    w_kv_b = torch.randn(H * 256, 512) / math.sqrt(512)
    q_nope = torch.randn(len(seqlens), s_q, H, 128)
    q_rope = torch.randn(len(seqlens), s_q, H, 64)
    out_n, lse_n = ref.mla_decode_unabsorbed(q_nope, q_rope, cache, bt, cs, w_kv_b, SCALE, causal)
    q_abs = ref.mla_absorb_q(q_nope, q_rope, w_kv_b)
    o_lat, lse_a = ref.mla_decode_with_kvcache(q_abs, cache, bt, cs, 512, SCALE, causal)
    out_a = ref.mla_unabsorb_out(o_lat, w_kv_b)
    assert o_lat.dtype == torch.float32
    assert calc_diff(out_a, out_n) < 1e-10
    assert (out_a - out_n).abs().max() < 1e-4
    assert lse_close(lse_a, lse_n, 1e-5)
    assert torch.isinf(lse_a[0]).all() and (out_a[0] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s_q,H", [(1, 1), (2, 3), (4, 63), (1, 16), (2, 5)])
def test_decode_matches_dense(s_q, H, causal):
    # varlen, a zero-length sequence, partial pages, causal with seqlen < s_q
    seqlens = [0, 1, 3, 64, 65, 130, 257]
    q, cache, bt, cs, kv, md, ns, out, lse = _run(seqlens, s_q, H, causal)
    ref_o, ref_l = dense_attention(q, gather_rows(kv, bt, seqlens), seqlens, SCALE, causal)
    assert out.shape == (7, s_q, H, 512) and out.dtype == torch.bfloat16
    assert lse.shape == (7, H, s_q) and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert calc_diff(out, ref_o) < 1e-5
    assert ((out.double() - ref_o).abs() <= 1e-5 + 2**-8 * ref_o.abs()).all()  # one bf16 rounding
    assert lse_close(lse, ref_l, 1e-5)
    assert (out[0] == 0).all() and torch.isposinf(lse[0]).all()
    if causal and s_q > 1:  # seqlen 1 < s_q: the first queries see nothing
        assert torch.isposinf(lse[1, :, : s_q - 1]).all() and (out[1, : s_q - 1] == 0).all()
        assert torch.isfinite(lse[1, :, s_q - 1]).all()


def test_decode_ignores_unused_pages_and_slots():
    seqlens = [5, 70]
    q, cache, bt, cs, kv, md, ns, out, lse = _run(seqlens, 1, 4, False)
    assert torch.isnan(kv[bt[0, 0].long(), 5:]).all()          # tail of a partial page is NaN
    assert (bt[:, -1] == HUGE_BLOCK_ID).all()
    assert torch.isfinite(out.float()).all() and torch.isfinite(lse).all()


# ----------------------------------------------------------------------------- any MLA sizes
def _small_cache(seqlens, D, gen=None):
    """A paged bf16 cache with D values per token (NaN in unused pages and slots), from the 576 builder."""
    cache, bt, cs, kv = make_paged_cache(seqlens, gen=gen)
    return cache[..., :D].contiguous(), bt, cs


def _dense_any(q, cache, bt, seqlens, dv, scale, causal):
    """fp64 masked softmax over each sequence's gathered rows, any d_qk / d_v (independent of dsmoe.ref)."""
    B, s_q, H, D = q.shape
    out = torch.zeros(B, s_q, H, dv, dtype=torch.float64)
    lse = torch.full((B, H, s_q), float("inf"), dtype=torch.float64)
    for b, n in enumerate(seqlens):
        k = cache[bt[b, : -(-n // 64)].long()].reshape(-1, D)[:n].double()
        for i in range(s_q):
            lim = max(0, min(n - s_q + i + 1 if causal else n, n))
            if lim:
                s = q[b, i].double() @ k[:lim].T * scale
                out[b, i] = torch.softmax(s, -1) @ k[:lim, :dv]
                lse[b, :, i] = torch.logsumexp(s, -1)
    return out, lse


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L,R,H", [(64, 16, 4), (32, 8, 3), (33, 6, 5), (7, 2, 1), (48, 0, 2), (512, 64, 129)])
def test_decode_any_mla_sizes(L, R, H, causal):
    """The latent width (head_dim_v), rope width and head count are free on the reference path (the small
    models' decode path); checked against a plain masked softmax in fp64."""
    seqlens = [0, 1, 5, 64, 70, 130]
    s_q = 3
    cache, bt, cs = _small_cache(seqlens, L + R)
    q = torch.randn(len(seqlens), s_q, H, L + R).bfloat16()
    md, ns = ops.get_mla_metadata(cs, s_q * H)
    out, lse = ops.mla_decode_with_kvcache(q, cache, bt, cs, L, md, ns, 0.3, causal)
    ref_o, ref_l = _dense_any(q, cache, bt, seqlens, L, 0.3, causal)
    assert out.shape == (len(seqlens), s_q, H, L) and out.dtype == torch.bfloat16 and not torch.isnan(out).any()
    assert ((out.double() - ref_o).abs() <= 1e-5 + 2**-8 * ref_o.abs()).all()   # one bf16 rounding
    assert lse_close(lse, ref_l, 1e-5)
    assert (out[0] == 0).all() and torch.isposinf(lse[0]).all()


@pytest.mark.parametrize("causal", [False, True])
def test_absorbed_matches_unabsorbed_small_sizes(causal):
    H, s_q, d_nope, d_v, L, R = 3, 2, 16, 12, 32, 8
    seqlens = [0, 3, 77]
    cache, bt, cs = _small_cache(seqlens, L + R)
    w_kv_b = torch.randn(H * (d_nope + d_v), L) / math.sqrt(L)
    q_nope = torch.randn(len(seqlens), s_q, H, d_nope)
    q_rope = torch.randn(len(seqlens), s_q, H, R)
    out_n, lse_n = ref.mla_decode_unabsorbed(q_nope, q_rope, cache, bt, cs, w_kv_b, 0.2, causal)
    q_abs = ref.mla_absorb_q(q_nope, q_rope, w_kv_b)
    assert q_abs.shape == (len(seqlens), s_q, H, L + R)
    o_lat, lse_a = ref.mla_decode_with_kvcache(q_abs, cache, bt, cs, L, 0.2, causal)
    out_a = ref.mla_unabsorb_out(o_lat, w_kv_b, d_nope)
    assert out_a.shape == out_n.shape == (len(seqlens), s_q, H, d_v)
    assert (out_a - out_n).abs().max() < 1e-4 and lse_close(lse_a, lse_n, 1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_append_small_sizes_fused(interleaved):
    L, R = 64, 16
    cache, bt, cs = _small_cache([12, 70], L + R)
    before = cache.clone()
    bids = torch.tensor([0, 1, 1], dtype=torch.int32)
    pos = torch.tensor([11, 69, -1], dtype=torch.int32)
    lat, kr = torch.randn(3, L).bfloat16(), torch.randn(3, R).bfloat16()
    w = (torch.rand(L) + 0.5).bfloat16()
    ang = torch.rand(3, R // 2) * 6
    ops.mla_kvcache_append(cache, bt, bids, pos, lat, kr, norm_weight=w, cos=ang.cos(), sin=ang.sin(),
                           rope_interleaved=interleaved)
    xf = lat.float()
    want_lat = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    k = kr.float()
    if interleaved:
        want_kr = _rope_complex_any(kr, ang.cos(), ang.sin())
    else:
        a, b = k[:, : R // 2], k[:, R // 2:]
        want_kr = torch.cat([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], -1).bfloat16()
    for t in range(2):
        b_, p = int(bids[t]), int(pos[t])
        got = cache[int(bt[b_, p // 64]), p % 64, 0]
        torch.testing.assert_close(got[:L].float(), want_lat[t].float(), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(got[L:].float(), want_kr[t].float(), rtol=1e-2, atol=1e-2)
        cache[int(bt[b_, p // 64]), p % 64, 0] = before[int(bt[b_, p // 64]), p % 64, 0]
    assert torch.equal(cache.view(torch.int16), before.view(torch.int16)), "nothing else is written"


def _rope_complex_any(x, cos, sin):
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * torch.complex(cos, sin)).flatten(-2).to(x.dtype)


def test_small_sizes_bad_inputs():
    cache, bt, cs = _small_cache([10, 70], 80)
    q = torch.randn(2, 1, 2, 80).bfloat16()
    md, ns = ops.get_mla_metadata(cs, 2)
    with pytest.raises(ValueError, match=r"argument 'q': head dim \(last\) must equal argument 'kv_cache''s last dim"):
        ops.mla_decode_with_kvcache(torch.randn(2, 1, 2, 72).bfloat16(), cache, bt, cs, 64, md, ns, SCALE)
    with pytest.raises(ValueError, match=r"argument 'head_dim_v' must be an int in \[1, 80\]"):
        ops.mla_decode_with_kvcache(q, cache, bt, cs, 81, md, ns, SCALE)
    bids, pos = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([10, 70], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"argument 'latent' must have shape \(2, 64\), got \(2, 60\)"):
        ops.mla_kvcache_append(cache, bt, bids, pos, torch.randn(2, 60).bfloat16(), torch.randn(2, 16).bfloat16())
    with pytest.raises(ValueError, match=r"argument 'norm_weight' must have shape \(64,\)"):
        ops.mla_kvcache_append(cache, bt, bids, pos, torch.randn(2, 64).bfloat16(), torch.randn(2, 16).bfloat16(),
                               norm_weight=torch.ones(512))
    with pytest.raises(ValueError, match=r"argument 'cos' must have shape \(2, 8\)"):
        ops.mla_kvcache_append(cache, bt, bids, pos, torch.randn(2, 64).bfloat16(), torch.randn(2, 16).bfloat16(),
                               cos=torch.ones(2, 32), sin=torch.ones(2, 32))
    with pytest.raises(ValueError, match=r"RoPE \(cos/sin given\) needs an even width"):
        ops.mla_kvcache_append(cache[..., :79].contiguous(), bt, bids, pos, torch.randn(2, 64).bfloat16(),
                               torch.randn(2, 15).bfloat16(), cos=torch.ones(2, 7), sin=torch.ones(2, 7))
    # the FP8 cache is the 576-value layout only
    fp8 = ops.mla_fp8_kvcache_empty(4)
    with pytest.raises(ValueError, match=r"argument 'q': head dim \(last\) must be 576 .* with an FP8 cache"):
        ops.mla_decode_with_kvcache(q, fp8, bt[:, :1], torch.tensor([1, 1], dtype=torch.int32), 64, md, ns, SCALE)
    with pytest.raises(ValueError, match=r"argument 'latent' must have shape \(2, 512\)"):
        ops.mla_kvcache_append(fp8, bt[:, :1].clamp(max=3), bids, torch.tensor([1, 2], dtype=torch.int32),
                               torch.randn(2, 64).bfloat16(), torch.randn(2, 64).bfloat16())


@pytest.mark.gpu
@pytest.mark.parametrize("L,R,H", [(64, 16, 4), (33, 6, 5)])
def test_cuda_tensors_of_other_sizes_take_the_reference(L, R, H):
    """On CUDA, sizes other than the kernel's (576/512) run the reference, with the same results as on CPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    seqlens = [0, 5, 130]
    cache, bt, cs = _small_cache(seqlens, L + R)
    q = torch.randn(3, 2, H, L + R).bfloat16()
    bids, pos = torch.tensor([1, 2], dtype=torch.int32), torch.tensor([4, 129], dtype=torch.int32)
    lat, kr = torch.randn(2, L).bfloat16(), torch.randn(2, R).bfloat16()
    res = []
    for dev in ("cpu", "cuda"):
        c = cache.to(dev)
        ops.mla_kvcache_append(c, bt.to(dev), bids.to(dev), pos.to(dev), lat.to(dev), kr.to(dev))
        md, ns = ops.get_mla_metadata(cs.to(dev), 2 * H)
        o, l_ = ops.mla_decode_with_kvcache(q.to(dev), c, bt.to(dev), cs.to(dev), L, md, ns, 0.3, True)
        res.append((c.cpu(), o.cpu(), l_.cpu()))
    assert torch.equal(res[0][0].view(torch.int16), res[1][0].view(torch.int16))
    o_cpu, o_gpu = res[0][1].double(), res[1][1].double()
    assert ((o_gpu - o_cpu).abs() <= 1e-5 + 2**-7 * o_cpu.abs()).all() and lse_close(res[0][2], res[1][2], 1e-5)


# ----------------------------------------------------------------------------- schedule
def _check_schedule(seqlens, md, ns, P):
    B = len(seqlens)
    md, ns = md.tolist(), ns.tolist()
    assert len(md) == P and len(ns) == B + 1 and ns[0] == 0
    assert ns[B] <= B + P - 1
    nblk = [-(-s // 64) for s in seqlens]
    covered = [[0] * n for n in nblk]
    visits = [0] * B
    split_ids = []
    for b0, blk0, b1, blk1, split0, *rest in md:
        assert rest == [0, 0, 0]
        if b1 < b0:
            continue
        for b in range(b0, b1 + 1):
            lo = blk0 if b == b0 else 0
            hi = min(blk1, nblk[b]) if b == b1 else nblk[b]
            local = split0 if b == b0 else 0
            assert 0 <= local < ns[b + 1] - ns[b]
            split_ids.append(ns[b] + local)
            visits[b] += 1
            for k in range(lo, hi):
                covered[b][k] += 1
    assert all(c == 1 for row in covered for c in row), "every block exactly once"
    assert all(v >= 1 for v in visits), "every sequence visited (zero-length ones write out=0)"
    assert sorted(split_ids) == list(range(ns[B])), "split indices are a permutation"
    for b in range(B):
        assert visits[b] == ns[b + 1] - ns[b]


@pytest.mark.parametrize("num_sms", [1, 7, 132])
@pytest.mark.parametrize("seqlens", [[0], [1], [32768], [0, 0, 0], [5, 0, 4096, 64, 65, 1, 8000, 0, 300],
                                     [127] * 19, [0] * 5 + [2048]])
def test_metadata_schedule(seqlens, num_sms):
    cs = torch.tensor(seqlens, dtype=torch.int32)
    md, ns = ops.get_mla_metadata(cs, 16, 1, num_sms=num_sms)
    assert md.dtype == torch.int32 and ns.dtype == torch.int32
    _check_schedule(seqlens, md, ns, ref.mla_num_sm_parts(num_sms, 16, 1))


def test_num_sm_parts():
    assert ref.mla_num_sm_parts(132, 16, 1) == 132
    assert ref.mla_num_sm_parts(132, 128, 1) == 66
    assert ref.mla_num_sm_parts(132, 256, 1) == 33
    assert ref.mla_num_sm_parts(1, 256, 1) == 1


@pytest.mark.parametrize("num_sms", [3, 16, 132])
@pytest.mark.parametrize("causal", [False, True])
def test_split_computation_matches(num_sms, causal):
    seqlens = [0, 3, 700, 64, 1000, 129]
    H, s_q = 3, 2
    q, cache, bt, cs, kv, md, ns, out, lse = _run(seqlens, s_q, H, causal, num_sms=num_sms)
    assert int(ns[-1]) > len(seqlens) or num_sms == 3, "the test wants real splits"
    o2, l2 = ref.mla_decode_split(q, cache, bt, cs, 512, md, ns, SCALE, causal)
    assert calc_diff(o2, out) < 1e-5 and ((o2.float() - out.float()).abs() <= 2**-7 * out.float().abs() + 1e-5).all()
    assert lse_close(l2, lse, 1e-5)


# ----------------------------------------------------------------------------- FP8 cache
def test_fp8_layout_bytes():
    x = torch.randn(3, 576).bfloat16()
    x[1, :128] = 0
    q = ops.quantize_mla_kvcache_fp8(x)
    assert q.shape == (3, 656) and q.dtype == torch.float8_e4m3fn
    b = q.view(torch.uint8)
    scales = b[:, 512:528].contiguous().view(torch.float32)
    amax = x.float()[:, :512].reshape(3, 4, 128).abs().amax(-1)
    torch.testing.assert_close(scales, amax.clamp(min=1e-4) / 448, rtol=0, atol=0)
    assert torch.equal(b[:, 528:].contiguous().view(torch.bfloat16), x[:, 512:])
    e = b[:, :512].contiguous().view(torch.float8_e4m3fn).float()
    assert torch.equal(e, (x.float()[:, :512] / scales.repeat_interleave(128, 1)).clamp(-448, 448).to(torch.float8_e4m3fn).float())
    d = ops.dequantize_mla_kvcache_fp8(q)
    assert d.dtype == torch.bfloat16 and torch.equal(d[:, 512:], x[:, 512:])
    rel = (d.float()[:, :512] - x.float()[:, :512]).abs().max() / x.float()[:, :512].abs().max()
    assert rel < 0.07  # e4m3: 3 mantissa bits
    assert (d[1, :128] == 0).all()
    ue = ops.quantize_mla_kvcache_fp8(x, scale_ue8m0=True).view(torch.uint8)[:, 512:528].contiguous().view(torch.float32)
    assert torch.equal(torch.log2(ue), torch.log2(ue).round())


@pytest.mark.parametrize("causal", [False, True])
def test_fp8_cache_decode_matches_dequantized(causal):
    seqlens = [0, 17, 300, 64]
    s_q, H = 2, 3
    q, cache, bt, cs, kv, md, ns, out, lse = _run(seqlens, s_q, H, causal, fp8=True)
    assert cache.shape[-1] == 656
    deq = ops.dequantize_mla_kvcache_fp8(cache)
    out2, lse2 = ops.mla_decode_with_kvcache(q, deq, bt, cs, 512, md, ns, SCALE, causal)
    assert torch.equal(out, out2) and lse_close(lse, lse2, 1e-6)
    ref_o, ref_l = dense_attention(q, gather_rows(deq, bt, seqlens), seqlens, SCALE, causal)
    assert calc_diff(out, ref_o) < 1e-5 and lse_close(lse, ref_l, 1e-5)
    # vs the unquantized cache: only FP8 rounding
    ref_o32, _ = dense_attention(q, gather_rows(kv, bt, seqlens), seqlens, SCALE, causal)
    assert calc_diff(out, ref_o32) < 1e-2
    # uint8 view of the same bytes is accepted
    out3, _ = ops.mla_decode_with_kvcache(q, cache.view(torch.uint8), bt, cs, 512, md, ns, SCALE, causal)
    assert torch.equal(out, out3)


# ----------------------------------------------------------------------------- append
def _rope_complex(x, cos, sin):
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], 32, 2).contiguous())
    r = torch.view_as_real(xc * torch.complex(cos, sin)).flatten(-2)
    return r.to(x.dtype)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_append(fp8, fused):
    seqlens_after = [12, 2, 132]
    cache, bt, cs, kv = make_paged_cache(seqlens_after, fp8=fp8, extra_blocks=2)
    before = cache.view(torch.uint8).clone()
    # decode-style: 2 new tokens per sequence, then one padded (skipped) token
    bids = torch.tensor([0, 0, 1, 1, 2, 2, 2], dtype=torch.int32)
    pos = torch.tensor([10, 11, 0, 1, 130, 131, -1], dtype=torch.int32)
    T = bids.numel()
    lat = torch.randn(T, 512).bfloat16()
    kr = torch.randn(T, 64).bfloat16()
    kw = {}
    if fused:
        w = (torch.rand(512) + 0.5).bfloat16()
        ang = torch.rand(T, 32) * 6
        kw = dict(norm_weight=w, eps=1e-6, cos=torch.cos(ang), sin=torch.sin(ang))
    ops.mla_kvcache_append(cache, bt, bids, pos, lat, kr, **kw)
    want_lat = lat
    want_kr = kr
    if fused:
        xf = lat.float()
        want_lat = (w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16())
        want_kr = _rope_complex(kr, kw["cos"], kw["sin"])
    want = torch.cat([want_lat, want_kr], -1)
    after = cache.view(torch.uint8)
    written = torch.zeros(after.shape[:3], dtype=torch.bool)
    for t in range(T - 1):
        b, p = int(bids[t]), int(pos[t])
        blk, off = int(bt[b, p // 64]), p % 64
        written[blk, off] = True
        got = cache[blk, off, 0]
        if fp8:
            assert torch.equal(got.view(torch.uint8), ops.quantize_mla_kvcache_fp8(want[t]).view(torch.uint8))
        else:
            torch.testing.assert_close(got, want[t], rtol=0, atol=0) if not fused else \
                torch.testing.assert_close(got.float(), want[t].float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(after[~written], before[~written]), "nothing else is written"


def test_append_rope_styles():
    x = torch.randn(4, 64).bfloat16()
    ang = torch.rand(4, 32)
    c, s = torch.cos(ang), torch.sin(ang)
    a = ref.apply_rope(x, c, s, interleaved=True)
    torch.testing.assert_close(a, _rope_complex(x, c, s), rtol=0, atol=0)
    # NeoX style == interleaved style after de-interleaving (HF's rope_interleave=True path)
    perm = torch.cat([torch.arange(0, 64, 2), torch.arange(1, 64, 2)])
    b = ref.apply_rope(x[:, perm], c, s, interleaved=False)
    torch.testing.assert_close(b, a[:, perm], rtol=0, atol=0)


def test_append_then_decode():
    """The decode step the model runs: append s_q tokens, then causal decode over them."""
    s_q, H = 2, 4
    seqlens_after = [2, 66]
    cache, bt, cs, kv = make_paged_cache(seqlens_after)
    bids = torch.tensor([0, 0, 1, 1], dtype=torch.int32)
    pos = torch.tensor([0, 1, 64, 65], dtype=torch.int32)
    c_new = torch.randn(4, 576).bfloat16()
    ops.mla_kvcache_append(cache, bt, bids, pos, c_new[:, :512], c_new[:, 512:])
    q = torch.randn(2, s_q, H, 576).bfloat16()
    md, ns = ops.get_mla_metadata(cs, s_q * H)
    out, lse = ops.mla_decode_with_kvcache(q, cache, bt, cs, 512, md, ns, SCALE, True)
    rows = gather_rows(cache, bt, seqlens_after)
    assert torch.equal(rows[0], c_new[:2].float()) and torch.equal(rows[1][64:], c_new[2:].float())
    ref_o, ref_l = dense_attention(q, rows, seqlens_after, SCALE, True)
    assert calc_diff(out, ref_o) < 1e-5 and lse_close(lse, ref_l, 1e-5)


# ----------------------------------------------------------------------------- bad input
def _good(B=2, s_q=1, H=2):
    cache, bt, cs, _ = make_paged_cache([10, 70][:B] + [1] * max(0, B - 2))
    q = torch.randn(B, s_q, H, 576).bfloat16()
    md, ns = ops.get_mla_metadata(cs, s_q * H)
    return dict(q=q, kv_cache=cache, block_table=bt, cache_seqlens=cs, head_dim_v=512,
                tile_scheduler_metadata=md, num_splits=ns, softmax_scale=SCALE)


@pytest.mark.parametrize("mutate,exc,msg", [
    (lambda a: a.update(q=a["q"][..., :512].contiguous()), ValueError, "argument 'q': head dim"),
    (lambda a: a.update(q=a["q"].float()), TypeError, "argument 'q' must have dtype bfloat16"),
    (lambda a: a.update(q=a["q"][0]), ValueError, "argument 'q' must have 4 dims"),
    (lambda a: a.update(head_dim_v=577), ValueError, "argument 'head_dim_v' must be an int in [1, 576]"),
    (lambda a: a.update(head_dim_v=0), ValueError, "argument 'head_dim_v' must be an int in [1, 576]"),
    (lambda a: a.update(kv_cache=a["kv_cache"].view(-1, 32, 1, 576)), ValueError, "block size (dim 1) must be 64"),
    (lambda a: a.update(kv_cache=a["kv_cache"][..., :512].contiguous()), ValueError,
     "argument 'q': head dim (last) must equal argument 'kv_cache''s last dim"),
    (lambda a: a.update(kv_cache=a["kv_cache"].half()), TypeError, "argument 'kv_cache' must have dtype"),
    (lambda a: a.update(kv_cache=a["kv_cache"].expand(-1, -1, 2, -1)), ValueError, "number of KV heads"),
    (lambda a: a.update(block_table=a["block_table"].long()), TypeError, "argument 'block_table' must have dtype int32"),
    (lambda a: a.update(block_table=a["block_table"][:1]), ValueError, "argument 'block_table' must have shape (2, max_blocks)"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"][:1]), ValueError, "argument 'cache_seqlens' must have shape (2,)"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), TypeError, "argument 'cache_seqlens' must have dtype int32"),
    (lambda a: a.update(num_splits=a["num_splits"][:2]), ValueError, "argument 'num_splits' must have shape (3,)"),
    (lambda a: a.update(tile_scheduler_metadata=a["tile_scheduler_metadata"][:, :4]), ValueError, "tile_scheduler_metadata"),
    (lambda a: a.update(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (lambda a: a.update(cache_seqlens=torch.tensor([10, 64 * 3 + 1], dtype=torch.int32)), ValueError,
     "exceeds the block table's capacity"),
    (lambda a: a.update(cache_seqlens=torch.tensor([10, -1], dtype=torch.int32)), ValueError, "must be >= 0"),
    (lambda a: a["block_table"].__setitem__((1, 1), HUGE_BLOCK_ID), ValueError, "block id 1073741824 used by a sequence"),
    (lambda a: a["block_table"].__setitem__((0, 0), -3), ValueError, "block id -3"),
])
def test_decode_bad_inputs(mutate, exc, msg):
    a = _good()
    mutate(a)
    with pytest.raises(exc) as ei:
        ops.mla_decode_with_kvcache(**a)
    assert "dsmoe.mla_decode_with_kvcache" in str(ei.value) and msg in str(ei.value), str(ei.value)


def test_decode_kv_scales_rejected():
    a = _good()
    with pytest.raises(ValueError, match="kv_scales"):
        ops.mla_decode_with_kvcache(**a, kv_scales=torch.ones(1))


def test_metadata_bad_inputs():
    cs = torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(TypeError, match="cache_seqlens"):
        ops.get_mla_metadata(cs.long(), 16)
    with pytest.raises(ValueError, match="num_heads_k"):
        ops.get_mla_metadata(cs, 16, 2)
    with pytest.raises(ValueError, match="num_q_tokens_per_head_k"):
        ops.get_mla_metadata(cs, 0)
    # the kernels accept at most 8192 split parts (combine weights in <= 48 KB of shared memory)
    with pytest.raises(ValueError, match="argument 'num_sms': gives 8193 split parts, at most 8192"):
        ops.get_mla_metadata(cs, 16, num_sms=8193)
    md, ns = ops.get_mla_metadata(cs, 16, num_sms=8192)
    assert md.shape == (8192, 8) and int(ns[-1]) >= 2


def test_append_bad_inputs():
    cache, bt, cs, _ = make_paged_cache([10, 70])
    bids = torch.tensor([0, 1], dtype=torch.int32)
    pos = torch.tensor([10, 70], dtype=torch.int32)
    lat, kr = torch.randn(2, 512).bfloat16(), torch.randn(2, 64).bfloat16()
    op = ops.mla_kvcache_append
    with pytest.raises(ValueError, match="argument 'latent' must have shape"):
        op(cache, bt, bids, pos, lat[:, :256], kr)
    with pytest.raises(TypeError, match="argument 'k_rope' must have dtype bfloat16"):
        op(cache, bt, bids, pos, lat, kr.float())
    with pytest.raises(ValueError, match="'cos' and 'sin' must be given together"):
        op(cache, bt, bids, pos, lat, kr, cos=torch.ones(2, 32))
    with pytest.raises(ValueError, match="argument 'batch_ids': ids must be in"):
        op(cache, bt, torch.tensor([0, 2], dtype=torch.int32), pos, lat, kr)
    with pytest.raises(ValueError, match="argument 'positions': position 1000 exceeds"):
        op(cache, bt, bids, torch.tensor([10, 1000], dtype=torch.int32), lat, kr)
    # position 140 lies in block column 2 of sequence 1, which holds the huge sentinel id
    with pytest.raises(ValueError, match="block id 1073741824 used by a new token"):
        op(cache, bt, bids, torch.tensor([10, 140], dtype=torch.int32), lat, kr)
    # two tokens aimed at one slot (same sequence and position) would race on the GPU
    with pytest.raises(ValueError, match=r"2 tokens write the same cache slot"):
        op(cache, bt, torch.tensor([1, 1], dtype=torch.int32), torch.tensor([33, 33], dtype=torch.int32), lat, kr)
    # a skipped token (negative position) does not count
    op(cache, bt, torch.tensor([1, 1], dtype=torch.int32), torch.tensor([33, -1], dtype=torch.int32), lat, kr)


def test_check_block_table_env(monkeypatch):
    monkeypatch.delenv("DSMOE_CHECK_BLOCK_TABLE", raising=False)
    assert not ops_mla._check_enabled()
    monkeypatch.setenv("DSMOE_CHECK_BLOCK_TABLE", "1")
    assert ops_mla._check_enabled()
    monkeypatch.setenv("DSMOE_CHECK_BLOCK_TABLE", "0")
    assert not ops_mla._check_enabled()


# ----------------------------------------------------------------------------- torch.library / compile
def test_opcheck():
    a = _good(s_q=2, H=3)
    torch.library.opcheck(torch.ops.dsmoe.get_mla_metadata, (a["cache_seqlens"], 5))
    torch.library.opcheck(torch.ops.dsmoe.mla_decode_with_kvcache,
                          (a["q"], a["kv_cache"], a["block_table"], a["cache_seqlens"], a["tile_scheduler_metadata"],
                           a["num_splits"], 512, SCALE, True))
    bids = torch.tensor([0, 1], dtype=torch.int32)
    pos = torch.tensor([10, 70], dtype=torch.int32)
    ang = torch.rand(2, 32)
    torch.library.opcheck(torch.ops.dsmoe.mla_kvcache_append,
                          (a["kv_cache"].clone(), a["block_table"], bids, pos, torch.randn(2, 512).bfloat16(),
                           torch.randn(2, 64).bfloat16(), torch.ones(512).bfloat16(), torch.cos(ang), torch.sin(ang),
                           1e-6, True, False))


def test_torch_compile_fullgraph():
    a = _good(s_q=2, H=3)

    def step(q, kv, bt, cs, lat, kr, bids, pos):
        ops.mla_kvcache_append(kv, bt, bids, pos, lat, kr)
        md, ns = ops.get_mla_metadata(cs, q.shape[1] * q.shape[2])
        return ops.mla_decode_with_kvcache(q, kv, bt, cs, 512, md, ns, SCALE, causal=True)

    bids = torch.tensor([0, 1], dtype=torch.int32)
    pos = torch.tensor([9, 69], dtype=torch.int32)
    lat, kr = torch.randn(2, 512).bfloat16(), torch.randn(2, 64).bfloat16()
    kv1 = a["kv_cache"].clone()
    kv2 = a["kv_cache"].clone()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    o1, l1 = compiled(a["q"], kv1, a["block_table"], a["cache_seqlens"], lat, kr, bids, pos)
    o2, l2 = step(a["q"], kv2, a["block_table"], a["cache_seqlens"], lat, kr, bids, pos)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    assert torch.equal(kv1.view(torch.uint8), kv2.view(torch.uint8))


def test_registered():
    for name in ("get_mla_metadata", "mla_decode_with_kvcache", "mla_kvcache_append"):
        assert ops.OPS[name].family == "mla"
