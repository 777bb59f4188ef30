"""GPU tests of the MLA decode kernels against the fp32 references (issue: Correctness section).

Caches have NaN in unused pages and in slots past each sequence; unused block_table entries hold a huge
id; block tables are random permutations. Metrics: cosine diff < 1e-5, max abs error <= 1e-3 (on
outputs of unit scale after the bf16 rounding the reference also applies), lse relative error <= 1e-5."""
from __future__ import annotations

import random

import pytest
import torch

from dsmoe import ops, ref
from test_mla_util import HUGE_BLOCK_ID, dense_attention, gather_rows, lse_close, make_paged_cache
from util import calc_diff, digest, poison

pytestmark = pytest.mark.gpu
SCALE = 0.135234


def _seqlens(B, max_len, rng):
    choices = [0, 1, 63, 64, 65, 1000, max_len]
    return [rng.choice(choices) if i < len(choices) else rng.randint(0, max_len) for i in range(B)]


def _case(seqlens, s_q, H, causal, fp8=False):
    cache, bt, cs, kv = make_paged_cache(seqlens, fp8=fp8, device="cuda")
    B = len(seqlens)
    q = torch.randn(B, s_q, H, 576, device="cuda").bfloat16()
    md, ns = ops.get_mla_metadata(cs, s_q * H, 1)
    out, lse = ops.mla_decode_with_kvcache(q, cache, bt, cs, 512, md, ns, SCALE, causal)
    return q, cache, bt, cs, kv, md, ns, out, lse


def _check(q, cache, bt, cs, out, lse, causal, fp8):
    # fp32 reference computed on the GPU (TF32 off) to keep the large cases fast
    torch.backends.cuda.matmul.allow_tf32 = False
    kv = ref.dequantize_mla_kvcache_fp8(cache) if fp8 else cache
    r_out, r_lse = ref.mla_decode_with_kvcache(q.float(), kv, bt, cs, 512, SCALE, causal)
    r_out32 = r_out.float().cpu().to(torch.bfloat16).float()
    r_lse = r_lse.cpu()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert calc_diff(out.cpu(), r_out32) < 1e-5
    # both outputs are bf16-rounded: allow one bf16 step on top of the 1e-3
    err = (out.cpu().float() - r_out32).abs()
    assert (err <= 1e-3 + 2 ** -8 * r_out32.abs()).all(), float(err.max())
    assert lse_close(lse, r_lse, 1e-5)


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
        cs = torch.tensor(seqlens, dtype=torch.int32, device="cuda")
        for tokens in (1, 16, 128, 256):
            md, ns = ops.get_mla_metadata(cs, tokens, 1)
            P = md.shape[0]
            rmd, rns = ref.get_mla_metadata(cs.cpu(), tokens, 1, P)
            assert torch.equal(md.cpu(), rmd) and torch.equal(ns.cpu(), rns)


def test_outputs_fully_written_and_deterministic():
    seqlens = [5, 0, 3000, 64, 129]
    cache, bt, cs, kv = make_paged_cache(seqlens, device="cuda")
    q = torch.randn(5, 2, 63, 576, device="cuda").bfloat16()
    md, ns = ops.get_mla_metadata(cs, 2 * 63, 1)
    outs = [ops.mla_decode_with_kvcache(q, cache, bt, cs, 512, md, ns, SCALE, True) for _ in range(3)]
    assert len({digest(o, l) for o, l in outs}) == 1, "reruns must be bitwise identical"


