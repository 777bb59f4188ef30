"""FP8 block-scaled GEMMs (DeepSeek-V3 semantics): dense NT, MoE-grouped NT (contiguous and masked),
and the weight-gradient TN GEMMs (dense and k-grouped), plus the transposed quantizer their operands
come from.

CUDA tensors run dsmoe's sm_90a kernels (include/dsmoe/gemm/); CPU tensors run ``dsmoe.ref.gemm``,
which is the specification (read it for the exact formulas, layouts and what is left unwritten).
Every op checks its arguments here, before any launch; the launcher checks them again.

Values that live on the device (``m_indices``, ``masked_m``, ``group_sizes``) are checked too when that
is possible without breaking CUDA-graph capture or ``torch.compile``: in eager mode by default (one
host synchronization; pass ``validate=False`` to skip it). The kernels never read or write out of
bounds whatever those values are, and the CPU path does exactly what they do (dsmoe.ref.gemm states
it): an ``m_indices`` entry outside ``[0, G)`` or not matching its aligned block's first row is
padding, ``masked_m`` is clamped to ``[0, M_max]``, a k-grouped size takes ``max(size, 0) // 128``
blocks cut at the end of T.
"""
from __future__ import annotations

import functools

import torch

from .. import _checks as C
from .. import _native
from ..gemm_config import KINDS, choose_config
from ..ref import gemm as ref
from ..ref.quant import mn_major_scales
from ._registry import register

# Every op is named after its reference (the specification): the public names are ref's, less its
# constants.
__all__ = [n for n in ref.__all__ if n not in ("BLOCK_K", "M_ALIGNMENT")]

_FP8 = torch.float8_e4m3fn
_F32 = torch.float32
_BK = ref.BLOCK_K
_OUT_NT = (torch.bfloat16, torch.float32)


def get_m_alignment_for_contiguous_layout() -> int:
    """Each group of the contiguous grouped layout starts at a multiple of this many rows."""
    return ref.get_m_alignment_for_contiguous_layout()


# ----------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _eager_device_checks(validate: bool, t: torch.Tensor) -> bool:
    """True when the device-resident index values may be read on the host now."""
    return bool(validate) and C.can_read_device_values(t)


def _tma_scales(s: torch.Tensor) -> torch.Tensor:
    """Scales [..., M, kb] in the layout the kernels load with TMA: stride 1 along M, the kb stride a
    multiple of 4 floats (16 bytes) and >= M, a 16-byte aligned pointer and, for 3D, a group stride that
    is a multiple of 4 and >= kb * that. Returns ``s`` itself when it already is (e.g. the output of
    ``column_major_scales=True``), else a re-laid copy (its size depends on the shape only)."""
    M, kb = s.shape[-2], s.shape[-1]
    ld = s.stride(-1)
    ok = (kb > 1 and s.data_ptr() % 16 == 0 and (M <= 1 or s.stride(-2) == 1) and ld % 4 == 0 and ld >= M
          and (s.dim() == 2 or (s.stride(0) % 4 == 0 and s.stride(0) >= kb * ld)))
    # NOTE: kb == 1 always takes the copy: strides of a size-1 dim say nothing about the padding.
    return s if ok else mn_major_scales(s)


def _scale_strides(s: torch.Tensor) -> tuple[int, int]:
    """(stride of the kb dim, stride of the group dim) in elements of a tensor from _tma_scales."""
    return s.stride(-1), (s.stride(0) if s.dim() == 3 else 0)


def _check_fp8(op, arg, t, ndim):
    C.check_tensor(op, arg, t, dtypes=(_FP8,), ndim=ndim)
    C.check_contiguous(op, arg, t)


def _check_scales(op, arg, t, shape):
    C.check_tensor(op, arg, t, dtypes=(_F32,), ndim=len(shape))
    C.check_shape(op, arg, t, shape)


def _check_out(op, out, shape, dtypes):
    C.check_tensor(op, "out", out, dtypes=dtypes, ndim=len(shape))
    C.check_shape(op, "out", out, shape)
    C.check_contiguous(op, "out", out)


