"""GPU tests of the MLA decode kernels against the fp32 references (issue: Correctness section).

Caches have NaN in unused pages and in slots past each sequence; unused block_table entries hold a huge
id; block tables are random permutations. Random decode cases draw q as N(0, 1/16) against an N(0, 1)
cache (score std ~0.8 with SCALE): with N(0, 1) q the softmax is so sharp that the bf16 rounding of P
alone (which a correct kernel does, as FlashMLA does) moves 0.5-1.7% of the outputs past the bound.
Metrics: cosine diff < 1e-5, norm-relative error <= 4e-3, per element |err| <= one bf16 step of |ref|
(the two output roundings) + 2^-8 sum_i p_i |v_i| (twice the bound of the bf16 rounding of P), lse
relative error <= 1e-5. Outputs and lse are NaN-poisoned before they are written.

Validated without a GPU (DSMOE_TEST_GPU_ON_CPU=1, tools/mutation_check.py; docs/gpu.md has the table):
the random and one-hot decode tests fail under mla_decode_lse_off / _drop_row / _out_scale, the
determinism test under mla_decode_unwritten_lse, the append tests under mla_append_rope_sign,
_ignore_ue8m0, _stray_write and _latent_ulp."""
from __future__ import annotations

import random

import pytest
import torch

from dsmoe import ops, ref
from test_mla_util import HUGE_BLOCK_ID, dense_attention, gather_rows, lse_close, make_paged_cache
from util import DEV, calc_diff, digest, poison, poisoned_empty, rel_err, sync

pytestmark = pytest.mark.gpu
SCALE = 0.135234


def _seqlens(B, max_len, rng):
    choices = [0, 1, 63, 64, 65, 1000, max_len]
    return [rng.choice(choices) if i < len(choices) else rng.randint(0, max_len) for i in range(B)]


def _case(seqlens, s_q, H, causal, fp8=False):
    cache, bt, cs, kv = make_paged_cache(seqlens, fp8=fp8, device=DEV)
    B = len(seqlens)
    q = (torch.randn(B, s_q, H, 576, device=DEV) / 4).bfloat16()
    md, ns = ops.get_mla_metadata(cs, s_q * H, 1)
    out, lse = _decode_poisoned(q, cache, bt, cs, md, ns, causal)
    return q, cache, bt, cs, kv, md, ns, out, lse


def _decode_poisoned(q, cache, bt, cs, md, ns, causal):
    """The op with its outputs and split-KV workspaces allocated NaN-poisoned (see util.poisoned_empty)."""
    with poisoned_empty():
        return ops.mla_decode_with_kvcache(q, cache, bt, cs, 512, md, ns, SCALE, causal)


def _check(q, cache, bt, cs, out, lse, causal, fp8):
    # fp32 reference computed on the GPU (TF32 off) to keep the large cases fast
    torch.backends.cuda.matmul.allow_tf32 = False
    kv = ref.dequantize_mla_kvcache_fp8(cache) if fp8 else cache
    r_out, r_lse = ref.mla_decode_with_kvcache(q.float(), kv, bt, cs, 512, SCALE, causal)
    r_out32 = r_out.float().cpu().to(torch.bfloat16).float()
    r_lse = r_lse.cpu()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert calc_diff(out.cpu(), r_out32) < 1e-5
    assert rel_err(out.cpu(), r_out32) <= 4e-3  # both sides' bf16 output rounding: ~1.6e-3
    # Per element: one bf16 step of |ref| for the two output roundings, and the kernel's bf16 P (each
    # weight off by <= 2^-9 relative) moves out by <= 2^-9 * sum_i p_i |v_i|: allowed twice.
    absv = _softmax_abs_v(q, kv, bt, cs, causal).cpu()
    err = (out.cpu().float() - r_out32).abs()
    tol = 1e-5 + 2 ** -8 * r_out32.abs() + 2 ** -8 * absv
    assert (err <= tol).all(), f"max excess {float((err - tol).max())}"
    assert lse_close(lse, r_lse, 1e-5)


