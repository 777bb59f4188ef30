"""RMSNorm with Hugging Face / DeepSeek-V3 semantics."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """``weight * (x * rsqrt(mean(x^2) + eps))``: statistics in fp32, the normalized value cast back to the
    input dtype, then multiplied by the weight (kept fp32 in training; the product follows torch promotion)."""

    def __init__(self, dim: int, eps: float = 1e-6, *, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype or torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(dt) * h.to(dt)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
