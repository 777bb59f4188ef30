"""``deep_gemm.utils.math``: integer helpers and the FP8 casts DeepGEMM's tests and examples use.

The casts have the original signatures and return layouts and run dsmoe's quantizers (CUDA kernels
on CUDA tensors, ``dsmoe.ref.quant`` on CPU): scale ``max(amax, 1e-4) / 448`` per group, rounded up to
a power of two with ``use_ue8m0``, values ``e4m3(x / scale)``. (The original multiplies by
``1 / scale``; the two can differ in the last bit of rare elements.)
"""
from __future__ import annotations

import torch

from ....ops import quant as _q
from .._errors import as_int, check_tensor, value_error

__all__ = [
    "ceil_div",
    "align",
    "ceil_to_ue8m0",
    "pack_ue8m0_to_int",
    "per_token_cast_to_fp8",
    "per_channel_cast_to_fp8",
    "per_block_cast_to_fp8",
]


def ceil_div(x: int, y: int) -> int:
    """``ceil(x / y)`` for positive ``y``."""
    return (x + y - 1) // y


def align(x: int, y: int) -> int:
    """``x`` rounded up to a multiple of ``y``."""
    return ceil_div(x, y) * y


def ceil_to_ue8m0(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` rounded up to a power of two (an exponent in [1, 254], as UE8M0 stores it), fp32."""
    bits = x.abs().float().view(torch.int32)
    exp = ((bits >> 23) & 0xFF) + (bits & 0x7FFFFF).ne(0).int()
    return (exp.clamp(1, 254) << 23).view(torch.float32)


def pack_ue8m0_to_int(x: torch.Tensor) -> torch.Tensor:
    """Packs fp32 powers of two ``[..., 4n]`` into their exponent bytes, four per int32 ``[..., n]``
    (the SM100 scale format; dsmoe's GEMMs do not take it)."""
    fn = "utils.pack_ue8m0_to_int"
    check_tensor(fn, "x", x)
    if x.dtype != torch.float32 or x.shape[-1] % 4 != 0:
        raise value_error(fn, "x", f"must be float32 with a last dim that is a multiple of 4, got "
                                   f"{x.dtype} of shape {tuple(x.shape)}")
    xi = x.contiguous().view(torch.int32)
    if bool(((xi < 0) | ((xi & 0x7FFFFF) != 0)).any()):
        raise value_error(fn, "x", "must hold non-negative powers of two (UE8M0 values)")
    return (xi >> 23).to(torch.uint8).view(torch.int32)


def _check_x(fn: str, x, gran_k) -> int:
    check_tensor(fn, "x", x, ndim=2)
    if not x.dtype.is_floating_point or x.dtype.itemsize == 1:
        raise value_error(fn, "x", f"must be float32, float16 or bfloat16, got {x.dtype}")
    return as_int(fn, "gran_k", gran_k, min_value=1)


def per_token_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool, gran_k: int = 128,
                          use_packed_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [m, n]`` -> ``(e4m3 [m, n], fp32 scales [m, ceil(n / gran_k)])``, one scale per ``gran_k``
    columns of a row (1 x gran_k); a partial last group is zero-padded for its amax. With
    ``use_packed_ue8m0`` the scales come back packed (int32 ``[m, ceil(n / gran_k / 4)]``)."""
    fn = "utils.per_token_cast_to_fp8"
    g = _check_x(fn, x, gran_k)
    if use_packed_ue8m0 and not use_ue8m0:
        raise value_error(fn, "use_packed_ue8m0", "needs use_ue8m0=True")
    m, n = x.shape
    n_pad = align(n, g)
    xp = x.contiguous() if n_pad == n else torch.nn.functional.pad(x, (0, n_pad - n))
    q, s = _q.per_token_group_quant_fp8(xp, g, scale_ue8m0=bool(use_ue8m0))
    q = q[:, :n].contiguous() if n_pad != n else q
    if use_packed_ue8m0:
        s4 = torch.nn.functional.pad(s, (0, align(s.shape[-1], 4) - s.shape[-1]), value=1.0)
        s = pack_ue8m0_to_int(s4)
    return q, s


def per_channel_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool, gran_k: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [m, n]`` (``m`` a multiple of ``gran_k``) -> ``(e4m3 [m, n], fp32 scales [m / gran_k, n])``,
    one scale per ``gran_k`` rows of a column (the K-grouped operands' layout: K runs down the rows)."""
    fn = "utils.per_channel_cast_to_fp8"
    g = _check_x(fn, x, gran_k)
    if x.shape[0] % g != 0:
        raise value_error(fn, "x", f"rows ({x.shape[0]}) must be a multiple of gran_k={g}")
    q, s = _q.per_token_group_quant_fp8(x.t().contiguous(), g, scale_ue8m0=bool(use_ue8m0))
    return q.t().contiguous(), s.t().contiguous()


def per_block_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool, gran_k: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [m, n]`` -> ``(e4m3 [m, n], fp32 scales [ceil(m / gran_k), ceil(n / gran_k)])``, one scale per
    gran_k x gran_k block (partial edge blocks zero-padded for their amax): the weight format."""
    fn = "utils.per_block_cast_to_fp8"
    g = _check_x(fn, x, gran_k)
    return _q.per_block_quant_fp8(x, (g, g), scale_ue8m0=bool(use_ue8m0))

