"""Quantizer bandwidth vs the device-to-device copy bandwidth measured in the same run.

Bytes counted: input read once, fp8 written once, scales written once.
Baseline ratios: to copy bandwidth (target >= 0.8) and speedup over the torch reference on the GPU.
"""
from __future__ import annotations

import torch

from .. import ops, ref


def run(h, quick: bool):
    copy = h.copy_bandwidth()
    Ms = [4096, 16384] if quick else [4096, 16384, 65536]
    K = 7168
    cases = []
    for M in Ms:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        variants = [
            ("token_group", lambda: ops.per_token_group_quant_fp8(x), lambda: ref.per_token_group_quant_fp8(x),
             M * K * 2 + M * K + M * (K // 128) * 4),
            ("token_group_colmajor", lambda: ops.per_token_group_quant_fp8(x, column_major_scales=True), None,
             M * K * 2 + M * K + M * (K // 128) * 4),
            ("token_group_ue8m0", lambda: ops.per_token_group_quant_fp8(x, scale_ue8m0=True), None,
             M * K * 2 + M * K + M * (K // 128) * 4),
            ("block_128x128", lambda: ops.per_block_quant_fp8(x), lambda: ref.per_block_quant_fp8(x),
             M * K * 2 + M * K + (M // 128) * (K // 128) * 4),
        ]
        for name, fn, ref_fn, nbytes in variants:
            t = h.time(fn)
            gbps = nbytes / (t.median_ms * 1e-3) / 1e9
            case = {"op": name, "M": M, "K": K, "dtype": "bf16", **t.as_dict(), "GB/s": gbps,
                    "copy_GB/s": copy, "ratio_to_copy": gbps / copy}
            if ref_fn is not None and M <= 16384:
                tr = h.time(ref_fn, reps=10, warmup=2)
                case["torch_ref_ms"] = tr.median_ms
                case["speedup_vs_torch_ref"] = tr.median_ms / t.median_ms
            cases.append(case)
        del x
        torch.cuda.empty_cache()
    cols = ["op", "M", "K", "median_ms", "GB/s", "ratio_to_copy", "speedup_vs_torch_ref"]
    return cases, cols, {"copy_GB/s": copy, "target_ratio_to_copy": 0.8}
