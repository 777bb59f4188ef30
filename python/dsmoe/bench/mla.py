"""MLA decode over a paged latent cache: GB/s of cache read and TFLOPS, vs the copy bandwidth, the torch
reference (absorbed form) and FlashInfer's MLA decode (when importable) measured in the same run.

Bytes counted: the cache tokens read (576 x 2 B per token in bf16, 656 B in FP8) + q + out.
FLOPs: 2 * B * s_q * H * s_k * (576 + 512).
The dsmoe op (and FlashInfer) are timed as CUDA-graph replays (metadata computed once, outside).
Targets (H100): memory-bound (H * s_q <= 64) >= 0.9 x copy bandwidth; H = 128, s_q = 2 >= 550 TFLOPS;
FP8 cache >= 1.6 x the bf16 kernel's tokens/s at H = 16.
"""
from __future__ import annotations

import torch

from .. import ops, ref

SCALE = 0.135234


def _make(B, s_k, s_q, H, fp8, device="cuda"):
    nblk = s_k // 64
    num_blocks = B * nblk
    perm = torch.randperm(num_blocks, device=device)
    bt = perm.view(B, nblk).to(torch.int32)
    kv = (torch.randn(num_blocks, 64, 1, 576, device=device) * 0.5).bfloat16()
    if fp8:
        kv = ops.quantize_mla_kvcache_fp8(kv)
    cs = torch.full((B,), s_k, dtype=torch.int32, device=device)
    q = torch.randn(B, s_q, H, 576, device=device).bfloat16()
    return q, kv, bt, cs


def _graphed(fn):
    """``(replay, how)``: fn captured in a CUDA graph so the timing holds the kernels only, not the
    Python argument checks and dispatch (~tens of us per call, comparable to a small decode step);
    falls back to eager calls when capture fails."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()  # warm-up outside the capture (lazy init, kernel attributes)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g.replay, "graph"
    except Exception as e:  # noqa: BLE001 - any capture failure: time eagerly and say so
        torch.cuda.synchronize()
        return fn, f"eager ({type(e).__name__})"


def _flashinfer_fn(q, kv, bt, cs, s_q, H):
    """A FlashInfer MLA decode closure for the same problem, or a reason string."""
    try:
        import flashinfer  # noqa: F401
        from flashinfer.mla import BatchMLAPagedAttentionWrapper
    except Exception as e:  # noqa: BLE001 - any import failure means "unavailable"
        return f"unavailable ({type(e).__name__})"
    if s_q != 1:
        return "unavailable (s_q > 1 not benchmarked)"
    try:
        B = q.shape[0]
        ws = torch.empty(128 * 2**20, dtype=torch.uint8, device=q.device)
        w = BatchMLAPagedAttentionWrapper(ws, backend="auto")
        qo_indptr = torch.arange(B + 1, dtype=torch.int32, device=q.device)
        nblk = bt.shape[1]
        kv_indptr = torch.arange(B + 1, dtype=torch.int32, device=q.device) * nblk
        kv_indices = bt.reshape(-1)
        kv_len = cs
        w.plan(qo_indptr, kv_indptr, kv_indices, kv_len, H, 512, 64, 64, False, SCALE, q.dtype, kv.dtype)
        q_nope, q_pe = q[:, 0, :, :512].contiguous(), q[:, 0, :, 512:].contiguous()
        ckv, kpe = kv[:, :, 0, :512], kv[:, :, 0, 512:]
        return lambda: w.run(q_nope, q_pe, ckv, kpe)
    except Exception as e:  # noqa: BLE001
        return f"unavailable ({type(e).__name__}: {str(e)[:80]})"


def run(h, quick: bool):
    copy = h.copy_bandwidth()
    B = 128
    s_ks = [4096, 8192] if quick else [4096, 8192, 32768]
    s_qs = [1, 2]
    Hs = [16, 64, 128] if quick else [16, 32, 64, 128]
    cases = []
    for s_k in s_ks:
        for s_q in s_qs:
            for H in Hs:
                for fp8 in (False, True):
                    if fp8 and H not in (16, 128):
                        continue
                    q, kv, bt, cs = _make(B, s_k, s_q, H, fp8)
                    md, ns = ops.get_mla_metadata(cs, s_q * H, 1)
                    fn = lambda: ops.mla_decode_with_kvcache(q, kv, bt, cs, 512, md, ns, SCALE, s_q > 1)  # noqa: E731
                    timed, how = _graphed(fn)
                    t = h.time(timed)
                    tok_bytes = 656 if fp8 else 1152
                    nbytes = B * s_k * tok_bytes + q.numel() * 2 + B * s_q * H * 512 * 2
                    flops = 2 * B * s_q * H * s_k * (576 + 512)
                    gbps = nbytes / (t.median_ms * 1e-3) / 1e9
                    case = {"B": B, "s_k": s_k, "s_q": s_q, "H": H, "cache": "fp8" if fp8 else "bf16", "timed_as": how,
                            **t.as_dict(),
                            "GB/s": gbps, "TFLOPS": flops / (t.median_ms * 1e-3) / 1e12, "ratio_to_copy": gbps / copy,
                            "tokens/s": B * s_q / (t.median_ms * 1e-3), "memory_bound": H * s_q <= 64}
                    if not fp8 and s_k <= 8192 and H in (16, 128):
                        tr = h.time(lambda: ref.mla_decode_with_kvcache(q, kv, bt, cs, 512, SCALE, s_q > 1), reps=3, warmup=1)
                        case["torch_ref_ms"] = tr.median_ms
                        case["speedup_vs_torch_ref"] = tr.median_ms / t.median_ms
                    if not fp8:
                        fi = _flashinfer_fn(q, kv, bt, cs, s_q, H)
                        if isinstance(fi, str):
                            case["flashinfer"] = fi
                        else:
                            fi_timed, fi_how = _graphed(fi)
                            case["flashinfer_timed_as"] = fi_how
                            tf = h.time(fi_timed)
                            case["flashinfer_ms"] = tf.median_ms
                            case["speedup_vs_flashinfer"] = tf.median_ms / t.median_ms
                    cases.append(case)
                    del q, kv, bt, cs, fn, timed  # the graph (and its memory pool) goes with `timed`
                    torch.cuda.empty_cache()
    # FP8 tokens/s relative to bf16 at the same shape
    by_key = {(c["s_k"], c["s_q"], c["H"], c["cache"]): c for c in cases}
    for c in cases:
        if c["cache"] == "fp8":
            b = by_key.get((c["s_k"], c["s_q"], c["H"], "bf16"))
            if b:
                c["fp8_speedup_vs_bf16"] = c["tokens/s"] / b["tokens/s"]
    cols = ["s_k", "s_q", "H", "cache", "median_ms", "GB/s", "ratio_to_copy", "TFLOPS", "speedup_vs_torch_ref",
            "speedup_vs_flashinfer", "fp8_speedup_vs_bf16"]
    return cases, cols, {"copy_GB/s": copy, "targets": {"memory_bound_ratio_to_copy": 0.9, "compute_bound_TFLOPS": 550,
                                                        "fp8_speedup_vs_bf16_at_H16": 1.6}}
