"""``deep_gemm.utils.layout``: scale-factor layouts and the contiguous-layout alignment.

dsmoe's GEMMs accept FP32 scales in any strides (they re-lay what TMA cannot load), so these helpers
matter only to code that prepares DeepGEMM's layouts itself; they return exactly what DeepGEMM's do on
Hopper (SM90, FP32 scales).
"""
from __future__ import annotations

import torch

from ....ref.quant import mn_major_scales
from .._errors import as_int, check_shape, check_tensor, type_error, unsupported, value_error

__all__ = [
    "get_tma_aligned_size",
    "get_mn_major_tma_aligned_tensor",
    "get_col_major_tma_aligned_tensor",
    "transform_sf_into_required_layout",
    "get_mk_alignment_for_contiguous_layout",
    "set_mk_alignment_for_contiguous_layout",
    "get_theoretical_mk_alignment_for_contiguous_layout",
    "get_m_alignment_for_contiguous_layout",
    "get_k_alignment_for_contiguous_layout",
]

# dsmoe's kernels are compiled for 128-row (M-grouped) and 128-token (K-grouped) group alignment, the
# value DeepGEMM uses on Hopper.
_MK_ALIGNMENT = 128


def get_tma_aligned_size(x: int, element_size: int) -> int:
    """``x`` rounded up so that ``x * element_size`` bytes is a multiple of 16 (a TMA stride)."""
    fn = "get_tma_aligned_size"
    x = as_int(fn, "x", x)
    es = as_int(fn, "element_size", element_size, min_value=1)
    if 16 % es != 0:
        raise value_error(fn, "element_size", f"must divide 16, got {es}")
    step = 16 // es
    return (x + step - 1) // step * step


def get_mn_major_tma_aligned_tensor(sf: torch.Tensor) -> torch.Tensor:
    """FP32 scales ``[mn, k]`` or ``[g, mn, k]`` with the same values, MN-major (stride 1 along mn), the
    k stride ``get_tma_aligned_size(mn, 4)`` and, for 3D, the group stride that times k. Returns ``sf``
    itself when it already is laid out so, else a copy."""
    fn = "get_mn_major_tma_aligned_tensor"
    check_tensor(fn, "sf", sf)
    if sf.dim() not in (2, 3):
        raise value_error(fn, "sf", f"must have 2 or 3 dims, got shape {tuple(sf.shape)}")
    if sf.dtype != torch.float32:
        raise type_error(fn, "sf", f"must have dtype float32, got {str(sf.dtype).replace('torch.', '')}")
    b = sf if sf.dim() == 3 else sf.unsqueeze(0)
    mn, k = b.shape[-2], b.shape[-1]
    amn = get_tma_aligned_size(mn, 4)
    if (sf.dim() == 2 or b.stride(0) == amn * k) and b.stride(1) == 1 and b.stride(2) == amn:
        return sf
    return mn_major_scales(sf)


def get_col_major_tma_aligned_tensor(x: torch.Tensor) -> torch.Tensor:
    """The name DeepGEMM's first API gave :func:`get_mn_major_tma_aligned_tensor`."""
    return get_mn_major_tma_aligned_tensor(x)


def _recipe_grans(fn: str, recipe, is_sfa) -> tuple[int, int]:
    try:
        r = tuple(int(v) for v in recipe)
    except TypeError:
        raise type_error(fn, "recipe", f"must be a tuple of 2 or 3 ints, got {recipe!r}") from None
    if len(r) == 3:
        if is_sfa is None:
            raise value_error(fn, "is_sfa", "is required with a 3-element recipe (which of its granularities applies)")
        return (r[0] if is_sfa else r[1]), r[2]
    if len(r) == 2:
        if is_sfa is not None:
            raise value_error(fn, "is_sfa", f"must be None with a 2-element recipe, got {is_sfa!r}")
        return r
    raise value_error(fn, "recipe", f"must have 2 or 3 elements, got {recipe!r}")


