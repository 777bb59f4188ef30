"""Token selection: processed distributions (temperature, top-k, top-p), per-request draws, and the
speculative-decoding acceptance rule.

Everything runs per request with the request's own ``torch.Generator`` on the CPU, so a request's draws
depend only on its seed and its own logits, never on what else shares the batch."""
from __future__ import annotations

import torch

__all__ = ["probs_from_logits", "sample_token", "verify_drafts"]


def probs_from_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """``logits [..., V]`` -> float64 probabilities after temperature, top-k then top-p (temperature > 0).

    float64: the acceptance ratio p/q of speculative sampling compares small probabilities."""
    x = logits.double() / temperature
    V = x.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    p = torch.softmax(x, -1)
    if top_p < 1.0:
        sp, idx = torch.sort(p, dim=-1, descending=True)
        # keep a token when the mass strictly before it is below top_p (the first token always stays)
        drop = (sp.cumsum(-1) - sp) >= top_p
        sp = sp.masked_fill(drop, 0.0)
        p = torch.zeros_like(p).scatter_(-1, idx, sp)
        p = p / p.sum(-1, keepdim=True)
    return p


def _draw(p: torch.Tensor, gen: torch.Generator) -> int:
    return int(torch.multinomial(p.float(), 1, generator=gen))


def sample_token(logits: torch.Tensor, params, gen: torch.Generator) -> tuple[int, torch.Tensor | None]:
    """One token from ``logits [V]``; returns ``(token, probs)`` (probs None when greedy)."""
    if params.temperature == 0:
        return int(logits.argmax()), None
    p = probs_from_logits(logits, params.temperature, params.top_k, params.top_p)
    return _draw(p, gen), p


def verify_drafts(target_logits: torch.Tensor, drafts: list[int], draft_probs: list, params,
                  gen: torch.Generator) -> tuple[list[int], int]:
    """Speculative verification of ``drafts`` (k tokens) against the target's ``target_logits [k + 1, V]``
    (row j: the distribution of the token at draft slot j; row k: the bonus token after all k).

    Greedy (temperature 0): a draft is accepted while it equals the target's argmax; the first mismatch is
    replaced by the argmax, so the output is exactly what greedy decoding gives. Sampling: draft j (drawn
    from q_j = ``draft_probs[j]``) is accepted with probability ``min(1, p_j(d) / q_j(d))``; at the first
    rejection the token is drawn from ``normalize(max(0, p_j - q_j))``; after k acceptances a bonus token is
    drawn from p_k. Each emitted token is then distributed exactly as p (the standard speculative
    sampling argument). Returns ``(emitted tokens, number of drafts accepted)``."""
    out: list[int] = []
    if params.temperature == 0:
        tgt = target_logits.argmax(-1).tolist()
        for j, d in enumerate(drafts):
            if d != tgt[j]:
                out.append(tgt[j])
                return out, j
            out.append(d)
        out.append(tgt[len(drafts)])
        return out, len(drafts)
    p = probs_from_logits(target_logits, params.temperature, params.top_k, params.top_p)
    for j, d in enumerate(drafts):
        q = draft_probs[j]
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        if u * float(q[d]) < float(p[j, d]):
            out.append(d)
            continue
        resid = (p[j] - q).clamp(min=0)
        s = float(resid.sum())
        # p == q up to rounding leaves no residual mass: p itself is then the right distribution
        out.append(_draw(resid / s if s > 0 else p[j], gen))
        return out, j
    out.append(_draw(p[len(drafts)], gen))
    return out, len(drafts)
