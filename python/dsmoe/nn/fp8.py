"""FP8 linear layers (DeepSeek-V3 recipe): Fprop, Dgrad and Wgrad in FP8 with fp32 master weights.

- Fprop  ``y  = x @ W^T``: x quantized 1x128 along K, W quantized in 128x128 blocks.
- Dgrad  ``dx = dy @ W``: dy quantized 1x128 along N; the weight's 128x128 blocks are reused
  transposed (a 128x128 block scale is the same for W and W^T, so ``(W_fp8^T, scale^T)`` is exact).
- Wgrad  ``dW = dy^T @ x``: dy and x re-quantized 1x128 along the token dimension (128x1 tiles).

Everything runs through ``dsmoe.ops`` (CUDA kernels on GPU, the references on CPU: real e4m3 rounding,
emulated arithmetic). Dimensions that are not multiples of 128 are zero-padded internally (zero rows and
columns change neither the amax of a group nor the product).

Serving mode (``FP8Linear.from_fp8``/checkpoint loading) keeps the e4m3 weight and its
``weight_scale_inv`` exactly as stored in V3 checkpoints.

Switches: ``FP8Linear(..., fp8=False)``, :func:`set_fp8` on any module tree, or the
:func:`fp8_autocast` context (``enabled=False`` forces BF16/FP32 math everywhere inside it).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops

__all__ = ["FP8Linear", "fp8_autocast", "fp8_is_enabled", "set_fp8", "fp8_linear", "pad_to", "ceil_to"]

_BLOCK = 128
_FP8 = torch.float8_e4m3fn
_STATE = {"enabled": True}


@contextlib.contextmanager
def fp8_autocast(enabled: bool = True):
    """Inside ``with fp8_autocast(False):`` every FP8Linear computes in its master dtype (BF16/FP32)."""
    prev = _STATE["enabled"]
    _STATE["enabled"] = bool(enabled)
    try:
        yield
    finally:
        _STATE["enabled"] = prev


def fp8_is_enabled() -> bool:
    return _STATE["enabled"]


def set_fp8(module: nn.Module, enabled: bool) -> nn.Module:
    """Turns FP8 compute on or off for every FP8 layer under ``module`` (returns ``module``)."""
    for m in module.modules():
        if hasattr(m, "fp8") and isinstance(getattr(m, "fp8"), bool):
            m.fp8 = bool(enabled)
    return module


def ceil_to(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def pad_to(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """Zero-pads dim ``dim`` of ``t`` up to a multiple of ``multiple`` (no copy when already aligned)."""
    n = t.shape[dim]
    p = ceil_to(n, multiple) - n
    if p == 0:
        return t
    shape = list(t.shape)
    shape[dim] = p
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


# ----------------------------------------------------------------------------- GEMM adapters
def _gemm_nt(a, a_s, b, b_s, out_dtype):
    """``a [M, K] (1x128) @ b [N, K]^T (128x128)`` -> ``[M, N]`` out_dtype."""
    if a.shape[0] == 0:
        return torch.zeros(0, b.shape[0], dtype=out_dtype, device=a.device)
    return ops.fp8_gemm_nt(a, a_s, b, b_s, out_dtype=out_dtype)


def _quant_act(x2: torch.Tensor):
    return ops.per_token_group_quant_fp8(x2.contiguous(), _BLOCK)


def _quant_w(w: torch.Tensor):
    return ops.per_block_quant_fp8(w.contiguous(), (_BLOCK, _BLOCK))


def _wgrad(dy2: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """``dW [N, K] = dy^T x`` with both operands quantized 1x128 along the token dim M; fp32 out.
    N and K are already multiples of 128 here."""
    M = dy2.shape[0]
    if M == 0:
        return torch.zeros(dy2.shape[1], x2.shape[1], dtype=torch.float32, device=dy2.device)
    aq, a_s = ops.per_token_group_quant_fp8_transposed(dy2.contiguous())   # [N, Mp]
    bq, b_s = ops.per_token_group_quant_fp8_transposed(x2.contiguous())    # [K, Mp]
    return ops.fp8_gemm_tn(aq, a_s, bq, b_s)


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor):
        N, K = weight.shape
        lead = x.shape[:-1]
        # NOTE: the row count from the shape: reshape(-1, K) is ambiguous when K = 0
        x2 = x.reshape(math.prod(lead), K)
        Np, Kp = ceil_to(N, _BLOCK), ceil_to(K, _BLOCK)
        if N == 0 or K == 0:  # an empty product: zeros (nothing to quantize)
            ctx.save_for_backward(x2, None, None)
            ctx.shape = (N, K, Np, Kp)
            return x.new_zeros(*lead, N)
        wp = pad_to(pad_to(weight, 0, _BLOCK), 1, _BLOCK)
        wq, ws = _quant_w(wp)
        xq, xs = _quant_act(pad_to(x2, 1, _BLOCK))
        y = _gemm_nt(xq, xs, wq, ws, x.dtype)[:, :N]
        ctx.save_for_backward(x2, wq, ws)
        ctx.shape = (N, K, Np, Kp)
        return y.reshape(*lead, N)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x2, wq, ws = ctx.saved_tensors
        N, K, Np, Kp = ctx.shape
        g2 = gy.reshape(x2.shape[0], N).to(x2.dtype)
        dx = dw = None
        if g2.shape[0] == 0 or N == 0 or K == 0:
            # no tokens or an empty weight: zero gradients (an empty grad may come with zero strides)
            return gy.new_zeros(*gy.shape[:-1], K), torch.zeros(N, K, dtype=torch.float32, device=gy.device)
        if ctx.needs_input_grad[0]:
            gq, gs = _quant_act(pad_to(g2, 1, _BLOCK))
            dx = _gemm_nt(gq, gs, wq.t().contiguous(), ws.t().contiguous(), x2.dtype)[:, :K]
            dx = dx.reshape(*gy.shape[:-1], K)
        if ctx.needs_input_grad[1]:
            dw = _wgrad(pad_to(g2, 1, _BLOCK), pad_to(x2, 1, _BLOCK))[:N, :K]
        return dx, dw


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T`` with FP8 Fprop/Dgrad/Wgrad (differentiable in x and weight); output x.dtype,
    weight gradient in fp32 cast to the weight's dtype by autograd."""
    return _FP8LinearFn.apply(x, weight)