def transform_sf_into_required_layout(sf: torch.Tensor, mn: int, k: int, recipe, num_groups: int | None = None,
                                      is_sfa: bool | None = None, disable_ue8m0_cast: bool = False,
                                      psum_layout: torch.Tensor | None = None) -> torch.Tensor:
    """Scales in the layout the GEMMs load, for DeepGEMM's Hopper FP32 cases: granularity (1, 128)
    (activations: returned MN-major and TMA-aligned, see :func:`get_mn_major_tma_aligned_tensor`) and
    (128, 128) (weights: checked to be contiguous or contiguous after transposing the last two dims,
    and returned as they are). ``recipe`` is ``(gran_mn, gran_k)``, or ``(gran_m_a, gran_n_b, gran_k)``
    with ``is_sfa`` saying which operand ``sf`` scales. ``sf`` is ``[ceil(mn / gran_mn), ceil(k /
    gran_k)]``, with a leading ``num_groups`` dim when that is given. Other granularities and int32
    (packed UE8M0, SM100) scales raise NotImplementedError; ``disable_ue8m0_cast`` and ``psum_layout``
    matter only to those and are accepted."""
    fn = "transform_sf_into_required_layout"
    check_tensor(fn, "sf", sf)
    mn = as_int(fn, "mn", mn, min_value=0)
    k = as_int(fn, "k", k, min_value=0)
    gran_mn, gran_k = _recipe_grans(fn, recipe, is_sfa)
    if sf.dtype == torch.int32:
        raise unsupported(fn, "int32 (packed UE8M0, SM100) scales are not implemented: dsmoe's GEMMs take "
                              "float32 scales at granularity (1, 128) or (128, 128)")
    if sf.dtype != torch.float32:
        raise type_error(fn, "sf", f"must have dtype float32, got {str(sf.dtype).replace('torch.', '')}")
    if (gran_mn, gran_k) not in ((1, 128), (128, 128)):
        raise unsupported(fn, f"granularity (gran_mn, gran_k)=({gran_mn}, {gran_k}) is not implemented: dsmoe's "
                              "GEMMs take float32 scales at (1, 128) (activations) or (128, 128) (weights)")
    lead = ()
    if num_groups is not None:
        lead = (as_int(fn, "num_groups", num_groups, min_value=0),)
    check_shape(fn, "sf", sf, (*lead, -(-mn // gran_mn), -(-k // gran_k)))
    if gran_mn == 1:
        return get_mn_major_tma_aligned_tensor(sf)
    rows, cols = sf.shape[-2], sf.shape[-1]
    ok_group = sf.dim() == 2 or sf.shape[0] <= 1 or sf.stride(0) == rows * cols
    row_major = (cols <= 1 or sf.stride(-1) == 1) and (rows <= 1 or sf.stride(-2) == cols)
    col_major = (rows <= 1 or sf.stride(-2) == 1) and (cols <= 1 or sf.stride(-1) == rows)
    if not (ok_group and (row_major or col_major)):
        raise value_error(fn, "sf", f"(128 x 128 weight scales) must be contiguous, or contiguous after "
                                    f"transposing its last two dims, got shape {tuple(sf.shape)} with strides {sf.stride()}")
    return sf


def get_mk_alignment_for_contiguous_layout() -> int:
    """Each group of the M-grouped (rows) and K-grouped (tokens) contiguous layouts starts at a multiple
    of this: 128."""
    return _MK_ALIGNMENT


def set_mk_alignment_for_contiguous_layout(new_value: int) -> None:
    """Only 128 (what dsmoe's kernels are compiled for, and DeepGEMM's Hopper value) is accepted."""
    fn = "set_mk_alignment_for_contiguous_layout"
    v = as_int(fn, "new_value", new_value)
    if v != _MK_ALIGNMENT:
        raise unsupported(fn, f"alignment {v} is not implemented: dsmoe's grouped GEMMs use {_MK_ALIGNMENT} "
                              "(DeepGEMM's Hopper alignment)")


def get_theoretical_mk_alignment_for_contiguous_layout(expected_m: int | None = None) -> int:
    """The best alignment for ``expected_m`` rows per group: 128 on Hopper whatever ``expected_m``."""
    return _MK_ALIGNMENT


get_m_alignment_for_contiguous_layout = get_mk_alignment_for_contiguous_layout
get_k_alignment_for_contiguous_layout = get_mk_alignment_for_contiguous_layout
