"""The headline cases of every family in one short run (what tools/gpu_check.py times within its budget).

GEMM 4096x7168x16384 and decode shapes M = 64 / 128; grouped contiguous and masked; MLA decode H = 128,
s_q = 1 and 2 over 4096 cached tokens (bf16 and FP8 cache); the 1x128 quantizer; MoE permute. Each case
carries its baseline measured in the same run (torch's blockwise ``_scaled_mm`` and bf16 matmul for the
GEMMs, FlashInfer's MLA decode when importable, the device copy bandwidth for the memory-bound ops) and
its ratio to it. ``DSMOE_BENCH_DEADLINE`` (a Unix time) stops before a case that would start after it;
the JSON then says which cases were cut.
"""
from __future__ import annotations

import os
import time

import torch

from .. import ops
from . import gemm as G
from . import mla as L


def _mla_case(h, s_q, H, fp8, copy):
    B, s_k = 128, 4096
    q, kv, bt, cs = L._make(B, s_k, s_q, H, fp8)
    md, ns = ops.get_mla_metadata(cs, s_q * H, 1)
    timed, how = L._graphed(lambda: ops.mla_decode_with_kvcache(q, kv, bt, cs, 512, md, ns, L.SCALE, s_q > 1))
    t = h.time(timed)
    nbytes = B * s_k * (656 if fp8 else 1152) + q.numel() * 2 + B * s_q * H * 512 * 2
    flops = 2 * B * s_q * H * s_k * (576 + 512)
    gbps = nbytes / (t.median_ms * 1e-3) / 1e9
    case = {"op": "mla_decode", "B": B, "s_k": s_k, "s_q": s_q, "H": H, "cache": "fp8" if fp8 else "bf16",
            "timed_as": how, **t.as_dict(), "GB/s": gbps, "TFLOPS": flops / (t.median_ms * 1e-3) / 1e12,
            "ratio_to_copy": gbps / copy}
    if not fp8:
        fi = L._flashinfer_fn(q, kv, bt, cs, s_q, H)
        if isinstance(fi, str):
            case["flashinfer"] = fi
        else:
            fi_timed, _ = L._graphed(fi)
            tf = h.time(fi_timed)
            case["flashinfer_ms"] = tf.median_ms
            case["speedup_vs_flashinfer"] = tf.median_ms / t.median_ms
    return case


def _quant_case(h, copy):
    M, K = 16384, 7168
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    t = h.time(lambda: ops.per_token_group_quant_fp8(x, column_major_scales=True))
    gbps = (M * K * 2 + M * K + M * (K // 128) * 4) / (t.median_ms * 1e-3) / 1e9
    return {"op": "per_token_group_quant_fp8", "M": M, "K": K, **t.as_dict(), "GB/s": gbps, "ratio_to_copy": gbps / copy}


def _permute_case(h, copy):
    T, E, k, H = 16384, 256, 8, 7168
    logits = torch.randn(T, E, device="cuda")
    idx, _ = ops.moe_route(logits, torch.randn(E, device="cuda") * 0.01, top_k=k, n_group=8, topk_group=4,
                           routed_scaling_factor=2.5)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    mr = ops.moe_permute_max_rows(T, k, E)
    t = h.time(lambda: ops.moe_permute(x, idx, E, max_rows=mr))
    nbytes = T * H * 2 + mr * H * 2 + mr * 4 + T * k * 8
    gbps = nbytes / (t.median_ms * 1e-3) / 1e9
    return {"op": "moe_permute", "T": T, "E": E, "k": k, "H": H, **t.as_dict(), "GB/s": gbps, "ratio_to_copy": gbps / copy}


def cases(copy):
    """(name, thunk) in priority order."""
    out = [("gemm 4096x7168x16384", lambda h: G._dense_case(h, 4096, 7168, 16384))]
    for M in (64, 128):
        for N, K in ((2112, 7168), (7168, 2048)):
            out.append((f"gemm {M}x{N}x{K}", lambda h, M=M, N=N, K=K: G._dense_case(h, M, N, K)))
    out.append(("grouped contiguous 4x4096 rows 4096x7168", lambda h: G._contiguous_case(h, 4, 4096, 4096, 7168)))
    for m in (64, 128):
        out.append((f"grouped masked 16x{m} 4096x7168", lambda h, m=m: G._masked_case(h, 16, m, 4096, 7168)))
    for s_q in (1, 2):
        for fp8 in (False, True):
            out.append((f"mla h128 s_q{s_q} 4096 {'fp8' if fp8 else 'bf16'}",
                        lambda h, s_q=s_q, fp8=fp8: _mla_case(h, s_q, 128, fp8, copy)))
    out.append(("quant 16384x7168", lambda h: _quant_case(h, copy)))
    out.append(("permute 16384 tokens", lambda h: _permute_case(h, copy)))
    return out


def run(h, quick: bool):
    deadline = float(os.environ.get("DSMOE_BENCH_DEADLINE", "inf"))
    copy = h.copy_bandwidth()
    done, cut, errors = [], [], {}
    for name, fn in cases(copy):
        if time.time() > deadline:
            cut.append(name)
            continue
        try:
            done.append({"case": name, **fn(h)})
        except Exception as e:  # noqa: BLE001 - one failing case must not lose the others' numbers
            errors[name] = f"{type(e).__name__}: {str(e)[:200]}"
        torch.cuda.empty_cache()
    cols = ["case", "median_ms", "TFLOPS", "GB/s", "speedup_vs_torch_fp8", "speedup_vs_bf16", "speedup_vs_flashinfer",
            "ratio_to_copy"]
    return done, cols, {"copy_GB/s": copy, "cut_short": cut, "errors": errors}
