"""``dsmoe generate CHECKPOINT --prompt TEXT [--prompt ...]``: completions from a checkpoint through
:class:`dsmoe.serve.LLM`, then one stats line (tokens/s, prefix-cache hits, MTP acceptance)."""
from __future__ import annotations

import argparse
import time

__all__ = ["main"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dsmoe generate", description=__doc__)
    p.add_argument("checkpoint", help="checkpoint folder (config.json, safetensors, tokenizer files)")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text (repeat for several); with no tokenizer, space-separated token ids")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--speculative", choices=["mtp", "none"], default="mtp")
    p.add_argument("--num-speculative-tokens", type=int, default=1)
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)

    import torch

    from . import LLM, SamplingParams

    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    spec = None if a.speculative == "none" else a.speculative
    try:
        llm = LLM(a.checkpoint, device=dev, speculative=spec, num_speculative_tokens=a.num_speculative_tokens)
        prompts = a.prompt if llm.tokenizer is not None else [[int(t) for t in s.split()] for s in a.prompt]
        sp = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                            seed=a.seed)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp)
        dt = time.perf_counter() - t0
    except ValueError as e:
        p.error(str(e))
    for o in outs:
        c = o.outputs[0]
        shown = c.text if llm.tokenizer is not None else " ".join(map(str, c.token_ids))
        print(f"{o.prompt if o.prompt is not None else o.prompt_token_ids!s} -> {shown}  [{c.finish_reason}]")
    st = llm.stats
    n = st["generated_tokens"]
    line = (f"stats: {len(outs)} requests, {n} tokens in {dt:.2f} s ({n / dt:.1f} tokens/s), "
            f"{st['main_forward_calls']} main-model calls, prefix cache {st['cached_prompt_tokens']}/"
            f"{st['prompt_tokens']} prompt tokens")
    if spec:
        per_fwd = n / max(1, sum(o.num_forward_passes for o in outs))
        rate = llm.acceptance_rate()
        line += (f", MTP acceptance {100 * rate:.1f}% ({st['accepted_tokens']}/{st['draft_tokens']} drafts), "
                 f"{per_fwd:.2f} tokens per forward" if rate is not None else ", MTP: no drafts")
    print(line)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
