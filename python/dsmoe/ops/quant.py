"""FP8 (e4m3) quantization ops: 1xG token groups for activations, BNxBK blocks for weights.

CUDA tensors run dsmoe's kernels (bit-identical to ``dsmoe.ref.quant``); CPU tensors run the
reference. See ``dsmoe.ref.quant`` for the formulas and what NaN/inf inputs produce.
"""
from __future__ import annotations

import torch

from .. import _checks as C
from .. import _native
from ..ref import quant as ref
from ._registry import register

__all__ = [
    "per_token_group_quant_fp8",
    "per_token_group_dequant_fp8",
    "per_block_quant_fp8",
    "per_block_dequant_fp8",
]

_FLOAT_IN = (torch.float32, torch.float16, torch.bfloat16)
_FP8 = torch.float8_e4m3fn


def _alloc_scales(shape, group_size: int, column_major: bool, device) -> torch.Tensor:
    lead, g = tuple(shape[:-1]), shape[-1] // group_size
    if not column_major:
        return torch.empty(*lead, g, dtype=torch.float32, device=device)
    M = lead[-1]
    m_pad = (M + 3) // 4 * 4
    storage = torch.empty(*lead[:-1], g, m_pad, dtype=torch.float32, device=device)
    if m_pad > M:
        storage[..., M:].zero_()
    return storage[..., :M].transpose(-1, -2)


def _check_group_size(op: str, group_size) -> int:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"dsmoe.{op}: argument 'group_size' must be a positive int, got {group_size!r}")
    return group_size


