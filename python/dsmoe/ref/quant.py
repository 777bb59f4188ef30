"""Reference FP8 (e4m3) quantization: the specification of dsmoe's quantizers and their CPU path.

Formulas (DeepSeek-V3): per group or block, ``amax = max|x|`` in fp32 clamped to at least 1e-4,
``scale = amax / 448`` (or, with UE8M0, ``2**ceil(log2(scale))``), ``q = e4m3(x / scale)`` with
round-to-nearest-even and saturation at +-448. The stored scale is the dequantization multiplier.

Special values (same on CPU and GPU):
- an all-zero group gets the clamped scale ``1e-4 / 448`` and zero bytes, never NaN;
- a NaN anywhere in a group makes that group's scale NaN and all its bytes the NaN byte 0x7f; other
  groups are unaffected;
- an inf in a group makes its scale inf; the inf elements become NaN (0x7f) and the finite ones +-0;
- huge finite values are fine (the scale follows them); subnormal inputs quantize to 0 or to e4m3
  subnormals exactly as the division says.
"""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4


def ue8m0_round_up(s: torch.Tensor) -> torch.Tensor:
    """``2**ceil(log2(s))`` computed exactly (no log2 rounding): powers of two stay, others round up."""
    m, e = torch.frexp(s)  # s = m * 2**e with m in [0.5, 1)
    up = torch.ldexp(torch.ones_like(s), e - (m == 0.5).to(e.dtype))
    return torch.where(torch.isfinite(s) & (s > 0), up, s)


def to_fp8(y: torch.Tensor) -> torch.Tensor:
    """fp32 -> e4m3 with RNE, saturating to +-448; every NaN becomes the positive NaN byte 0x7f.

    NOTE: the sign of a NaN made by arithmetic differs between CPU and GPU, so both canonicalize it.
    """
    y = torch.where(torch.isnan(y), y.abs(), y)
    return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _scale_from_amax(amax: torch.Tensor, ue8m0: bool) -> torch.Tensor:
    s = amax.clamp(min=AMAX_FLOOR) / FP8_MAX
    return ue8m0_round_up(s) if ue8m0 else s


def mn_major_scales(s: torch.Tensor) -> torch.Tensor:
    """Re-lays scales ``[..., M, G]`` (2D or 3D) MN-major: same shape, stride 1 along M, and M's stride
    padded to a multiple of 4 floats (16 bytes, what TMA needs). Padding entries are zero."""
    if s.dim() not in (2, 3):
        raise ValueError(f"column-major scales need a 2D or 3D input, got scales of shape {tuple(s.shape)}")
    M, G = s.shape[-2], s.shape[-1]
    m_pad = (M + 3) // 4 * 4
    storage = s.new_zeros(*s.shape[:-2], G, m_pad)
    out = storage[..., :M].transpose(-1, -2)
    out.copy_(s)
    return out


def per_token_group_quant_fp8(x: torch.Tensor, group_size: int = 128, *, scale_ue8m0: bool = False,
                              column_major_scales: bool = False):
    """x ``[..., K]`` -> (e4m3 ``[..., K]``, fp32 scales ``[..., K/group_size]``)."""
    K = x.shape[-1]
    if K % group_size != 0:
        raise ValueError(f"K={K} must be a multiple of group_size={group_size}")
    g = K // group_size
    xg = x.float().reshape(*x.shape[:-1], g, group_size)
    amax = xg.abs().amax(dim=-1) if xg.numel() else xg.new_zeros(xg.shape[:-1])
    s = _scale_from_amax(amax, scale_ue8m0)
    q = to_fp8(xg / s.unsqueeze(-1)).reshape(x.shape)
    if column_major_scales:
        s = mn_major_scales(s)
    return q, s


def per_token_group_dequant_fp8(q: torch.Tensor, scales: torch.Tensor, group_size: int = 128,
                                out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of per_token_group_quant_fp8: ``q * scale`` per group, in fp32, cast to out_dtype."""
    K = q.shape[-1]
    g = K // group_size
    y = q.float().reshape(*q.shape[:-1], g, group_size) * scales.float().unsqueeze(-1)
    return y.reshape(q.shape).to(out_dtype)


def per_block_quant_fp8(w: torch.Tensor, block_size=(128, 128), *, scale_ue8m0: bool = False):
    """w ``[N, K]`` -> (e4m3 ``[N, K]``, fp32 scale_inv ``[ceil(N/bn), ceil(K/bk)]``).

    Partial edge blocks are zero-padded before the amax (V3 checkpoint format)."""
    bn, bk = block_size
    N, K = w.shape
    nb, kb = -(-N // bn), -(-K // bk)
    wp = w.float().new_zeros(nb * bn, kb * bk)
    wp[:N, :K] = w.float()
    blocks = wp.view(nb, bn, kb, bk)
    amax = blocks.abs().amax(dim=(1, 3)) if blocks.numel() else blocks.new_zeros(nb, kb)
    s = _scale_from_amax(amax, scale_ue8m0)
    q = to_fp8(blocks / s[:, None, :, None]).view(nb * bn, kb * bk)[:N, :K].contiguous()
    return q, s


def per_block_dequant_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block_size=(128, 128),
                          out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of per_block_quant_fp8: ``q * scale_inv[block]`` in fp32, cast to out_dtype."""
    bn, bk = block_size
    N, K = q.shape
    s = scale_inv.float().repeat_interleave(bn, dim=0).repeat_interleave(bk, dim=1)[:N, :K]
    return (q.float() * s).to(out_dtype)
