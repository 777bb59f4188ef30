"""Rotary position embedding with YaRN scaling, DeepSeek-V3 style.

Frequencies (V3_SPEC): ``freqs = 1/base^(arange(0,d,2)/d)``; YaRN blends interpolated (``freqs/factor``)
and extrapolated frequencies with a linear ramp between the correction dims ``low``/``high`` derived from
``beta_fast``/``beta_slow``; cos/sin are multiplied by the YaRN attention factor
(``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``, 1.0 for V3).

Layout: DeepSeek stores rotary dims as interleaved pairs ``(x[2i], x[2i+1])``. With ``interleave=True``
(HF ``rope_interleave``) the pairs are rotated and the result is written de-interleaved
``[evens' | odds']``, as Hugging Face does; q·k dot products equal the official complex-number form.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["yarn_inv_freq", "RotaryEmbedding", "apply_rope"]


def _mscale(factor: float, m: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def yarn_inv_freq(dim: int, base: float, rope_scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Returns ``(inv_freq fp32 [dim/2], attention_factor)``."""
    pos = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv = 1.0 / pos
    rs = rope_scaling or {}
    if rs.get("rope_type", rs.get("type", "default")) in (None, "default"):
        return inv, 1.0
    factor = float(rs["factor"])
    orig = int(rs.get("original_max_position_embeddings", 4096))
    beta_fast = float(rs.get("beta_fast") or 32)
    beta_slow = float(rs.get("beta_slow") or 1)
    att = rs.get("attention_factor")
    if att is None:
        m, mad = rs.get("mscale"), rs.get("mscale_all_dim")
        att = _mscale(factor, m) / _mscale(factor, mad) if (m and mad) else _mscale(factor)

    def corr_dim(rot):
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp  # 1: keep (extrapolate), 0: interpolate
    inv = (1.0 / (factor * pos)) * (1 - smooth) + inv * smooth
    return inv, float(att)


class RotaryEmbedding(nn.Module):
    """Produces ``(cos, sin)`` of shape ``[..., T, dim/2]`` (fp32) for integer positions."""

    def __init__(self, dim: int, base: float = 10000.0, rope_scaling: dict | None = None):
        super().__init__()
        inv, att = yarn_inv_freq(dim, base, rope_scaling)
        self.register_buffer("inv_freq", inv, persistent=False)
        self.attention_factor = att
        self.dim, self.base, self.rope_scaling = dim, base, rope_scaling

    def reset_non_persistent_buffers(self) -> None:
        """Recomputes ``inv_freq`` (no checkpoint holds it) on its current device, e.g. after ``to_empty``."""
        self.inv_freq = yarn_inv_freq(self.dim, self.base, self.rope_scaling)[0].to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = positions.float()[..., None] * self.inv_freq.to(positions.device)
        return f.cos() * self.attention_factor, f.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """Rotates ``x [B, T, H, d]`` by ``cos/sin [B or 1, T, d/2]``; output in ``x.dtype``.

    Like HF, the cos/sin are cast to ``x.dtype`` first."""
    dt = x.dtype
    c = cos.to(dt)[:, :, None, :]
    s = sin.to(dt)[:, :, None, :]
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
