"""The GRPO objective: group-relative advantages and the clipped, KL-regularized policy loss.

Shapes: ``B`` completions (``num_prompts * group_size``, ordered group by group), ``T`` completion
positions (right-padded; ``mask`` is 1 on generated tokens, 0 on padding)."""
from __future__ import annotations

import math

import torch

__all__ = ["group_advantages", "grpo_loss", "LOSS_TYPES"]

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Advantage of each completion relative to the other completions of its prompt.

    ``rewards [num_prompts * group_size]`` (group by group) -> ``(r - mean_g) / (std_g + eps)`` with the unbiased
    (n - 1) standard deviation of its group, as DeepSeekMath's GRPO; ``scale=False`` returns ``r - mean_g``
    (Dr. GRPO: no division, so groups with nearly equal rewards are not blown up). Same dtype as ``rewards``
    (float32 for integer rewards)."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        got = f"shape {tuple(rewards.shape)}" if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"group_advantages: argument 'rewards' must be a 1-D tensor [num_prompts * group_size], got {got}")
    if not _is_int(group_size) or group_size < 2:
        raise ValueError(f"group_advantages: argument 'group_size' must be an int >= 2 (a group needs two completions "
                         f"to compare), got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"group_advantages: argument 'group_size'={group_size} does not divide the number of rewards "
                         f"{rewards.numel()}")
    if not _is_real(eps) or eps < 0:
        raise ValueError(f"group_advantages: argument 'eps' must be a finite float >= 0, got {eps!r}")
    r = rewards if rewards.is_floating_point() else rewards.float()
    if r.numel() == 0:
        return r.clone()
    g = r.view(-1, group_size)
    centered = g - g.mean(1, keepdim=True)
    if scale:
        centered = centered / (g.std(1, correction=1, keepdim=True) + eps)
    return centered.reshape(-1)


