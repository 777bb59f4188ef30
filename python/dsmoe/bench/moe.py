"""MoE routing and permutation: T in {4096, 16384, 65536}, 256 experts, top-8, hidden 7168.

- routing: the fused warp-per-token kernel vs the torch reference (dsmoe.ref.moe_route) on the GPU.
- permute: bytes = x read once + k copies written (+ padding rows zeroed) + row_map/m_indices; GB/s and the
  ratio to the device copy bandwidth measured in the same run (target >= 0.7). The graph-safe form
  (max_rows) is timed, so the layout kernels are included and no host sync happens.
- permute_fp8: fused 1x128 quantization (bf16 read once, fp8 + scales written k times).
- unpermute: k rows read per token, one written.
"""
from __future__ import annotations

import torch

from .. import ops, ref


def run(h, quick: bool):
    copy = h.copy_bandwidth()
    Ts = [4096, 16384] if quick else [4096, 16384, 65536]
    E, k, H = 256, 8, 7168
    cases = []
    for T in Ts:
        logits = torch.randn(T, E, device="cuda")
        bias = torch.randn(E, device="cuda") * 0.01
        kw = dict(top_k=k, n_group=8, topk_group=4, routed_scaling_factor=2.5)
        t = h.time(lambda: ops.moe_route(logits, bias, **kw))
        tr = h.time(lambda: ref.moe_route(logits, bias, **kw), reps=10, warmup=2)
        cases.append({"op": "route", "T": T, "E": E, "k": k, **t.as_dict(), "torch_ref_ms": tr.median_ms,
                      "speedup_vs_torch_ref": tr.median_ms / t.median_ms})
        idx, w = ops.moe_route(logits, bias, **kw)
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        mr = ops.moe_permute_max_rows(T, k, E)
        xp, m, tpe, rm = ops.moe_permute(x, idx, E, max_rows=mr)
        pad_rows = mr - T * k
        nbytes = T * H * 2 + T * k * H * 2 + pad_rows * H * 2 + mr * 4 + T * k * 8
        t = h.time(lambda: ops.moe_permute(x, idx, E, max_rows=mr))
        gbps = nbytes / (t.median_ms * 1e-3) / 1e9
        cases.append({"op": "permute", "T": T, "E": E, "k": k, "H": H, **t.as_dict(), "GB/s": gbps, "copy_GB/s": copy,
                      "ratio_to_copy": gbps / copy})
        nbytes8 = T * H * 2 + (T * k + pad_rows) * (H + H // 128 * 4) + mr * 4 + T * k * 8
        t = h.time(lambda: ops.moe_permute(x, idx, E, max_rows=mr, quantize_fp8=True))
        gbps = nbytes8 / (t.median_ms * 1e-3) / 1e9
        cases.append({"op": "permute_fp8", "T": T, "E": E, "k": k, "H": H, **t.as_dict(), "GB/s": gbps,
                      "ratio_to_copy": gbps / copy})
        nbytes_u = T * k * H * 2 + T * H * 2 + T * k * 8
        t = h.time(lambda: ops.moe_unpermute(xp, rm, w))
        gbps = nbytes_u / (t.median_ms * 1e-3) / 1e9
        cases.append({"op": "unpermute", "T": T, "E": E, "k": k, "H": H, **t.as_dict(), "GB/s": gbps,
                      "ratio_to_copy": gbps / copy})
        del x, xp
        torch.cuda.empty_cache()
    cols = ["op", "T", "median_ms", "GB/s", "ratio_to_copy", "speedup_vs_torch_ref"]
    return cases, cols, {"copy_GB/s": copy, "target_permute_ratio_to_copy": 0.7}