def _softmax_abs_v(q, kv, bt, cs, causal):
    """``sum_i p_i |v_i|`` per output element (fp32, from the reference's softmax): the scale of the error
    that rounding P to bf16 may cause."""
    from dsmoe.ref import mla as rm
    B, s_q, H, _ = q.shape
    res = torch.zeros(B, s_q, H, 512, device=q.device)
    for b, n in enumerate(cs.tolist()):
        if n <= 0:
            continue
        k = rm._gather_seq(kv, bt, b, n)
        lim = rm._limits(n, s_q, causal, q.device)
        sc = torch.einsum("qhd,nd->qhn", q[b].float(), k) * SCALE
        sc = sc.masked_fill(~(torch.arange(n, device=q.device).view(1, 1, n) < lim.view(-1, 1, 1)), float("-inf"))
        p = torch.softmax(sc, -1).nan_to_num(0.0)
        res[b] = torch.einsum("qhn,nd->qhd", p, k[:, :512].abs())
    return res


@pytest.mark.parametrize("B", [1, 2, 19, 128])
@pytest.mark.parametrize("s_q", [1, 2, 4])
@pytest.mark.parametrize("H", [1, 3, 16, 63, 64, 128])
def test_decode_bf16(B, s_q, H):
    rng = random.Random(B * 1000 + s_q * 10 + H)
    max_len = 32768 if B <= 2 else (4096 if B <= 19 else 1024)
    seqlens = _seqlens(B, max_len, rng)
    for causal in (False, True):
        q, cache, bt, cs, kv, md, ns, out, lse = _case(seqlens, s_q, H, causal)
        _check(q, cache, bt, cs, out, lse, causal, False)
        zero = [i for i, s in enumerate(seqlens) if s == 0]
        if zero:
            assert (out[zero] == 0).all() and torch.isposinf(lse[zero]).all()


@pytest.mark.parametrize("s_q,H", [(1, 16), (2, 64), (1, 128), (4, 3)])
def test_decode_fp8_cache(s_q, H):
    seqlens = [0, 1, 65, 4000, 777, 32768]
    for causal in (False, True):
        q, cache, bt, cs, kv, md, ns, out, lse = _case(seqlens, s_q, H, causal, fp8=True)
        _check(q, cache, bt, cs, out, lse, causal, True)


def test_metadata_matches_reference():
    rng = random.Random(0)
    for B in (1, 2, 19, 128, 3000):
        seqlens = [rng.choice([0, 1, 64, rng.randint(0, 40000)]) for _ in range(B)]
        cs = torch.tensor(seqlens, dtype=torch.int32, device=DEV)
        for tokens in (1, 16, 128, 256):
            md, ns = ops.get_mla_metadata(cs, tokens, 1)
            P = md.shape[0]
            rmd, rns = ref.get_mla_metadata(cs.cpu(), tokens, 1, P)
            assert torch.equal(md.cpu(), rmd) and torch.equal(ns.cpu(), rns)


def test_outputs_fully_written_and_deterministic():
    seqlens = [5, 0, 3000, 64, 129]
    cache, bt, cs, kv = make_paged_cache(seqlens, device=DEV)
    q = (torch.randn(5, 2, 63, 576, device=DEV) / 4).bfloat16()
    md, ns = ops.get_mla_metadata(cs, 2 * 63, 1)
    outs = []
    for _ in range(3):
        o, l = _decode_poisoned(q, cache, bt, cs, md, ns, True)
        assert not torch.isnan(o).any() and not torch.isnan(l).any(), "an output element was not written"
        outs.append((o, l))
    assert len({digest(o, l) for o, l in outs}) == 1, "reruns must be bitwise identical"


@pytest.mark.cuda_only
def test_cuda_graph_capture():
    seqlens = [100, 5000, 0, 64]
    cache, bt, cs, kv = make_paged_cache(seqlens, device=DEV)
    q = (torch.randn(4, 1, 16, 576, device=DEV) / 4).bfloat16()
    md, ns = ops.get_mla_metadata(cs, 16, 1)
    out_eager, lse_eager = ops.mla_decode_with_kvcache(q, cache, bt, cs, 512, md, ns, SCALE)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.mla_decode_with_kvcache(q, cache, bt, cs, 512, md, ns, SCALE)  # warm-up (sets smem attributes)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        md_g, ns_g = ops.get_mla_metadata(cs, 16, 1)
        out_g, lse_g = ops.mla_decode_with_kvcache(q, cache, bt, cs, 512, md_g, ns_g, SCALE)
    out_g.copy_(poison(out_g.shape, out_g.dtype, DEV))
    lse_g.copy_(poison(lse_g.shape, lse_g.dtype, DEV))
    g.replay()
    sync()
    assert torch.equal(out_g, out_eager) and torch.equal(lse_g, lse_eager)
    # new lengths, same shapes: replay follows the data (metadata recomputed inside the graph)
    cs.copy_(torch.tensor([64, 100, 1, 0], dtype=torch.int32))
    g.replay()
    sync()
    _check(q, cache, bt, cs, out_g, lse_g, False, False)


