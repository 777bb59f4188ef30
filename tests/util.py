"""Metrics and helpers shared by the tests."""
from __future__ import annotations

import hashlib

import torch


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """Cosine-style difference ``1 - 2 sum(xy) / sum(x^2 + y^2)`` in fp64 (0 when equal)."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    if denom == 0:
        return 0.0
    return (1 - 2 * (x * y).sum() / denom).item()


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` in fp64."""
    x, ref = x.double(), ref.double()
    n = ref.norm()
    return ((x - ref).norm() / n).item() if n > 0 else (x - ref).norm().item()


def poison(shape, dtype, device) -> torch.Tensor:
    """A tensor full of NaN (or 0xff bytes for integer/fp8 types): shows any element a kernel did not write."""
    if dtype.is_floating_point and dtype != torch.float8_e4m3fn:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    t = torch.empty(shape, dtype=dtype, device=device)
    t.view(torch.uint8).fill_(0xFF) if t.element_size() == 1 else t.fill_(-1)
    return t


def digest(*ts: torch.Tensor) -> str:
    """Hash of the bytes of tensors (determinism checks)."""
    h = hashlib.sha256()
    for t in ts:
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def same_bits_nan_aware(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of fp32 tensors where any NaN equals any NaN."""
    a, b = a.float().cpu(), b.float().cpu()
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        return False
    return torch.equal(a[~na].view(torch.int32), b[~nb].view(torch.int32))