def _check_K(op, arg, K):
    if K % _BK != 0:
        raise ValueError(f"dsmoe.{op}: argument '{arg}': K={K} must be a multiple of {_BK}")


def _check_N(op, arg, N):
    if N % 64 != 0:
        raise ValueError(f"dsmoe.{op}: argument '{arg}': N={N} must be a multiple of 64")


def _check_2d_pair(op, a, b, kname):
    """a [M, K] and b [N, K], e4m3 and contiguous, K a multiple of 128, N of 64; returns (M, N, K).
    kname names the reduction dim in messages (K, or T for the TN GEMMs)."""
    _check_fp8(op, "a", a, 2)
    _check_fp8(op, "b", b, 2)
    M, K = a.shape
    N = b.shape[0]
    if b.shape[1] != K:
        raise ValueError(f"dsmoe.{op}: argument 'b' must have {kname}={K} columns like 'a', got shape {tuple(b.shape)}")
    _check_K(op, "a", K)
    _check_N(op, "b", N)
    return M, N, K


# Most SMs a GEMM launch may use (None: all of the device's). Frameworks lower it so that communication
# kernels running alongside (expert-parallel dispatch/combine) keep SMs of their own.
_SM_LIMIT: int | None = None


def set_num_sms(num_sms: int | None) -> None:
    """Caps the SMs (persistent CTAs) every GEMM launch uses at ``num_sms``; ``None`` or 0 lifts the cap.
    Results do not depend on it; on CPU tensors it has no effect."""
    global _SM_LIMIT
    if num_sms is not None and (not isinstance(num_sms, int) or isinstance(num_sms, bool) or num_sms < 0):
        raise ValueError(f"dsmoe.set_num_sms: argument 'num_sms' must be None or an int >= 0, got {num_sms!r}")
    _SM_LIMIT = num_sms or None


def get_num_sms_limit() -> int | None:
    """The cap set by :func:`set_num_sms` (None when GEMMs use every SM)."""
    return _SM_LIMIT


def _cfg(kind: str, M: int, N: int, K: int, device: torch.device):
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if _SM_LIMIT is not None:
        sms = min(sms, _SM_LIMIT)
    return choose_config(M, N, K, sms, kind)


def _cfg_args(cfg) -> tuple:
    return (cfg.block_m, cfg.block_n, cfg.num_stages, cfg.num_ctas, cfg.raster_group_n)


# ----------------------------------------------------------------------------- dense NT
@torch.library.custom_op("dsmoe::fp8_gemm_nt", mutates_args=("out",))
def _fp8_gemm_nt(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
                 out: torch.Tensor) -> None:
    if not _native.use_kernel("gemm", a):
        ref.fp8_gemm_nt(a, a_scales, b, b_scales, out=out)
        return
    M, K = a.shape
    N = b.shape[0]
    if M == 0 or N == 0:
        return
    if K == 0:
        out.zero_()
        return
    sa = _tma_scales(a_scales)
    kind = "dense" if out.dtype == torch.bfloat16 else "dense_f32"
    cfg = _cfg(kind, M, N, K, a.device)
    launch = _native.require_kernel("fp8_gemm_nt", "fp8_gemm_nt", a.device)
    launch(a.data_ptr(), sa.data_ptr(), b.data_ptr(), b_scales.data_ptr(), out.data_ptr(), M, N, K,
           _scale_strides(sa)[0], b_scales.stride(0), out.dtype == torch.float32, *_cfg_args(cfg),
           _native.stream(a))


@_fp8_gemm_nt.register_fake
def _(a, a_scales, b, b_scales, out):
    return None


