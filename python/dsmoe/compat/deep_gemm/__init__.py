"""DeepGEMM's Python API on dsmoe's kernels: ``import dsmoe.compat.deep_gemm as deep_gemm``.

The FP8 GEMMs of DeepGEMM's current API (and the names of its earlier ones that frameworks still
call) with its argument conventions: operands as ``(tensor, float32 scales)`` pairs, the output ``d``
written in place, None returned, Hopper (SM90) semantics. CUDA tensors run dsmoe's ahead-of-time
compiled sm_90a kernels (no run-time compilation); CPU tensors run dsmoe's references. What is not
implemented (FP4, packed UE8M0 scales, MN-major FP8 operands, other recipes) raises
NotImplementedError naming what is supported; bad arguments raise errors that are both RuntimeError
(as DeepGEMM's) and ValueError/TypeError, before anything runs. docs/compat.md has the table.
"""
import torch as _torch

from ...ops import gemm as _ops_gemm
from . import testing, utils  # noqa: F401
from ._errors import DeepGEMMTypeError, DeepGEMMValueError
from ._errors import as_int as _as_int
from ._errors import value_error as _value_error
from ._gemm import (
    fp8_gemm_nn,
    fp8_gemm_nt,
    fp8_gemm_tn,
    fp8_gemm_tt,
    k_grouped_fp8_gemm_nt_contiguous,
    k_grouped_fp8_gemm_tn_contiguous,
    m_grouped_fp8_gemm_nn_contiguous,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_masked,
)
from .utils import *  # noqa: F401,F403
from .utils.layout import transform_sf_into_required_layout  # noqa: F401


def set_num_sms(new_num_sms: int) -> None:
    """Caps the SMs every GEMM launch uses (leaving the others to communication kernels running
    alongside); 0 restores all of them. Must be at most the device's SM count."""
    fn = "set_num_sms"
    n = _as_int(fn, "new_num_sms", new_num_sms, min_value=0)
    if _torch.cuda.is_available():
        total = _torch.cuda.get_device_properties(_torch.cuda.current_device()).multi_processor_count
        if n > total:
            raise _value_error(fn, "new_num_sms", f"must be at most the device's {total} SMs, got {n}")
    _ops_gemm.set_num_sms(n)


def get_num_sms() -> int:
    """The SM cap GEMMs run with: the value set, else the current device's SM count (0 without a CUDA
    device: the CPU path has none)."""
    limit = _ops_gemm.get_num_sms_limit()
    if limit is not None:
        return limit
    if _torch.cuda.is_available():
        return _torch.cuda.get_device_properties(_torch.cuda.current_device()).multi_processor_count
    return 0


_compile_mode = 0


def set_compile_mode(mode: int) -> None:
    """DeepGEMM's JIT mode switch (frameworks set 1 while pre-compiling). dsmoe's kernels are compiled
    ahead of time, so the value is only recorded (for :func:`get_compile_mode`)."""
    global _compile_mode
    _compile_mode = _as_int("set_compile_mode", "mode", mode, min_value=0)


def get_compile_mode() -> int:
    """The value last given to :func:`set_compile_mode` (0 at start)."""
    return _compile_mode


# Names of DeepGEMM's earlier APIs that frameworks still resolve (same functions, same conventions).
fp8_fp4_gemm_nt = fp8_gemm_nt
fp8_fp4_gemm_nn = fp8_gemm_nn
fp8_fp4_gemm_tn = fp8_gemm_tn
fp8_fp4_gemm_tt = fp8_gemm_tt
m_grouped_fp8_fp4_gemm_nt_contiguous = m_grouped_fp8_gemm_nt_contiguous
m_grouped_fp8_fp4_gemm_nn_contiguous = m_grouped_fp8_gemm_nn_contiguous
m_grouped_fp8_fp4_gemm_nt_masked = m_grouped_fp8_gemm_nt_masked
fp8_m_grouped_gemm_nt_masked = m_grouped_fp8_gemm_nt_masked
gemm_fp8_fp8_bf16_nt = fp8_gemm_nt
m_grouped_gemm_fp8_fp8_bf16_nt_contiguous = m_grouped_fp8_gemm_nt_contiguous
m_grouped_gemm_fp8_fp8_bf16_nt_masked = m_grouped_fp8_gemm_nt_masked


def wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, out) -> None:
    """DeepGEMM's first weight-gradient API: ``out += lhs @ rhs^T`` (fp32 ``out [M, N]``), 1x128 scales
    on both operands, given ``[M, ceil(K/128)]`` or transposed ``[ceil(K/128), M]`` (likewise for rhs)."""
    fn = "wgrad_gemm_fp8_fp8_fp32_nt"
    pairs = []
    for name, p, dim in (("lhs", lhs, 0), ("rhs", rhs, 0)):
        if not (isinstance(p, (tuple, list)) and len(p) == 2):
            raise DeepGEMMTypeError(f"dsmoe.compat.deep_gemm.{fn}: argument '{name}' must be a pair "
                                    f"(FP8 tensor, float32 scales), got {type(p).__name__}")
        x, sf = p
        if isinstance(x, _torch.Tensor) and isinstance(sf, _torch.Tensor) and x.dim() == 2 and sf.dim() == 2:
            mn, kb = x.shape[0], -(-x.shape[1] // 128)
            # NOTE: the transposed form is recognized first, as the original does (the two coincide when
            # mn == kb, and then the values are read as [kb, mn]).
            if tuple(sf.shape) == (kb, mn):
                sf = sf.t()
        pairs.append((x, sf))
    fp8_gemm_nt(pairs[0], pairs[1], out, c=out, recipe=(1, 1, 128))


def k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, out, batch_sizes) -> None:
    """DeepGEMM's first K-grouped weight-gradient API: ``out[g] += lhs_g @ rhs_g^T`` with the operands
    flat (each group's ``[M, k_g]`` row-major block after the previous one) and the scales
    ``[sum_k/128, M]``; every ``batch_sizes`` entry a multiple of 128."""
    fn = "k_grouped_wgrad_gemm_fp8_fp8_fp32_nt"
    pairs = []
    for name, p in (("lhs", lhs), ("rhs", rhs)):
        if not (isinstance(p, (tuple, list)) and len(p) == 2):
            raise DeepGEMMTypeError(f"dsmoe.compat.deep_gemm.{fn}: argument '{name}' must be a pair "
                                    f"(FP8 tensor, float32 scales), got {type(p).__name__}")
        x, sf = p
        pairs.append((x, sf.t() if isinstance(sf, _torch.Tensor) and sf.dim() == 2 else sf))
    k_grouped_fp8_gemm_nt_contiguous(pairs[0], pairs[1], out, list(batch_sizes), None, c=out)


__all__ = [
    "DeepGEMMTypeError", "DeepGEMMValueError",
    "fp8_gemm_nt", "fp8_gemm_nn", "fp8_gemm_tn", "fp8_gemm_tt",
    "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nn_contiguous", "m_grouped_fp8_gemm_nt_masked",
    "k_grouped_fp8_gemm_tn_contiguous", "k_grouped_fp8_gemm_nt_contiguous",
    "fp8_fp4_gemm_nt", "fp8_fp4_gemm_nn", "fp8_fp4_gemm_tn", "fp8_fp4_gemm_tt",
    "m_grouped_fp8_fp4_gemm_nt_contiguous", "m_grouped_fp8_fp4_gemm_nn_contiguous",
    "m_grouped_fp8_fp4_gemm_nt_masked", "fp8_m_grouped_gemm_nt_masked",
    "gemm_fp8_fp8_bf16_nt", "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous", "m_grouped_gemm_fp8_fp8_bf16_nt_masked",
    "wgrad_gemm_fp8_fp8_fp32_nt", "k_grouped_wgrad_gemm_fp8_fp8_fp32_nt",
    "set_num_sms", "get_num_sms", "set_compile_mode", "get_compile_mode", "transform_sf_into_required_layout",
    *utils.__all__,
]
