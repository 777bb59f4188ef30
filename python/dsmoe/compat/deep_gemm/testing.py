"""``deep_gemm.testing``: the numeric helpers DeepGEMM's tests use."""
from __future__ import annotations

import torch

__all__ = ["calc_diff", "count_bytes", "get_arch_major"]


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """``1 - 2 sum(xy) / sum(x^2 + y^2)`` in fp64: 0 for equal tensors, scale-free."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    if denom == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denom)


def count_bytes(*tensors) -> int:
    """Total bytes of the tensors given (nested tuples/lists and None allowed)."""
    total = 0
    for t in tensors:
        if isinstance(t, (tuple, list)):
            total += count_bytes(*t)
        elif t is not None:
            total += t.numel() * t.element_size()
    return total


def get_arch_major() -> int:
    """9: this module implements DeepGEMM's Hopper (SM90) semantics on every device."""
    return 9
