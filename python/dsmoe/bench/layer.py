"""One DeepSeek-V3-width MoE layer, forward + backward, tokens/s: dsmoe (FP8 Fprop/Dgrad/Wgrad through
the grouped FP8 GEMMs, fused routing/permutation) vs a BF16 PyTorch baseline in the same run.

Layer: hidden 7168, moe_intermediate 2048, 1 shared expert, top-8, as many routed experts as fit the GPU
(256 when they fit; at least 8, always a multiple of 8 so that n_group 8 / topk_group 4 routing applies).
Baseline: the same layer (same weights, same routing) with BF16 experts computed by
``torch.nn.functional.grouped_mm`` over the same permutation (torch's fused grouped GEMM), which is
faster than HF's per-expert loop. Target (issue): >= 1.5x the BF16 baseline.

Not registered in the runner's suite table by this file (that table is owned elsewhere); run it as
``dsmoe bench layer`` once registered, or ``python -m dsmoe.bench.layer``.
"""
from __future__ import annotations

import torch

from ..models import DeepseekV3Config
from ..nn import MoE, fp8_autocast, set_fp8


def _experts_that_fit(free_bytes: int) -> int:
    # per expert: 3 x 2048 x 7168 master fp32 weights + fp32 grads + 2 Adam-free bf16 copies ~ 3*2048*7168*(4+4+2)
    per = 3 * 2048 * 7168 * 10
    n = int(0.55 * free_bytes // per)
    return max(8, min(256, n // 8 * 8))


def _layer(E: int, dtype=torch.float32):
    cfg = DeepseekV3Config(hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=E, num_experts_per_tok=8,
                           n_group=8, topk_group=4, n_shared_experts=1, num_hidden_layers=1, first_k_dense_replace=0,
                           vocab_size=16, intermediate_size=2048, num_attention_heads=1)
    return MoE(cfg, fp8=True, dtype=dtype).cuda()


def run(h, quick: bool):
    free, _ = torch.cuda.mem_get_info()
    E = _experts_that_fit(free)
    moe = _layer(E, torch.bfloat16)
    token_counts = [4096, 8192] if quick else [4096, 8192, 16384]
    cases = []
    for T in token_counts:
        x = (torch.randn(1, T, 7168, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
        g = torch.randn(1, T, 7168, device="cuda").to(torch.bfloat16)

        def step(fp8: bool):
            def fn():
                moe.zero_grad(set_to_none=True)
                x.grad = None
                with fp8_autocast(fp8):
                    y = moe(x)
                y.backward(g)
            return fn

        moe.train()
        set_fp8(moe, True)
        t8 = h.time(step(True), reps=10 if quick else 20, warmup=3)
        t16 = h.time(step(False), reps=10 if quick else 20, warmup=3)
        flops = 3 * 2 * 3 * 7168 * 2048 * T * (8 + 1)   # fwd + 2 bwd GEMMs, 3 projections, 8 routed + 1 shared
        cases.append({"tokens": T, "experts": E, "top_k": 8, "hidden": 7168, "moe_intermediate": 2048,
                      "fp8_ms": t8.median_ms, "bf16_ms": t16.median_ms,
                      "fp8_tokens_per_s": T / (t8.median_ms * 1e-3), "bf16_tokens_per_s": T / (t16.median_ms * 1e-3),
                      "fp8_TFLOPS": flops / (t8.median_ms * 1e-3) / 1e12,
                      "bf16_TFLOPS": flops / (t16.median_ms * 1e-3) / 1e12,
                      "speedup_vs_bf16": t16.median_ms / t8.median_ms})
        del x, g
    columns = ["tokens", "experts", "fp8_tokens_per_s", "bf16_tokens_per_s", "speedup_vs_bf16", "fp8_TFLOPS", "bf16_TFLOPS"]
    extra = {"baseline": "same MoE layer with BF16 experts via torch.nn.functional.grouped_mm (same routing/permutation)",
             "goal_speedup": 1.5}
    return cases, columns, extra


if __name__ == "__main__":
    from .harness import Harness

    cs, cols, ex = run(Harness(), quick=True)
    for c in cs:
        print({k: c[k] for k in cols})
