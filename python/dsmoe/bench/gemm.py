"""FP8 block-scaled GEMMs vs torch baselines measured in the same run.

Cases (issue 3): dense M in {64, 128, 4096} x DeepSeek-V3 (N, K); contiguous grouped 4 and 8 groups
x 8192 rows; masked grouped decode with 16 groups; the TN weight gradient. Baselines: torch bf16
matmul, and torch's blockwise FP8 matmul (``torch._scaled_mm`` with 1x128 / 128x128 scales) where the
installed torch supports it ('unsupported' otherwise). Reported: TFLOPS, GB/s (operands + scales +
output, each counted once) and ratios to the baselines.
"""
from __future__ import annotations

import math

import torch

from .. import ops

DENSE_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]


def _q(x):
    return ops.per_token_group_quant_fp8(x, 128, column_major_scales=True)


def _scaled_mm_fn(qa, sa, qb, sb):
    """torch's blockwise FP8 matmul, or None when this torch/device does not support it."""
    fn = getattr(torch, "_scaled_mm", None)
    if fn is None:
        return None, "torch._scaled_mm missing"
    M, K = qa.shape
    N = qb.shape[0]
    sa_t = sa.contiguous().t().contiguous().t()  # [M, K/128] with stride (1, M)
    kb = K // 128
    kb_pad = -(-kb // 4) * 4
    sb_p = torch.zeros(sb.shape[0], kb_pad, device=sb.device, dtype=torch.float32)
    sb_p[:, :kb] = sb
    sb_p = sb_p[:, :kb]

    def run():
        return fn(qa, qb.t(), scale_a=sa_t, scale_b=sb_p.t(), out_dtype=torch.bfloat16)

    try:
        run()
        torch.cuda.synchronize()
        return run, ""
    except Exception as e:  # noqa: BLE001 - any failure means 'unsupported here'
        return None, f"unsupported: {type(e).__name__}: {str(e).splitlines()[0][:120]}"


def _dense_case(h, M, N, K):
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    qa, sa = _q(a)
    qb, sb = ops.per_block_quant_fp8(w)
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    t = h.time(lambda: ops.fp8_gemm_nt(qa, sa, qb, sb, out=out))
    flops = 2 * M * N * K
    nbytes = M * K + N * K + M * (K // 128) * 4 + sb.numel() * 4 + M * N * 2
    tb = h.time(lambda: torch.matmul(a, w.t()))
    case = {"op": "fp8_gemm_nt", "M": M, "N": N, "K": K, **t.as_dict(),
            "TFLOPS": flops / t.median_ms / 1e9, "GB/s": nbytes / t.median_ms / 1e6,
            "bf16_ms": tb.median_ms, "speedup_vs_bf16": tb.median_ms / t.median_ms}
    fn, why = _scaled_mm_fn(qa, sa, qb, sb)
    if fn is not None:
        ts = h.time(fn)
        case["torch_fp8_ms"] = ts.median_ms
        case["speedup_vs_torch_fp8"] = ts.median_ms / t.median_ms
    else:
        case["torch_fp8"] = why
    return case


def _contiguous_case(h, G, rows_per_group, N, K):
    M = G * rows_per_group
    qa, sa = _q(torch.randn(M, K, device="cuda", dtype=torch.bfloat16))
    w = torch.randn(G, N, K, device="cuda", dtype=torch.bfloat16)
    qs = [ops.per_block_quant_fp8(w[g]) for g in range(G)]
    qb, sb = torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
    idx = torch.arange(G, device="cuda", dtype=torch.int32).repeat_interleave(rows_per_group)
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    t = h.time(lambda: ops.m_grouped_fp8_gemm_nt_contiguous(qa, sa, qb, sb, idx, out=out, validate=False))
    flops = 2 * M * N * K
    nbytes = M * K + G * N * K + M * N * 2
    wb = w
    ab = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    tb = h.time(lambda: torch.bmm(ab.view(G, rows_per_group, K), wb.transpose(1, 2)))
    return {"op": "m_grouped_contiguous", "G": G, "M": M, "N": N, "K": K, **t.as_dict(),
            "TFLOPS": flops / t.median_ms / 1e9, "GB/s": nbytes / t.median_ms / 1e6,
            "bf16_ms": tb.median_ms, "speedup_vs_bf16": tb.median_ms / t.median_ms}


def _masked_case(h, G, m, N, K):
    M_max = max(128, m)
    qa, sa = _q(torch.randn(G, M_max, K, device="cuda", dtype=torch.bfloat16))
    w = torch.randn(G, N, K, device="cuda", dtype=torch.bfloat16)
    qs = [ops.per_block_quant_fp8(w[g]) for g in range(G)]
    qb, sb = torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
    masked = torch.full((G,), m, device="cuda", dtype=torch.int32)
    out = torch.empty(G, M_max, N, device="cuda", dtype=torch.bfloat16)
    t = h.time(lambda: ops.m_grouped_fp8_gemm_nt_masked(qa, sa, qb, sb, masked, m, out=out, validate=False))
    flops = 2 * G * m * N * K
    nbytes = G * (m * K + N * K + m * N * 2)
    return {"op": "m_grouped_masked", "G": G, "M": m, "N": N, "K": K, **t.as_dict(),
            "TFLOPS": flops / t.median_ms / 1e9, "GB/s": nbytes / t.median_ms / 1e6}


def _wgrad_case(h, T, M, N):
    qa, sa = ops.per_token_group_quant_fp8_transposed(torch.randn(T, M, device="cuda", dtype=torch.bfloat16))
    qb, sb = ops.per_token_group_quant_fp8_transposed(torch.randn(T, N, device="cuda", dtype=torch.bfloat16))
    out = torch.zeros(M, N, device="cuda", dtype=torch.float32)
    t = h.time(lambda: ops.fp8_gemm_tn(qa, sa, qb, sb, out=out, accumulate=True))
    flops = 2 * M * N * T
    nbytes = M * T + N * T + M * N * 8
    dy = torch.randn(T, M, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
    tb = h.time(lambda: torch.matmul(dy.t(), x))
    return {"op": "fp8_gemm_tn", "M": M, "N": N, "K": T, **t.as_dict(),
            "TFLOPS": flops / t.median_ms / 1e9, "GB/s": nbytes / t.median_ms / 1e6,
            "bf16_ms": tb.median_ms, "speedup_vs_bf16": tb.median_ms / t.median_ms}


def run(h, quick: bool):
    cases = []
    Ms = [64, 4096] if quick else [64, 128, 4096]
    for M in Ms:
        for N, K in (DENSE_NK[:2] if quick else DENSE_NK):
            cases.append(_dense_case(h, M, N, K))
            torch.cuda.empty_cache()
    for G in ([4] if quick else [4, 8]):
        for N, K in [(4096, 7168), (7168, 2048)]:
            cases.append(_contiguous_case(h, G, 8192 // G if quick else 8192, N, K))
            torch.cuda.empty_cache()
    for m in ([32] if quick else [8, 32, 64, 128]):
        for N, K in [(4096, 7168), (7168, 2048)]:
            cases.append(_masked_case(h, 16, m, N, K))
    for M, N in ([(7168, 2048)] if quick else [(7168, 2048), (2048, 7168), (4096, 7168)]):
        cases.append(_wgrad_case(h, 8192, M, N))
    ratios = [c["speedup_vs_torch_fp8"] for c in cases if "speedup_vs_torch_fp8" in c]
    extra = {
        "geomean_speedup_vs_torch_fp8": math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None,
        "targets": {"large_TFLOPS": 1400, "geomean_vs_torch_fp8": 1.1, "vs_bf16_M4096": 1.6,
                    "small_M_TBps": 2.5, "contiguous_TFLOPS": 1300, "wgrad_TFLOPS": 1000},
    }
    cols = ["op", "G", "M", "N", "K", "median_ms", "TFLOPS", "GB/s", "speedup_vs_bf16", "speedup_vs_torch_fp8",
            "torch_fp8"]
    return cases, cols, extra