def fp8_gemm_nt(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, *,
                out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``d [M, N] = a [M, K] @ b [N, K]^T`` with FP32 promotion every 128 of K.

    a: e4m3 [M, K], a_scales: fp32 [M, K/128] (row-major or MN-major); b: e4m3 [N, K] (N a multiple of
    64, K of 128), b_scales: fp32 [ceil(N/128), K/128]. ``out`` (optional, [M, N], bf16 or fp32) is
    written in full; otherwise a new tensor of ``out_dtype`` (default bfloat16) is returned. Both given:
    ``out_dtype`` must be ``out``'s dtype (a TypeError otherwise, rather than one silently ignored).
    """
    op = "fp8_gemm_nt"
    M, N, K = _check_2d_pair(op, a, b, "K")
    _check_scales(op, "a_scales", a_scales, (M, K // _BK))
    _check_scales(op, "b_scales", b_scales, (-(-N // _BK), K // _BK))
    C.check_last_dim_contiguous(op, "b_scales", b_scales)
    if out_dtype is not None and out_dtype not in _OUT_NT:
        raise TypeError(f"dsmoe.{op}: argument 'out_dtype' must be bfloat16 or float32, got {out_dtype!r}")
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype or torch.bfloat16, device=a.device)
    else:
        _check_out(op, out, (M, N), _OUT_NT)
        if out_dtype is not None and out.dtype != out_dtype:
            raise TypeError(f"dsmoe.{op}: argument 'out_dtype'={out_dtype} disagrees with argument 'out' of dtype "
                            f"{out.dtype}; pass one of them, or the same dtype")
    C.check_same_device(op, {"a": a, "a_scales": a_scales, "b": b, "b_scales": b_scales, "out": out})
    torch.ops.dsmoe.fp8_gemm_nt(a, a_scales, b, b_scales, out)
    return out


# ----------------------------------------------------------------------------- grouped contiguous
@torch.library.custom_op("dsmoe::m_grouped_fp8_gemm_nt_contiguous", mutates_args=("out",))
def _m_grouped_contiguous(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
                          m_indices: torch.Tensor, out: torch.Tensor) -> None:
    if not _native.use_kernel("gemm", a):
        ref.m_grouped_fp8_gemm_nt_contiguous(a, a_scales, b, b_scales, m_indices, out=out)
        return
    M, K = a.shape
    G, N, _ = b.shape
    if M == 0 or N == 0:
        return
    if K == 0:
        # an empty sum: the rows the kernel would write are zero (the reference's rule for which rows those
        # are: a row whose aligned block starts with its own valid group id), without reading to the host
        idx = m_indices.to(torch.int64)
        first = idx[torch.arange(M, device=idx.device) // ref.M_ALIGNMENT * ref.M_ALIGNMENT]
        out.masked_fill_(((idx == first) & (first >= 0) & (first < G)).unsqueeze(1), 0)
        return
    sa = _tma_scales(a_scales)
    cfg = _cfg("contiguous", M, N, K, a.device)
    launch = _native.require_kernel("m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_contiguous", a.device)
    launch(a.data_ptr(), sa.data_ptr(), b.data_ptr(), b_scales.data_ptr(), m_indices.data_ptr(), out.data_ptr(),
           M, N, K, G, _scale_strides(sa)[0], b_scales.stride(1), b_scales.stride(0), *_cfg_args(cfg),
           _native.stream(a))


@_m_grouped_contiguous.register_fake
def _(a, a_scales, b, b_scales, m_indices, out):
    return None


def _check_m_indices_values(op: str, m_indices: torch.Tensor, G: int) -> None:
    al = ref.M_ALIGNMENT
    v = m_indices.view(-1, al).to(torch.int64)
    valid = v >= 0
    in_range = bool(((v >= -1) & (v < G)).all())
    if not in_range:
        bad = v[(v < -1) | (v >= G)][0].item()
        raise ValueError(f"dsmoe.{op}: argument 'm_indices': values must be in [-1, {G}) (-1 marks padding), got {bad}")
    big = torch.iinfo(torch.int64).max
    vmin = torch.where(valid, v, torch.full_like(v, big)).amin(1)
    vmax = v.amax(1)
    any_valid = valid.any(1)
    one_group = bool((~any_valid | (vmin == vmax)).all())
    prefix = bool((valid[:, 1:].int() <= valid[:, :-1].int()).all())
    if not (one_group and prefix):
        raise ValueError(
            f"dsmoe.{op}: argument 'm_indices': each aligned block of {al} rows must hold rows of one group "
            "followed only by padding (-1) rows; pad every group to a multiple of "
            f"get_m_alignment_for_contiguous_layout()={al}")


def m_grouped_fp8_gemm_nt_contiguous(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor,
                                     b_scales: torch.Tensor, m_indices: torch.Tensor, *,
                                     out: torch.Tensor | None = None, validate: bool = True) -> torch.Tensor:
    """MoE grouped GEMM, contiguous layout: ``d[r] = a[r] @ b[m_indices[r]]^T`` (bf16 [M_sum, N]).

    a: e4m3 [M_sum, K] (M_sum a multiple of ``get_m_alignment_for_contiguous_layout()``), each group's
    rows contiguous, starting at an aligned row and padded with -1 rows; a_scales fp32 [M_sum, K/128];
    b: e4m3 [G, N, K]; b_scales fp32 [G, ceil(N/128), K/128]; m_indices int32 [M_sum].
    Padding rows (-1) of ``out`` are never written: pass ``out`` to control their content.
    """
    op = "m_grouped_fp8_gemm_nt_contiguous"
    _check_fp8(op, "a", a, 2)
    _check_fp8(op, "b", b, 3)
    M, K = a.shape
    G, N = b.shape[0], b.shape[1]
    if b.shape[2] != K:
        raise ValueError(f"dsmoe.{op}: argument 'b' must have K={K} columns like 'a', got shape {tuple(b.shape)}")
    _check_K(op, "a", K)
    _check_N(op, "b", N)
    C.check_multiple(op, "a", M, ref.M_ALIGNMENT, "M_sum (rows)")
    _check_scales(op, "a_scales", a_scales, (M, K // _BK))
    _check_scales(op, "b_scales", b_scales, (G, -(-N // _BK), K // _BK))
    C.check_last_dim_contiguous(op, "b_scales", b_scales)
    C.check_tensor(op, "m_indices", m_indices, dtypes=(torch.int32,), ndim=1)
    C.check_shape(op, "m_indices", m_indices, (M,))
    C.check_contiguous(op, "m_indices", m_indices)
    if out is None:
        out = torch.empty(M, N, dtype=torch.bfloat16, device=a.device)
    else:
        _check_out(op, out, (M, N), (torch.bfloat16,))
    C.check_same_device(op, {"a": a, "a_scales": a_scales, "b": b, "b_scales": b_scales, "m_indices": m_indices, "out": out})
    if M > 0 and _eager_device_checks(validate, m_indices):
        _check_m_indices_values(op, m_indices, G)
    torch.ops.dsmoe.m_grouped_fp8_gemm_nt_contiguous(a, a_scales, b, b_scales, m_indices, out)
    return out


# ----------------------------------------------------------------------------- grouped masked
@torch.library.custom_op("dsmoe::m_grouped_fp8_gemm_nt_masked", mutates_args=("out",))
def _m_grouped_masked(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
                      masked_m: torch.Tensor, expected_m: int, out: torch.Tensor) -> None:
    if not _native.use_kernel("gemm", a):
        ref.m_grouped_fp8_gemm_nt_masked(a, a_scales, b, b_scales, masked_m, expected_m, out=out)
        return
    G, M_max, K = a.shape
    N = b.shape[1]
    if G == 0 or M_max == 0 or N == 0:
        return
    if K == 0:      # an empty sum: rows < masked_m[g] are zero, the others untouched
        rows = torch.arange(M_max, device=a.device)
        out.masked_fill_((rows[None, :] < masked_m.to(torch.int64)[:, None]).unsqueeze(-1), 0)
        return
    sa = _tma_scales(a_scales)
    ld_k, ld_g = _scale_strides(sa)
    cfg = _cfg("masked", max(1, min(expected_m, M_max)), N, K, a.device)
    launch = _native.require_kernel("m_grouped_fp8_gemm_nt_masked", "m_grouped_fp8_gemm_nt_masked", a.device)
    launch(a.data_ptr(), sa.data_ptr(), b.data_ptr(), b_scales.data_ptr(), masked_m.data_ptr(), out.data_ptr(),
           G, M_max, N, K, ld_k, ld_g, b_scales.stride(1), b_scales.stride(0), *_cfg_args(cfg), _native.stream(a))


@_m_grouped_masked.register_fake
def _(a, a_scales, b, b_scales, masked_m, expected_m, out):
    return None


def m_grouped_fp8_gemm_nt_masked(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
                                 masked_m: torch.Tensor, expected_m: int, *, out: torch.Tensor | None = None,
                                 validate: bool = True) -> torch.Tensor:
    """MoE grouped GEMM, masked layout (decode under CUDA graphs): ``d[g, :masked_m[g]] =
    a[g, :masked_m[g]] @ b[g]^T`` (bf16 [G, M_max, N]); the other rows are never written.

    a: e4m3 [G, M_max, K]; a_scales fp32 [G, M_max, K/128]; b: e4m3 [G, N, K]; b_scales fp32
    [G, ceil(N/128), K/128]; masked_m int32 [G] on the device (read by the kernel: no host sync);
    expected_m: typical rows per group, a tiling hint.
    """
    op = "m_grouped_fp8_gemm_nt_masked"
    _check_fp8(op, "a", a, 3)
    _check_fp8(op, "b", b, 3)
    G, M_max, K = a.shape
    N = b.shape[1]
    if b.shape[0] != G or b.shape[2] != K:
        raise ValueError(f"dsmoe.{op}: argument 'b' must have shape ({G}, N, {K}) to match 'a' {tuple(a.shape)}, "
                         f"got {tuple(b.shape)}")
    _check_K(op, "a", K)
    _check_N(op, "b", N)
    _check_scales(op, "a_scales", a_scales, (G, M_max, K // _BK))
    _check_scales(op, "b_scales", b_scales, (G, -(-N // _BK), K // _BK))
    C.check_last_dim_contiguous(op, "b_scales", b_scales)
    C.check_tensor(op, "masked_m", masked_m, dtypes=(torch.int32,), ndim=1)
    C.check_shape(op, "masked_m", masked_m, (G,))
    C.check_contiguous(op, "masked_m", masked_m)
    if not isinstance(expected_m, int) or isinstance(expected_m, bool) or expected_m < 0:
        raise ValueError(f"dsmoe.{op}: argument 'expected_m' must be a non-negative int, got {expected_m!r}")
    if out is None:
        out = torch.empty(G, M_max, N, dtype=torch.bfloat16, device=a.device)
    else:
        _check_out(op, out, (G, M_max, N), (torch.bfloat16,))
    C.check_same_device(op, {"a": a, "a_scales": a_scales, "b": b, "b_scales": b_scales, "masked_m": masked_m, "out": out})
    if G > 0 and _eager_device_checks(validate, masked_m):
        bad = (masked_m < 0) | (masked_m > M_max)
        if bool(bad.any()):
            raise ValueError(f"dsmoe.{op}: argument 'masked_m': values must be in [0, M_max={M_max}], "
                             f"got {masked_m[bad][0].item()}")
    torch.ops.dsmoe.m_grouped_fp8_gemm_nt_masked(a, a_scales, b, b_scales, masked_m, int(expected_m), out)
    return out


# ----------------------------------------------------------------------------- TN (weight gradient)
@torch.library.custom_op("dsmoe::k_grouped_fp8_gemm_tn_contiguous", mutates_args=("out",))
def _k_grouped_tn(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
                  group_sizes: torch.Tensor | None, accumulate: bool, out: torch.Tensor) -> None:
    """group_sizes None: one group of all T tokens and ``out [M, N]`` (the dense fp8_gemm_tn)."""
    if not _native.use_kernel("gemm", a):
        if group_sizes is None:
            ref.fp8_gemm_tn(a, a_scales, b, b_scales, out=out, accumulate=accumulate)
        else:
            ref.k_grouped_fp8_gemm_tn_contiguous(a, a_scales, b, b_scales, group_sizes, out=out, accumulate=accumulate)
        return
    M, T = a.shape
    N = b.shape[0]
    G = 1 if group_sizes is None else group_sizes.shape[0]
    if M == 0 or N == 0 or G == 0:
        return
    sa, sb = _tma_scales(a_scales), _tma_scales(b_scales)
    cfg = _cfg("kgrouped", M, N, T, a.device)
    launch = _native.require_kernel("k_grouped_fp8_gemm_tn_contiguous", "k_grouped_fp8_gemm_tn", a.device)
    launch(a.data_ptr(), sa.data_ptr(), b.data_ptr(), sb.data_ptr(), _native.ptr(group_sizes), out.data_ptr(),
           M, N, T, G, _scale_strides(sa)[0], _scale_strides(sb)[0], bool(accumulate), *_cfg_args(cfg),
           _native.stream(a))


@_k_grouped_tn.register_fake
def _(a, a_scales, b, b_scales, group_sizes, accumulate, out):
    return None


def _check_tn_operands(op, a, a_scales, b, b_scales):
    M, N, T = _check_2d_pair(op, a, b, "T")
    _check_scales(op, "a_scales", a_scales, (M, T // _BK))
    _check_scales(op, "b_scales", b_scales, (N, T // _BK))
    return M, N, T


def fp8_gemm_tn(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, *,
                out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """Weight gradient of one FP8 linear: ``d [M, N] (+)= a [M, T] @ b [N, T]^T`` in fp32.

    a = dY^T and b = X^T, both e4m3 quantized 1x128 along the token dim T (T a multiple of 128, N a
    multiple of 64, any M), as ``per_token_group_quant_fp8_transposed`` produces them: scales fp32
    [M, T/128] and [N, T/128]. ``accumulate=True`` adds into ``out`` (required then).
    """
    op = "fp8_gemm_tn"
    M, N, T = _check_tn_operands(op, a, a_scales, b, b_scales)
    if out is None:
        if accumulate:
            raise ValueError(f"dsmoe.{op}: argument 'out' is required with accumulate=True")
        out = torch.empty(M, N, dtype=_F32, device=a.device)
    else:
        _check_out(op, out, (M, N), (_F32,))
    C.check_same_device(op, {"a": a, "a_scales": a_scales, "b": b, "b_scales": b_scales, "out": out})
    torch.ops.dsmoe.k_grouped_fp8_gemm_tn_contiguous(a, a_scales, b, b_scales, None, bool(accumulate), out)
    return out


def k_grouped_fp8_gemm_tn_contiguous(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor,
                                     b_scales: torch.Tensor, group_sizes: torch.Tensor, *,
                                     out: torch.Tensor | None = None, accumulate: bool = False,
                                     validate: bool = True) -> torch.Tensor:
    """MoE weight gradient: ``d[g] (+)= a[:, T_g] @ b[:, T_g]^T`` (fp32 [G, M, N]), where the token dim T
    is split into consecutive runs ``T_g`` of ``group_sizes[g]`` tokens (int32 [G] on the device, each a
    multiple of 128, summing to T). Operands as in :func:`fp8_gemm_tn` (a = dY^T, b = X^T of the expert
    tokens in the contiguous layout). A group of 0 tokens gives 0 (or leaves ``out[g]`` with accumulate).
    """
    op = "k_grouped_fp8_gemm_tn_contiguous"
    M, N, T = _check_tn_operands(op, a, a_scales, b, b_scales)
    C.check_tensor(op, "group_sizes", group_sizes, dtypes=(torch.int32,), ndim=1)
    C.check_contiguous(op, "group_sizes", group_sizes)
    G = group_sizes.shape[0]
    if out is None:
        if accumulate:
            raise ValueError(f"dsmoe.{op}: argument 'out' is required with accumulate=True")
        out = torch.empty(G, M, N, dtype=_F32, device=a.device)
    else:
        _check_out(op, out, (G, M, N), (_F32,))
    C.check_same_device(op, {"a": a, "a_scales": a_scales, "b": b, "b_scales": b_scales,
                             "group_sizes": group_sizes, "out": out})
    if validate and G == 0 and T != 0:  # known on the host: no value to read back
        raise ValueError(f"dsmoe.{op}: argument 'group_sizes': must sum to T={T} (columns of 'a'), got 0 (no group)")
    if G > 0 and _eager_device_checks(validate, group_sizes):
        gs = group_sizes.to(torch.int64)
        bad = (gs < 0) | (gs % _BK != 0)
        if bool(bad.any()):
            raise ValueError(f"dsmoe.{op}: argument 'group_sizes': each must be a non-negative multiple of {_BK}, "
                             f"got {gs[bad][0].item()}")
        total = int(gs.sum().item())
        if total != T:
            raise ValueError(f"dsmoe.{op}: argument 'group_sizes': must sum to T={T} (columns of 'a'), got {total}")
    torch.ops.dsmoe.k_grouped_fp8_gemm_tn_contiguous(a, a_scales, b, b_scales, group_sizes, bool(accumulate), out)
    return out


# ----------------------------------------------------------------------------- transposed quantization
@torch.library.custom_op("dsmoe::per_token_group_quant_fp8_transposed", mutates_args=())
def _quant_t(x: torch.Tensor, scale_ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if _native.use_kernel("gemm", x) and _native.has_kernel("transpose_quant_fp8"):
        T, K = x.shape
        q, s = _alloc_quant_t(x)
        if T > 0 and K > 0:
            launch = _native.require_kernel("per_token_group_quant_fp8_transposed", "transpose_quant_fp8", x.device)
            launch(x.data_ptr(), _native.DTYPE_CODES[x.dtype], q.data_ptr(), s.data_ptr(),
                   T, K, x.stride(0), q.stride(0), s.stride(1), bool(scale_ue8m0), _native.stream(x))
        return q, s
    if _native.use_kernel("gemm", x):  # a build without the fused kernel: transpose copy + the 1x128 quantizer
        from .quant import per_token_group_quant_fp8
        T, K = x.shape
        xt = x.new_zeros(K, -(-T // _BK) * _BK)
        xt[:, :T] = x.t()
        return per_token_group_quant_fp8(xt, _BK, scale_ue8m0=scale_ue8m0, column_major_scales=True)
    return ref.per_token_group_quant_fp8_transposed(x, scale_ue8m0=scale_ue8m0)


def _alloc_quant_t(x):
    T, K = x.shape
    t_pad = -(-T // _BK) * _BK
    k_pad = (K + 3) // 4 * 4
    q = torch.empty(K, t_pad, dtype=_FP8, device=x.device)
    s = torch.empty(t_pad // _BK, k_pad, dtype=_F32, device=x.device)[:, :K].t()
    return q, s


@_quant_t.register_fake
def _(x, scale_ue8m0):
    return _alloc_quant_t(x)


def per_token_group_quant_fp8_transposed(x: torch.Tensor, *, scale_ue8m0: bool = False):
    """From activations ``x [T, K]`` (fp32/fp16/bf16), ``x^T`` quantized 1x128 along T, the operand layout
    of the TN GEMMs: e4m3 ``[K, T_pad]`` and fp32 scales ``[K, T_pad/128]`` (MN-major: stride
    ``(1, K rounded up to 4)``), ``T_pad`` = T rounded up to 128 with zero padding tokens.
    """
    op = "per_token_group_quant_fp8_transposed"
    C.check_tensor(op, "x", x, dtypes=(torch.float32, torch.float16, torch.bfloat16), ndim=2)
    C.check_contiguous(op, "x", x)
    return torch.ops.dsmoe.per_token_group_quant_fp8_transposed(x, bool(scale_ue8m0))


assert set(KINDS) >= {"dense", "dense_f32", "contiguous", "masked", "kgrouped"}
register("fp8_gemm_nt", "gemm", ["fp8_gemm_nt"])
register("m_grouped_fp8_gemm_nt_contiguous", "gemm", ["m_grouped_fp8_gemm_nt_contiguous"])
register("m_grouped_fp8_gemm_nt_masked", "gemm", ["m_grouped_fp8_gemm_nt_masked"])
register("fp8_gemm_tn", "gemm", ["k_grouped_fp8_gemm_tn"])
register("k_grouped_fp8_gemm_tn_contiguous", "gemm", ["k_grouped_fp8_gemm_tn"])
register("per_token_group_quant_fp8_transposed", "gemm", ["transpose_quant_fp8"])
register("get_m_alignment_for_contiguous_layout", "gemm", [], "host constant")