def _check_bt(name: str, t, shape=None) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
        got = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"grpo_loss: argument '{name}' must be a floating-point tensor [B, T], got {got}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"grpo_loss: argument '{name}' must have the shape of 'logprobs' {tuple(shape)}, "
                         f"got {tuple(t.shape)}")


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, clip_eps: float = 0.2, clip_eps_high: float | None = None,
              beta: float = 0.04, loss_type: str = "grpo", max_completion_length: int | None = None):
    """GRPO policy loss over ``B`` completions; returns ``(loss, stats)``.

    Per token: ``ratio = exp(logprobs - old_logprobs)``, surrogate ``min(ratio * A, clip(ratio, 1 - clip_eps,
    1 + (clip_eps_high or clip_eps)) * A)``, the k3 KL estimate ``exp(ref - logp) - (ref - logp) - 1`` and the
    loss ``-(surrogate - beta * kl)``. Aggregated by ``loss_type``:

    - ``"grpo"``: mean over the B sequences of each one's masked token mean (an empty row counts as 0);
    - ``"dapo"``: masked sum / number of masked tokens (token-level, DAPO);
    - ``"dr_grpo"``: masked sum / (B * ``max_completion_length``) (default ``T``), Dr. GRPO's constant normalizer.

    ``logprobs [B, T]`` carries the gradient; ``old_logprobs`` (the policy that sampled) and ``ref_logprobs``
    (the frozen reference; ignored, and may be None, when ``beta`` is 0) are treated as constants.
    ``advantages [B]``, ``mask [B, T]`` (bool or 0/1). ``stats`` (floats over the masked tokens): ``kl`` (mean k3
    estimate; None without a reference), ``clip_fraction`` (tokens whose clipped term is the active one, so their
    gradient is zero: ratio < 1 - clip_eps with A < 0, or ratio > 1 + clip_eps_high with A > 0), ``ratio_mean``
    and ``tokens``."""
    _check_bt("logprobs", logprobs)
    B, T = logprobs.shape
    _check_bt("old_logprobs", old_logprobs, logprobs.shape)
    if not _is_real(beta) or beta < 0:
        raise ValueError(f"grpo_loss: argument 'beta' must be a finite float >= 0, got {beta!r}")
    if ref_logprobs is None and beta > 0:
        raise ValueError(f"grpo_loss: argument 'ref_logprobs' is None but beta={beta} > 0 needs the reference "
                         f"log-probabilities (pass beta=0 to train without a reference)")
    if ref_logprobs is not None:
        _check_bt("ref_logprobs", ref_logprobs, logprobs.shape)
    if not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) != (B,):
        got = f"shape {tuple(advantages.shape)}" if isinstance(advantages, torch.Tensor) else type(advantages).__name__
        raise ValueError(f"grpo_loss: argument 'advantages' must be a tensor [B] = ({B},), got {got}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, T):
        got = f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"grpo_loss: argument 'mask' must be a tensor [B, T] = ({B}, {T}), got {got}")
    if mask.dtype != torch.bool and mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"grpo_loss: argument 'mask' must hold only 0 and 1, got values {torch.unique(mask).tolist()[:8]}")
    if not _is_real(clip_eps) or clip_eps < 0:
        raise ValueError(f"grpo_loss: argument 'clip_eps' must be a finite float >= 0, got {clip_eps!r}")
    if clip_eps_high is not None and (not _is_real(clip_eps_high) or clip_eps_high < 0):
        raise ValueError(f"grpo_loss: argument 'clip_eps_high' must be None or a finite float >= 0, got {clip_eps_high!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"grpo_loss: argument 'loss_type' must be one of {', '.join(map(repr, LOSS_TYPES))}, "
                         f"got {loss_type!r}")
    if max_completion_length is None:
        max_completion_length = T
    elif not _is_int(max_completion_length) or max_completion_length < max(T, 1):
        raise ValueError(f"grpo_loss: argument 'max_completion_length' must be an int >= T={max(T, 1)} (the longest "
                         f"completion the sampler allows), got {max_completion_length!r}")

    high = clip_eps if clip_eps_high is None else clip_eps_high
    mb = mask.bool()
    m = mb.to(logprobs.dtype)
    # padding slots may hold anything (a sampler's garbage, NaN): zeroed before any arithmetic, so that neither
    # the loss nor the gradient sees them (x * 0 keeps a NaN, and so would the gradient of exp through a where)
    zero = logprobs.new_zeros(())
    logprobs = torch.where(mb, logprobs, zero)
    old_logprobs = torch.where(mb, old_logprobs.detach().to(logprobs.dtype), zero)
    if ref_logprobs is not None:
        ref_logprobs = torch.where(mb, ref_logprobs.detach().to(logprobs.dtype), zero)
    A = advantages.detach().to(logprobs.dtype)[:, None]
    ratio = torch.exp(logprobs - old_logprobs)
    surrogate = torch.minimum(ratio * A, ratio.clamp(1 - clip_eps, 1 + high) * A)
    per_token = -surrogate
    kl = None
    if ref_logprobs is not None:
        d = ref_logprobs - logprobs
        kl = torch.exp(d) - d - 1
        if beta > 0:
            per_token = per_token + beta * kl
    masked = per_token * m
    if loss_type == "grpo":
        loss = (masked.sum(1) / m.sum(1).clamp(min=1)).sum() / max(B, 1)
    elif loss_type == "dapo":
        loss = masked.sum() / m.sum().clamp(min=1)
    else:
        loss = masked.sum() / (max(B, 1) * max_completion_length)

    with torch.no_grad():
        n = m.sum().clamp(min=1)
        clipped = ((ratio < 1 - clip_eps) & (A < 0)) | ((ratio > 1 + high) & (A > 0))
        stats = {"kl": None if kl is None else float((kl * m).sum() / n),
                 "clip_fraction": float((clipped.to(m.dtype) * m).sum() / n),
                 "ratio_mean": float((ratio * m).sum() / n),
                 "tokens": int(m.sum())}
    return loss, stats