def test_cuda_graph_capture():
    seqlens = [100, 5000, 0, 64]
    cache, bt, cs, kv = make_paged_cache(seqlens, device="cuda")
    q = torch.randn(4, 1, 16, 576, device="cuda").bfloat16()
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
    out_g.copy_(poison(out_g.shape, out_g.dtype, "cuda"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out_g, out_eager) and torch.equal(lse_g, lse_eager)
    # new lengths, same shapes: replay follows the data (metadata recomputed inside the graph)
    cs.copy_(torch.tensor([64, 100, 1, 0], dtype=torch.int32))
    g.replay()
    torch.cuda.synchronize()
    _check(q, cache, bt, cs, out_g, lse_g, False, False)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_append_matches_reference(fp8, fused):
    seqlens_after = [12, 2, 132, 4000]
    cache, bt, cs, kv = make_paged_cache(seqlens_after, fp8=fp8, device="cuda")
    cache_ref = cache.cpu().clone()
    bids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 2], dtype=torch.int32)
    pos = torch.tensor([10, 11, 0, 1, 130, 131, 3998, 3999, -1], dtype=torch.int32)
    T = bids.numel()
    lat = torch.randn(T, 512).bfloat16() * 3
    kr = torch.randn(T, 64).bfloat16()
    kw = {}
    if fused:
        ang = torch.rand(T, 32) * 6
        kw = dict(norm_weight=(torch.rand(512) + 0.5).bfloat16(), cos=torch.cos(ang), sin=torch.sin(ang))
    for interleaved in (True, False):
        ops.mla_kvcache_append(cache, bt, bids.cuda(), pos.cuda(), lat.cuda(), kr.cuda(), rope_interleaved=interleaved,
                               **{k: v.cuda() for k, v in kw.items()})
        ops.mla_kvcache_append(cache_ref, bt.cpu(), bids, pos, lat, kr, rope_interleaved=interleaved, **kw)
        got, want = cache.cpu().view(torch.uint8), cache_ref.view(torch.uint8)
        if not fused:
            assert torch.equal(got, want)
        else:  # fp32 sum order / FMA may move a value by one bf16 (or e4m3) step
            g = ref.dequantize_mla_kvcache_fp8(cache.cpu()) if fp8 else cache.cpu()
            w = ref.dequantize_mla_kvcache_fp8(cache_ref) if fp8 else cache_ref
            ok = ~torch.isnan(w.float())
            assert torch.equal(torch.isnan(g.float()), ~ok)
            assert (g.float()[ok] - w.float()[ok]).abs().max() <= 0.07 * w.float()[ok].abs().max()


def test_check_block_table_env_on_cuda(monkeypatch):
    cache, bt, cs, kv = make_paged_cache([10, 70], device="cuda")
    q = torch.randn(2, 1, 4, 576, device="cuda").bfloat16()
    md, ns = ops.get_mla_metadata(cs, 4, 1)
    bt[1, 1] = HUGE_BLOCK_ID
    monkeypatch.setenv("DSMOE_CHECK_BLOCK_TABLE", "1")
    with pytest.raises(ValueError, match="block id 1073741824 used by a sequence"):
        ops.mla_decode_with_kvcache(q, cache, bt, cs, 512, md, ns, SCALE)
    with pytest.raises(ValueError, match="exceeds the block table's capacity"):
        ops.mla_decode_with_kvcache(q, cache, bt, torch.tensor([10, 10000], dtype=torch.int32, device="cuda"), 512,
                                    md, ns, SCALE)


def test_torch_compile_cuda():
    cache, bt, cs, kv = make_paged_cache([300, 7], device="cuda")
    q = torch.randn(2, 2, 16, 576, device="cuda").bfloat16()

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
    md, ns = ops.get_mla_metadata(cs.cuda(), rows, 1, num_sms=num_sms)
    out, lse = ops.mla_decode_with_kvcache(q.cuda(), cache.cuda(), bt.cuda(), cs.cuda(), 512, md, ns, SCALE, causal)
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


@pytest.mark.parametrize("fp8", [False, True])
def test_append_unfused_special_values_bit_exact(fp8):
    """Unfused append is a bit copy (bf16) or the reference quantization (FP8) for every input: NaN with
    payloads of either sign, +-inf, -0.0, denormals, in the latent and the rope part."""
    seqlens_after = [70, 3]
    cache, bt, cs, kv = make_paged_cache(seqlens_after, fp8=fp8, device="cuda")
    cache_ref = cache.cpu().clone()
    bids = torch.tensor([0, 0, 1], dtype=torch.int32)
    pos = torch.tensor([68, 69, 2], dtype=torch.int32)
    lat = torch.randn(3, 512).bfloat16()
    kr = torch.randn(3, 64).bfloat16()
    special = torch.tensor([0x7FC0, 0xFFC1, 0x7F81, 0x7F80, 0xFF80, 0x8000, 0x0001, 0x8003], dtype=torch.int32).to(torch.int16)
    lat.view(torch.int16)[0, 5:13] = special          # group 0 of token 0 holds NaN
    lat.view(torch.int16)[1, 300:304] = special[3:7]   # group 2 of token 1: +-inf, -0, denormal
    kr.view(torch.int16)[2, 10:18] = special
    ops.mla_kvcache_append(cache, bt, bids.cuda(), pos.cuda(), lat.cuda(), kr.cuda())
    ops.mla_kvcache_append(cache_ref, bt.cpu(), bids, pos, lat, kr)
    assert torch.equal(cache.cpu().view(torch.uint8), cache_ref.view(torch.uint8))