def _e4m3_step(v: torch.Tensor) -> torch.Tensor:
    """Spacing of the e4m3 grid at |v| (v in e4m3 units): 2^(e - 3) for normals, 2^-9 below 2^-6."""
    e = torch.floor(torch.log2(v.abs().clamp_min(2.0 ** -6)))
    return torch.exp2(e - 3)


def _appended_rows_close(got: torch.Tensor, want: torch.Tensor, fp8: bool, ue8m0: bool) -> None:
    """Appended rows [T, 576] bf16 or [T, 656] FP8 bytes of the kernel vs the reference, element by
    element: the fused RMSNorm / RoPE may round differently (fp32 sum order, FMA), by one bf16 step of
    the value, or, in FP8, one e4m3 step times the scale (the group amax may move by a bf16 step, so the
    scales are compared to 2^-7, and with ue8m0 must be powers of two)."""
    if not fp8:
        g, w = got.float(), want.float()
        tol = torch.exp2(torch.floor(torch.log2(w.abs().clamp_min(2.0 ** -126))) - 7)
        bad = (g - w).abs() > tol
        assert not bad.any(), f"{int(bad.sum())} values off by more than 1 bf16 step, e.g. {g[bad][:4]} vs {w[bad][:4]}"
        return
    gb, wb = got.view(torch.uint8), want.view(torch.uint8)
    gs = gb[:, 512:528].contiguous().view(torch.float32)
    ws = wb[:, 512:528].contiguous().view(torch.float32)
    if ue8m0:
        assert torch.equal(torch.exp2(torch.round(torch.log2(gs))), gs), f"ue8m0 scales must be powers of two: {gs}"
        assert ((gs / ws == 1) | (gs / ws == 2) | (gs / ws == 0.5)).all(), (gs, ws)
    else:
        assert ((gs - ws).abs() <= 2 ** -7 * ws.abs()).all(), (gs, ws)
    gq = gb[:, :512].contiguous().view(torch.float8_e4m3fn).float().view(-1, 4, 128)
    wq = wb[:, :512].contiguous().view(torch.float8_e4m3fn).float().view(-1, 4, 128)
    gv, wv = gq * gs[:, :, None], wq * ws[:, :, None]
    tol = _e4m3_step(wq) * torch.maximum(gs, ws)[:, :, None] + 2 ** -7 * wv.abs()
    bad = (gv - wv).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} latent values off by more than one e4m3 step"
    grope = gb[:, 528:].contiguous().view(torch.bfloat16)
    wrope = wb[:, 528:].contiguous().view(torch.bfloat16)
    _appended_rows_close(grope, wrope, False, False)