# ----------------------------------------------------------------------------- per-token-group
@torch.library.custom_op("dsmoe::per_token_group_quant_fp8", mutates_args=())
def _token_group_quant(x: torch.Tensor, group_size: int, scale_ue8m0: bool,
                       column_major_scales: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not _native.use_kernel("quant", x):
        q, s = ref.per_token_group_quant_fp8(x, group_size, scale_ue8m0=scale_ue8m0,
                                             column_major_scales=column_major_scales)
        return q, s
    op = "per_token_group_quant_fp8"
    x2 = C.rows_view(op, "x", x)
    q = torch.empty(x.shape, dtype=_FP8, device=x.device)
    s = _alloc_scales(x.shape, group_size, column_major_scales, x.device)
    rows, K = x2.shape
    if rows == 0 or K == 0:
        return q, s
    if group_size not in _native.native().token_group_sizes:
        raise ValueError(f"dsmoe.{op}: argument 'group_size': the CUDA kernel supports "
                         f"{list(_native.native().token_group_sizes)}, got {group_size}")
    if x2.data_ptr() % 16 or (x2.stride(0) * x.element_size()) % 16:
        raise ValueError(f"dsmoe.{op}: argument 'x': data pointer and row stride must be 16-byte aligned, "
                         f"got pointer offset {x2.data_ptr() % 16} and row stride {x2.stride(0)} elements")
    g = K // group_size
    if column_major_scales:
        M = x.shape[-2]
        m_pad = s.stride(-1)
        rows_inner, s_batch, s_row, s_col = M, (g * m_pad if x.dim() == 3 else 0), 1, m_pad
    else:
        rows_inner, s_batch, s_row, s_col = rows, 0, g, 1
    launch = _native.require_kernel(op, "token_group_quant", x.device)
    launch(x2.data_ptr(), _native.DTYPE_CODES[x.dtype], q.data_ptr(), s.data_ptr(), rows, K, x2.stride(0), K,
           rows_inner, s_batch, s_row, s_col, group_size, scale_ue8m0, _native.stream(x))
    return q, s


@_token_group_quant.register_fake
def _(x, group_size, scale_ue8m0, column_major_scales):
    return torch.empty(x.shape, dtype=_FP8, device=x.device), _alloc_scales(x.shape, group_size, column_major_scales, x.device)


def per_token_group_quant_fp8(x: torch.Tensor, group_size: int = 128, *, scale_ue8m0: bool = False,
                              column_major_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes ``x [..., K]`` (fp32/fp16/bf16) to e4m3 in groups of ``group_size`` along K.

    Returns ``(x_fp8 [..., K], scales fp32 [..., K // group_size])`` with ``x ~= x_fp8 * scale``.
    ``scale_ue8m0`` rounds scales up to powers of two. ``column_major_scales`` (2D or 3D ``x``) returns
    the scales MN-major with M's stride padded to a multiple of 4 (the TMA-aligned layout the grouped
    GEMMs consume); the padding is zero.
    """
    op = "per_token_group_quant_fp8"
    C.check_tensor(op, "x", x, dtypes=_FLOAT_IN, min_ndim=1)
    _check_group_size(op, group_size)
    C.check_multiple(op, "x", x.shape[-1], group_size, "K (last dim)")
    if column_major_scales and x.dim() not in (2, 3):
        raise ValueError(f"dsmoe.{op}: argument 'x' must be 2D or 3D with column_major_scales=True, got shape {tuple(x.shape)}")
    C.rows_view(op, "x", x)
    return torch.ops.dsmoe.per_token_group_quant_fp8(x, group_size, bool(scale_ue8m0), bool(column_major_scales))


def per_token_group_dequant_fp8(x_fp8: torch.Tensor, scales: torch.Tensor, group_size: int = 128,
                                out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``x_fp8 [..., K] * scale`` per group of ``group_size`` along K, computed in fp32 and cast to
    ``out_dtype`` (any device; plain torch). ``scales`` fp32 ``[..., K // group_size]`` in either layout
    ``per_token_group_quant_fp8`` returns (row-major or ``column_major_scales``). NaN scales or NaN bytes
    give NaN; empty inputs give empty outputs."""
    op = "per_token_group_dequant_fp8"
    C.check_tensor(op, "x_fp8", x_fp8, dtypes=(_FP8,), min_ndim=1)
    C.check_tensor(op, "scales", scales, dtypes=(torch.float32,))
    _check_group_size(op, group_size)
    C.check_float_dtype(op, "out_dtype", out_dtype)
    C.check_multiple(op, "x_fp8", x_fp8.shape[-1], group_size, "K (last dim)")
    C.check_shape(op, "scales", scales, (*x_fp8.shape[:-1], x_fp8.shape[-1] // group_size))
    C.check_same_device(op, {"x_fp8": x_fp8, "scales": scales})
    return ref.per_token_group_dequant_fp8(x_fp8, scales, group_size, out_dtype)


# ----------------------------------------------------------------------------- per-block (weights)
@torch.library.custom_op("dsmoe::per_block_quant_fp8", mutates_args=())
def _block_quant(w: torch.Tensor, block_n: int, block_k: int, scale_ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not _native.use_kernel("quant", w):
        return ref.per_block_quant_fp8(w, (block_n, block_k), scale_ue8m0=scale_ue8m0)
    N, K = w.shape
    q = torch.empty((N, K), dtype=_FP8, device=w.device)
    s = torch.empty((-(-N // block_n), -(-K // block_k)), dtype=torch.float32, device=w.device)
    if N == 0 or K == 0:
        return q, s
    launch = _native.require_kernel("per_block_quant_fp8", "block_quant", w.device)
    launch(w.data_ptr(), _native.DTYPE_CODES[w.dtype], q.data_ptr(), s.data_ptr(), N, K, w.stride(0), K,
           block_n, block_k, scale_ue8m0, _native.stream(w))
    return q, s


@_block_quant.register_fake
def _(w, block_n, block_k, scale_ue8m0):
    N, K = w.shape
    return (torch.empty((N, K), dtype=_FP8, device=w.device),
            torch.empty((-(-N // block_n), -(-K // block_k)), dtype=torch.float32, device=w.device))


def _check_block_size(op: str, block_size) -> tuple[int, int]:
    ok = (isinstance(block_size, (tuple, list)) and len(block_size) == 2
          and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block_size))
    if not ok:
        raise ValueError(f"dsmoe.{op}: argument 'block_size' must be two positive ints, got {block_size!r}")
    return int(block_size[0]), int(block_size[1])


def per_block_quant_fp8(w: torch.Tensor, block_size=(128, 128), *, scale_ue8m0: bool = False):
    """Quantizes a weight ``w [N, K]`` in ``block_size`` blocks (partial edge blocks included).

    Returns ``(w_fp8 [N, K], scale_inv fp32 [ceil(N/bn), ceil(K/bk)])``, the V3 checkpoint format
    (``scale_inv`` is the dequantization multiplier despite its name).
    """
    op = "per_block_quant_fp8"
    C.check_tensor(op, "w", w, dtypes=_FLOAT_IN, ndim=2)
    bn, bk = _check_block_size(op, block_size)
    C.check_last_dim_contiguous(op, "w", w)
    return torch.ops.dsmoe.per_block_quant_fp8(w, bn, bk, bool(scale_ue8m0))


def per_block_dequant_fp8(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block_size=(128, 128),
                          out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``w_fp8 [N, K] * scale_inv[n // bn, k // bk]`` computed in fp32 and cast to ``out_dtype`` (any
    device; plain torch). ``scale_inv`` fp32 or bf16 ``[ceil(N/bn), ceil(K/bk)]``, partial edge blocks
    included, as ``per_block_quant_fp8`` returns it and V3 checkpoints store it."""
    op = "per_block_dequant_fp8"
    C.check_tensor(op, "w_fp8", w_fp8, dtypes=(_FP8,), ndim=2)
    C.check_tensor(op, "scale_inv", scale_inv, dtypes=(torch.float32, torch.bfloat16), ndim=2)
    bn, bk = _check_block_size(op, block_size)
    C.check_float_dtype(op, "out_dtype", out_dtype)
    N, K = w_fp8.shape
    C.check_shape(op, "scale_inv", scale_inv, (-(-N // bn), -(-K // bk)))
    C.check_same_device(op, {"w_fp8": w_fp8, "scale_inv": scale_inv})
    return ref.per_block_dequant_fp8(w_fp8, scale_inv, (bn, bk), out_dtype)


register("per_token_group_quant_fp8", "quant", ["token_group_quant"])
register("per_block_quant_fp8", "quant", ["block_quant"])
register("per_token_group_dequant_fp8", "quant", [], "torch on every device")
register("per_block_dequant_fp8", "quant", [], "torch on every device")
