"""Serving figures on the tiny checkpoint ``dsmoe train --preset tiny`` writes (``runs/tiny/checkpoint``;
``DSMOE_SERVE_CHECKPOINT`` points elsewhere): runs on CPU as well as on a GPU.

- MTP speculative decoding on the synthetic task: acceptance rate and generated tokens per main-model
  forward pass (prefill included), k = 1, 2, 3 drafts; the greedy outputs must equal those without
  speculation (``greedy_match``).
- Prefix caching: requests sharing a system prompt; prefill tokens computed with and without caching.
- Continuous batching: 32 requests at once vs one at a time (same engine settings, same run).
"""
from __future__ import annotations

import os
import time

import torch

__all__ = ["run", "figures"]


def _task_for(llm):
    from ..data import PermutedCopyTask

    S = llm.config.vocab_size - 3
    # the task's prompt length: the checkpoint's training length is not stored, the tiny preset's is used
    from ..train import PRESETS
    L = next((p["task"]["length"] for p in PRESETS.values() if p["task"]["num_symbols"] == S), 12)
    return PermutedCopyTask(num_symbols=S, length=L)


def figures(checkpoint: str, *, quick: bool = False, device=None) -> dict:
    from ..serve import LLM, SamplingParams

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = LLM(checkpoint, device=dev)
    task = _task_for(base)
    n = 16 if quick else 32
    seqs = task.sample(n, torch.Generator().manual_seed(2024))
    prompts = seqs[:, : task.prompt_len()].tolist()
    greedy = SamplingParams(max_tokens=task.length + 1, temperature=0)
    out: dict = {"checkpoint": os.path.abspath(checkpoint), "device": dev, "requests": n,
                 "task": {"num_symbols": task.num_symbols, "length": task.length}}

    # ---- continuous batching: n at once vs one at a time (plain decoding)
    t0 = time.perf_counter()
    ref = base.generate(prompts, greedy)
    t_batch = time.perf_counter() - t0
    one = LLM(checkpoint, device=dev, max_num_seqs=1)
    t0 = time.perf_counter()
    for p in prompts:
        one.generate([p], greedy)
    t_one = time.perf_counter() - t0
    toks = sum(len(o.outputs[0].token_ids) for o in ref)
    # a completion that ended early (EOS) counts its missing symbols as wrong
    gen = torch.tensor([(o.outputs[0].token_ids + [-1] * task.length)[: task.length] for o in ref])
    acc, exact = task.accuracy(torch.cat([seqs[:, : task.prompt_len()], gen], 1), seqs)
    out["batching"] = {"tokens": toks, "concurrent_s": t_batch, "sequential_s": t_one,
                       "concurrent_tokens_per_s": toks / t_batch, "sequential_tokens_per_s": toks / t_one,
                       "speedup": t_one / t_batch, "task_accuracy": acc, "task_exact_match": exact}

    # ---- MTP speculation
    out["mtp"] = []
    for k in (1, 2, 3):
        llm = LLM(checkpoint, device=dev, speculative="mtp", num_speculative_tokens=k)
        t0 = time.perf_counter()
        res = llm.generate(prompts, greedy)
        dt = time.perf_counter() - t0
        gen_toks = sum(len(o.outputs[0].token_ids) for o in res)
        fwd = sum(o.num_forward_passes for o in res)
        out["mtp"].append({
            "k": k, "acceptance_rate": llm.acceptance_rate(), "tokens_per_forward": gen_toks / fwd,
            # decode only: the prefill's forward yields one token whatever k is
            "decode_tokens_per_forward": (gen_toks - n) / max(1, fwd - n),
            "per_request_acceptance_min": min(o.acceptance_rate or 0.0 for o in res),
            "greedy_match": [o.outputs[0].token_ids for o in res] == [o.outputs[0].token_ids for o in ref],
            "main_forward_calls": llm.stats["main_forward_calls"], "wall_s": dt, "tokens_per_s": gen_toks / dt})

    # ---- prefix caching: a shared system prompt (two full blocks) before each task prompt
    sys_prompt = task.sample(10, torch.Generator().manual_seed(7)).reshape(-1)[:128].tolist()
    shared = [sys_prompt + p for p in prompts]
    sp = SamplingParams(max_tokens=4, temperature=0)
    res = {}
    for on in (True, False):
        llm = LLM(checkpoint, device=dev, enable_prefix_caching=on, max_model_len=256)
        t0 = time.perf_counter()
        outs = llm.generate(shared, sp)
        res[on] = (llm.stats, time.perf_counter() - t0, [o.outputs[0].token_ids for o in outs])
    st = res[True][0]
    out["prefix_cache"] = {"system_prompt_tokens": len(sys_prompt), "prompt_tokens": st["prompt_tokens"],
                           "prefill_tokens_computed": st["prefill_tokens_computed"],
                           "prefill_tokens_computed_without_cache": res[False][0]["prefill_tokens_computed"],
                           "cached_prompt_tokens": st["cached_prompt_tokens"],
                           "saved_fraction": 1 - st["prefill_tokens_computed"] / res[False][0]["prefill_tokens_computed"],
                           "wall_s": res[True][1], "wall_s_without_cache": res[False][1],
                           "same_outputs": res[True][2] == res[False][2]}
    return out


def run(h, quick: bool):
    if torch.get_num_threads() > 1 and not torch.cuda.is_available():
        # NOTE: tiny matmuls on a shared CPU: extra threads contend more than they help
        torch.set_num_threads(1)
    ckpt = os.environ.get("DSMOE_SERVE_CHECKPOINT", os.path.join("runs", "tiny", "checkpoint"))
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        raise SystemExit(f"dsmoe bench serve: no checkpoint at {ckpt}: run `dsmoe train --preset tiny` first "
                         f"or set DSMOE_SERVE_CHECKPOINT")
    f = figures(ckpt, quick=quick)
    cases = [{"figure": f"mtp k={m['k']}", "acceptance": m["acceptance_rate"], "tokens_per_forward": m["tokens_per_forward"],
              "decode_tokens_per_forward": m["decode_tokens_per_forward"], "greedy_match": m["greedy_match"],
              "tokens_per_s": m["tokens_per_s"]} for m in f["mtp"]]
    b, pc = f["batching"], f["prefix_cache"]
    cases.append({"figure": f"{f['requests']} concurrent vs one at a time", "speedup": b["speedup"],
                  "tokens_per_s": b["concurrent_tokens_per_s"]})
    cases.append({"figure": "prefix cache (shared system prompt)", "saved_fraction": pc["saved_fraction"],
                  "prefill_tokens": pc["prefill_tokens_computed"]})
    cols = ["figure", "acceptance", "tokens_per_forward", "decode_tokens_per_forward", "greedy_match", "speedup",
            "saved_fraction", "prefill_tokens", "tokens_per_s"]
    return cases, cols, {"figures": f, "timing": "wall clock (time.perf_counter) of whole generate() calls, one "
                                               "run each, on the device the figures name"}


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(figures(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny/checkpoint"), indent=2))