@pytest.mark.parametrize("fp8,ue8m0", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("fused", [False, True])
def test_append_matches_reference(fp8, ue8m0, fused):
    """Only the appended rows may change: unfused they equal the reference bit for bit; fused, element by
    element within one rounding step (_appended_rows_close). Every other byte of the cache (NaN-filled
    unused slots and pages, the other tokens) must be untouched. The cache's unused bytes are 0x7f / NaN,
    so no tolerance may be relative to the whole cache."""
    seqlens_after = [12, 2, 132, 4000]
    cache, bt, cs, kv = make_paged_cache(seqlens_after, fp8=fp8, device=DEV)
    bids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 2], dtype=torch.int32)
    pos = torch.tensor([10, 11, 0, 1, 130, 131, 3998, 3999, -1], dtype=torch.int32)
    T = bids.numel()
    keep = pos >= 0
    blk = bt.cpu()[bids[keep].long(), (pos[keep] // 64).long()].long()
    slot = (pos[keep] % 64).long()
    lat = torch.randn(T, 512).bfloat16() * 3
    kr = torch.randn(T, 64).bfloat16()
    kw = {}
    if fused:
        ang = torch.rand(T, 32) * 6
        kw = dict(norm_weight=(torch.rand(512) + 0.5).bfloat16(), cos=torch.cos(ang), sin=torch.sin(ang))
    for interleaved in (True, False):
        before = cache.cpu().view(torch.uint8).clone()
        cache_ref = cache.cpu().clone()
        ops.mla_kvcache_append(cache, bt, bids.to(DEV), pos.to(DEV), lat.to(DEV), kr.to(DEV), rope_interleaved=interleaved,
                               scale_ue8m0=ue8m0, **{k: v.to(DEV) for k, v in kw.items()})
        ref.mla_kvcache_append(cache_ref, bt.cpu(), bids, pos, lat, kr, rope_interleaved=interleaved, scale_ue8m0=ue8m0,
                               **kw)
        got = cache.cpu().view(torch.uint8)
        others = torch.ones(got.shape[:3], dtype=torch.bool)
        others[blk, slot, 0] = False
        assert torch.equal(got[others], before[others]), "bytes outside the appended rows changed"
        g_rows, w_rows = got[blk, slot, 0], cache_ref.view(torch.uint8)[blk, slot, 0]
        if not fused:
            assert torch.equal(g_rows, w_rows)
        else:
            dt = torch.uint8 if fp8 else torch.bfloat16
            _appended_rows_close(g_rows.view(dt), w_rows.view(dt), fp8, ue8m0)


def test_check_block_table_env_on_cuda(monkeypatch):
    cache, bt, cs, kv = make_paged_cache([10, 70], device=DEV)
    q = torch.randn(2, 1, 4, 576, device=DEV).bfloat16()
    md, ns = ops.get_mla_metadata(cs, 4, 1)
    bt[1, 1] = HUGE_BLOCK_ID
    monkeypatch.setenv("DSMOE_CHECK_BLOCK_TABLE", "1")
    with pytest.raises(ValueError, match="block id 1073741824 used by a sequence"):
        ops.mla_decode_with_kvcache(q, cache, bt, cs, 512, md, ns, SCALE)
    with pytest.raises(ValueError, match="exceeds the block table's capacity"):
        ops.mla_decode_with_kvcache(q, cache, bt, torch.tensor([10, 10000], dtype=torch.int32, device=DEV), 512,
                                    md, ns, SCALE)


@pytest.mark.cuda_only
def test_torch_compile_cuda():
    cache, bt, cs, kv = make_paged_cache([300, 7], device=DEV)
    q = torch.randn(2, 2, 16, 576, device=DEV).bfloat16()

    def step(q, kv, bt, cs):
        md, ns = ops.get_mla_metadata(cs, q.shape[1] * q.shape[2], 1)
        return ops.mla_decode_with_kvcache(q, kv, bt, cs, 512, md, ns, SCALE, causal=True)

    o1, l1 = torch.compile(step, fullgraph=True)(q, cache, bt, cs)
    o2, l2 = step(q, cache, bt, cs)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)


def _one_hot_case(seqlens, s_q, H, causal, fp8, num_sms, seed):
    """q row r (= i_q * H + h) has a single non-zero, 2048 at rope dim r % 64; cache token tau[b][m] has
    1 at rope dim m and every other token 0 there, and (causal) the last token has 2 there. Each row's
    softmax is then exactly one-hot (score gaps >= 277 natural units: exp underflows to 0, the max gives
    exp(0) = 1), so out must equal one cache row bit for bit. A wrong wgmma descriptor (the MN-major V
    operand, the K-major Q/K/P operands), swizzle, accumulator row/column mapping, causal mask, page
    order or split combine moves or mixes rows and breaks the equality."""
    gen = torch.Generator().manual_seed(seed)
    _, bt, cs, kv = make_paged_cache(seqlens, gen=gen)
    B = len(seqlens)
    rows = s_q * H
    expect_tok = torch.full((B, s_q, H), -1, dtype=torch.long)
    for b, n in enumerate(seqlens):
        if n == 0:
            continue
        toks = [(t // 64, t % 64) for t in range(n)]
        for blk, slot in toks:  # rope dims: zero for every real token, then the markers
            kv[int(bt[b, blk]), slot, 0, 512:] = 0
        hi = n - s_q + 1 if causal else n
        tau = torch.randint(0, hi, (64,), generator=gen)
        for m in range(64):
            t = int(tau[m])
            kv[int(bt[b, t // 64]), t % 64, 0, 512 + m] = 1
            if causal:
                kv[int(bt[b, (n - 1) // 64]), (n - 1) % 64, 0, 512 + m] = 2
        for r in range(rows):
            iq, h = divmod(r, H)
            see_last = not causal or iq == s_q - 1
            expect_tok[b, iq, h] = n - 1 if causal and see_last else int(tau[r % 64])
    q = torch.zeros(B, s_q, H, 576, dtype=torch.bfloat16)
    for r in range(rows):
        iq, h = divmod(r, H)
        q[:, iq, h, 512 + r % 64] = 2048.0
    if fp8:
        cache = ref.quantize_mla_kvcache_fp8(torch.nan_to_num(kv.float(), nan=0.0).bfloat16())
        cache.view(torch.uint8)[torch.isnan(kv.float()).any(-1)] = 0x7F
        vals = ref.dequantize_mla_kvcache_fp8(cache)
    else:
        cache, vals = kv, kv
    md, ns = ops.get_mla_metadata(cs.to(DEV), rows, 1, num_sms=num_sms)
    with poisoned_empty():  # out, lse and the split workspaces start NaN
        out, lse = ops.mla_decode_with_kvcache(q.to(DEV), cache.to(DEV), bt.to(DEV), cs.to(DEV), 512, md, ns, SCALE, causal)
    want = torch.zeros(B, s_q, H, 512, dtype=torch.bfloat16)
    for b in range(B):
        for iq in range(s_q):
            for h in range(H):
                t = int(expect_tok[b, iq, h])
                if t >= 0:
                    want[b, iq, h] = vals[int(bt[b, t // 64]), t % 64, 0, :512]
    r_out, r_lse = ref.mla_decode_with_kvcache(q, cache, bt, cs, 512, SCALE, causal)
    return out.cpu(), lse.cpu(), want, r_out, r_lse, int(ns[-1].item())


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("s_q,H,causal", [(1, 64, False), (1, 128, False), (2, 32, True), (4, 3, True), (2, 63, False)])
@pytest.mark.parametrize("num_sms", [1, 132])
def test_decode_one_hot_rows_exact(fp8, s_q, H, causal, num_sms):
    seqlens = [200, 0, 64, 7, 1000, 65] if not causal else [200, 0, 64, 7, 1000, 4]
    out, lse, want, r_out, r_lse, n_splits = _one_hot_case(seqlens, s_q, H, causal, fp8, num_sms, seed=s_q * 1000 + H)
    if num_sms == 132:
        assert n_splits > len(seqlens), "the case must exercise split-KV + combine"
    assert torch.equal(out, want), f"rows differ: {int((out != want).any(-1).sum())} of {out.shape[:3].numel()}"
    assert torch.equal(r_out, want), "the reference itself must be one-hot here"
    assert lse_close(lse, r_lse, 1e-5)


@pytest.mark.parametrize("fp8,ue8m0", [(False, False), (True, False), (True, True)])
def test_append_unfused_special_values_bit_exact(fp8, ue8m0):
    """Unfused append is a bit copy (bf16) or the reference quantization (FP8) for every input: NaN with
    payloads of either sign, +-inf, -0.0, denormals, in the latent and the rope part."""
    seqlens_after = [70, 3]
    cache, bt, cs, kv = make_paged_cache(seqlens_after, fp8=fp8, device=DEV)
    cache_ref = cache.cpu().clone()
    bids = torch.tensor([0, 0, 1], dtype=torch.int32)
    pos = torch.tensor([68, 69, 2], dtype=torch.int32)
    lat = torch.randn(3, 512).bfloat16()
    kr = torch.randn(3, 64).bfloat16()
    special = torch.tensor([0x7FC0, 0xFFC1, 0x7F81, 0x7F80, 0xFF80, 0x8000, 0x0001, 0x8003], dtype=torch.int32).to(torch.int16)
    lat.view(torch.int16)[0, 5:13] = special          # group 0 of token 0 holds NaN
    lat.view(torch.int16)[1, 300:304] = special[3:7]   # group 2 of token 1: +-inf, -0, denormal
    kr.view(torch.int16)[2, 10:18] = special
    ops.mla_kvcache_append(cache, bt, bids.to(DEV), pos.to(DEV), lat.to(DEV), kr.to(DEV), scale_ue8m0=ue8m0)
    ref.mla_kvcache_append(cache_ref, bt.cpu(), bids, pos, lat, kr, scale_ue8m0=ue8m0)
    assert torch.equal(cache.cpu().view(torch.uint8), cache_ref.view(torch.uint8))