def _fp8_serving_linear(x, w_fp8, scale_inv, use_fp8: bool):
    N, K = w_fp8.shape
    if not use_fp8:
        w = ops.per_block_dequant_fp8(w_fp8, scale_inv, (_BLOCK, _BLOCK), out_dtype=x.dtype)
        return F.linear(x, w)
    lead = x.shape[:-1]
    if N == 0 or K == 0:
        return x.new_zeros(*lead, N)
    x2 = pad_to(x.reshape(math.prod(lead), K), 1, _BLOCK)
    if N % _BLOCK or K % _BLOCK:
        # zero e4m3 bytes are 0.0; padded scales are 1 (any finite value works for zero blocks)
        wp = pad_to(pad_to(w_fp8.view(torch.uint8), 0, _BLOCK), 1, _BLOCK).view(_FP8)
        sp = torch.ones(ceil_to(N, _BLOCK) // _BLOCK, ceil_to(K, _BLOCK) // _BLOCK,
                        dtype=torch.float32, device=x.device)
        sp[: scale_inv.shape[0], : scale_inv.shape[1]] = scale_inv
        w_fp8, scale_inv = wp, sp
    xq, xs = _quant_act(x2)
    y = _gemm_nt(xq, xs, w_fp8, scale_inv.float().contiguous(), x.dtype)[:, :N]
    return y.reshape(*lead, N)


class FP8Linear(nn.Module):
    """``y = x @ W^T`` (no bias) computed in FP8 (see module doc).

    Training mode: ``weight`` is the master weight (fp32 by default, or ``dtype``).
    Serving mode: ``weight`` is float8_e4m3fn and ``weight_scale_inv`` (fp32 ``[ceil(out/128), ceil(in/128)]``)
    holds the block dequantization multipliers, as in V3 checkpoints; not trainable.
    ``fp8=False`` computes in the master dtype (a plain ``F.linear``).
    """

    def __init__(self, in_features: int, out_features: int, *, fp8: bool = True, dtype=None, device=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"FP8Linear: argument '{name}' must be an int >= 0, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        self.fp8 = fp8
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype or torch.float32, device=device))
        self.register_buffer("weight_scale_inv", None)
        nn.init.normal_(self.weight, std=0.02) if self.weight.numel() else None

    @property
    def is_fp8_weight(self) -> bool:
        return self.weight.dtype == _FP8

    def load_fp8(self, w_fp8: torch.Tensor, scale_inv: torch.Tensor) -> None:
        """Switches to serving mode with a checkpoint's e4m3 weight and its ``weight_scale_inv``."""
        exp = (self.out_features, self.in_features)
        if tuple(w_fp8.shape) != exp:
            raise ValueError(f"FP8Linear.load_fp8: weight shape {tuple(w_fp8.shape)} != expected {exp}")
        sexp = (math.ceil(exp[0] / _BLOCK), math.ceil(exp[1] / _BLOCK))
        if tuple(scale_inv.shape) != sexp:
            raise ValueError(f"FP8Linear.load_fp8: weight_scale_inv shape {tuple(scale_inv.shape)} != expected {sexp}")
        self.weight = nn.Parameter(w_fp8.to(_FP8), requires_grad=False)
        self.weight_scale_inv = scale_inv.float()

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        if self.is_fp8_weight:
            return ops.per_block_dequant_fp8(self.weight, self.weight_scale_inv, (_BLOCK, _BLOCK), out_dtype=dtype)
        return self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.in_features:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self._layer_name()}: argument 'x' must have in_features={self.in_features} in its "
                             f"last dim, got {got}")
        use = self.fp8 and _STATE["enabled"]
        if self.is_fp8_weight:
            return _fp8_serving_linear(x, self.weight, self.weight_scale_inv, use)
        if use:
            return fp8_linear(x, self.weight)
        return F.linear(x, self.weight.to(x.dtype))

    def _layer_name(self) -> str:
        return f"FP8Linear(in_features={self.in_features}, out_features={self.out_features})"

    def extra_repr(self) -> str:
        mode = "fp8-weight" if self.is_fp8_weight else ("fp8" if self.fp8 else "master-dtype")
        return f"in={self.in_features}, out={self.out_features}, {mode}"
