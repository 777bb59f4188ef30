"""DeepGEMM's FP8 GEMM entry points on dsmoe's kernels (Hopper semantics, FP32 scales).

Every function checks its arguments first (nothing launches on bad input), then runs ``dsmoe.ops``:
the sm_90a kernels for CUDA tensors, the references for CPU tensors. Like DeepGEMM they return None
and write ``d`` in place.

When a call is outside what dsmoe's kernels take directly (K not a multiple of 128, N not a multiple
of 64, ``d`` with padded rows, a bias ``c`` with the (1, 128, 128) recipe, DeepGEMM's K-grouped operand
layouts), the operands are zero-padded or re-laid in a copy and the result is staged in a temporary
that starts as a copy of ``d``, so rows the op does not write keep their contents. The results are the
same as the direct path's; the cost is the copies.
"""
from __future__ import annotations

import contextlib

import torch

from ... import ops
from ..._checks import can_read_device_values
from ._errors import (DeepGEMMTypeError, DeepGEMMValueError, as_int, check_dtype, check_shape, check_tensor,
                      same_device, type_error, unsupported, value_error)

_FP8 = torch.float8_e4m3fn
_F32 = torch.float32
_BF16 = torch.bfloat16
_BK = 128          # K granularity of every scale (and of dsmoe's kernels)
_N_ALIGN = 64      # dsmoe's kernels take N in multiples of this
_ALIGN = 128       # group alignment of the contiguous layouts

_SUPPORTED = ("dsmoe implements DeepGEMM's Hopper (SM90) FP8 path: e4m3 operands with float32 scales, "
              "recipe (1, 128, 128) (1x128 activation scales, 128x128 weight scales; the default) or "
              "(1, 1, 128) (1x128 scales on both operands; dense GEMMs and the K-grouped weight-gradient GEMMs)")


# ----------------------------------------------------------------------------- argument checks
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pair(fn: str, name: str, p) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(p, (tuple, list)) and len(p) == 2):
        raise type_error(fn, name, f"must be a pair (FP8 tensor, float32 scaling factors), got {type(p).__name__}")
    x, sf = p
    check_tensor(fn, f"{name}[0]", x)
    check_tensor(fn, f"{name}[1]", sf)
    if x.dtype != _FP8:
        if x.dtype in (torch.int8, torch.uint8) or "float4" in str(x.dtype):
            raise unsupported(fn, f"argument '{name}[0]' has dtype {x.dtype}: packed FP4 operands are not "
                                  f"implemented; {_SUPPORTED}")
        raise type_error(fn, f"{name}[0]", f"must have dtype float8_e4m3fn, got {str(x.dtype).replace('torch.', '')}")
    if sf.dtype == torch.int32:
        raise unsupported(fn, f"argument '{name}[1]' is int32 (packed UE8M0 scales, an SM100 format), which is not "
                              f"implemented; {_SUPPORTED}")
    check_dtype(fn, f"{name}[1]", sf, (_F32,))
    return x, sf


def _k_major(fn: str, name: str, x: torch.Tensor, ndim: int) -> torch.Tensor:
    """An operand as dsmoe's kernels take it: K-major (stride 1 along K), rows packed. DeepGEMM allows
    padded rows (any leading strides with stride(-1) == 1); those are packed here in a copy."""
    if x.dim() != ndim:
        raise value_error(fn, f"{name}[0]", f"must have {ndim} dims, got shape {tuple(x.shape)}")
    if x.numel() and x.shape[-1] > 1 and x.stride(-1) != 1:
        if x.stride(-2) == 1 or x.shape[-2] == 1:
            raise unsupported(fn, f"argument '{name}[0]' is MN-major (shape {tuple(x.shape)}, strides {x.stride()}): "
                                  "Hopper FP8 GEMMs take K-major operands (stride(-1) == 1), as DeepGEMM requires "
                                  "on SM90; pass a K-major copy (e.g. .contiguous() of the [.., MN, K] view)")
        raise value_error(fn, f"{name}[0]", f"must be K-major (stride(-1) == 1), got strides {x.stride()}")
    return x.contiguous()


def _check_out(fn: str, name: str, t, shape, dtypes) -> torch.Tensor:
    """``d`` (or ``c``): N-major as DeepGEMM requires (stride(-1) == 1; a 2D tensor may have padded rows,
    e.g. a column slice of a wider buffer; a 3D one must be contiguous)."""
    check_tensor(fn, name, t)
    check_dtype(fn, name, t, dtypes)
    check_shape(fn, name, t, shape)
    if t.numel() == 0:
        return t
    if t.dim() == 2:
        rows, cols = t.shape
        ok = (cols <= 1 or t.stride(1) == 1) and (rows <= 1 or t.stride(0) >= cols)
    else:
        ok = t.is_contiguous()
    if not ok:
        layout = "N-major (stride(-1) == 1) with non-overlapping rows" if t.dim() == 2 else "contiguous"
        raise value_error(fn, name, f"must be {layout}, got shape {tuple(t.shape)} with strides {t.stride()}")
    return t


def _check_c(fn: str, c, d: torch.Tensor):
    if c is None:
        return None
    _check_out(fn, "c", c, tuple(d.shape), (d.dtype,))
    if c.data_ptr() == d.data_ptr() and c.numel() and c.stride() != d.stride():
        raise value_error(fn, "c", f"shares d's storage with other strides ({c.stride()} vs {d.stride()}); "
                                   "pass d itself or a separate tensor")
    return c


def _check_sf(fn: str, name: str, sf: torch.Tensor, shape) -> None:
    if tuple(sf.shape) != tuple(shape):
        raise value_error(fn, f"{name}[1]", f"(scaling factors) must have shape {tuple(shape)}, got {tuple(sf.shape)}")


def _tuple(fn: str, arg: str, v, n: int) -> tuple:
    try:
        t = tuple(int(x) for x in v)
    except TypeError:
        raise type_error(fn, arg, f"must be a tuple of {n} ints, got {v!r}") from None
    if len(t) != n:
        raise value_error(fn, arg, f"must have {n} elements, got {v!r}")
    return t


def _recipe(fn: str, recipe, recipe_a, recipe_b, *, grouped: bool) -> str:
    """'1d2d' (1x128 a, 128x128 b) or '1d1d' (1x128 both), or NotImplementedError."""
    if recipe_a is not None or recipe_b is not None:
        if recipe is not None:
            raise value_error(fn, "recipe", "must be None when 'recipe_a' and 'recipe_b' are given")
        if recipe_a is None or recipe_b is None:
            raise value_error(fn, "recipe_a" if recipe_a is None else "recipe_b", "must be given with the other one")
        ra, rb = _tuple(fn, "recipe_a", recipe_a, 2), _tuple(fn, "recipe_b", recipe_b, 2)
        kind = {((1, 128), (128, 128)): "1d2d", ((1, 128), (1, 128)): "1d1d"}.get((ra, rb))
        shown = f"recipe_a={ra}, recipe_b={rb}"
    elif recipe is None:
        kind, shown = "1d2d", ""
    else:
        r = _tuple(fn, "recipe", recipe, 3)
        kind = {(1, 128, 128): "1d2d", (1, 1, 128): "1d1d"}.get(r)
        shown = f"recipe={r}"
    if kind is None:
        raise unsupported(fn, f"{shown} is not implemented; {_SUPPORTED}")
    if grouped and kind != "1d2d":
        raise unsupported(fn, f"{shown} is not implemented for M-grouped GEMMs, which take recipe (1, 128, 128) "
                              "(1x128 activation scales, 128x128 weight scales) as DeepGEMM does on SM90")
    return kind


def _check_flags(fn: str, compiled_dims, disable_ue8m0_cast) -> None:
    # Both only steer DeepGEMM's run-time compilation and SM100 scale casting; dsmoe's kernels are
    # compiled ahead of time and take FP32 scales as they are.
    if not isinstance(compiled_dims, str):
        raise type_error(fn, "compiled_dims", f"must be a str, got {type(compiled_dims).__name__}")
    if not isinstance(disable_ue8m0_cast, bool):
        raise type_error(fn, "disable_ue8m0_cast", f"must be a bool, got {type(disable_ue8m0_cast).__name__}")


@contextlib.contextmanager
def _ops_errors(fn: str, renames: dict):
    """What dsmoe.ops still rejects after the checks here (device-resident values: m_indices, masked_m,
    group sizes) re-raised as this module's errors, under the argument names of this API."""
    try:
        yield
    except (ValueError, TypeError) as e:
        if isinstance(e, RuntimeError):
            raise
        msg = str(e)
        if msg.startswith("dsmoe.") and ": " in msg:
            msg = msg.split(": ", 1)[1]
        for old, new in renames.items():
            msg = msg.replace(f"argument '{old}'", f"argument '{new}'")
        cls = DeepGEMMTypeError if isinstance(e, TypeError) else DeepGEMMValueError
        raise cls(f"dsmoe.compat.deep_gemm.{fn}: {msg}") from e


# ----------------------------------------------------------------------------- padding helpers
def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size:
        return x
    out = torch.zeros(*x.shape[:-1], size, dtype=x.dtype, device=x.device)
    out[..., : x.shape[-1]] = x
    return out


def _pad_dim(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if x.shape[dim] == size:
        return x
    shape = list(x.shape)
    shape[dim] = size
    out = torch.zeros(shape, dtype=x.dtype, device=x.device)
    out.narrow(dim, 0, x.shape[dim]).copy_(x)
    return out


def _last_dim_packed(sf: torch.Tensor) -> torch.Tensor:
    return sf if sf.shape[-1] <= 1 or sf.stride(-1) == 1 else sf.contiguous()


def _same_view(c: torch.Tensor, d: torch.Tensor) -> bool:
    return c.data_ptr() == d.data_ptr() and c.stride() == d.stride()


# ----------------------------------------------------------------------------- dense
def fp8_gemm_nt(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims: str = "nk",
                disable_ue8m0_cast: bool = False) -> None:
    """``d = a @ b^T (+ c)``: ``a = (x [M, K] e4m3, sfa fp32 [M, ceil(K/128)])``, ``b = (w [N, K] e4m3,
    sfb fp32 [ceil(N/128), ceil(K/128)])`` with the default recipe (1, 128, 128), or ``sfb [N,
    ceil(K/128)]`` with recipe (1, 1, 128); ``d [M, N]`` bf16 or fp32, written in place; ``c`` (d's
    shape and dtype, may be ``d`` itself) is added in fp32 before the one rounding to d's dtype."""
    fn = "fp8_gemm_nt"
    kind = _recipe(fn, recipe, recipe_a, recipe_b, grouped=False)
    x, sfa = _pair(fn, "a", a)
    w, sfb = _pair(fn, "b", b)
    x = _k_major(fn, "a", x, 2)
    w = _k_major(fn, "b", w, 2)
    M, K = x.shape
    N = w.shape[0]
    if w.shape[1] != K:
        raise value_error(fn, "b[0]", f"must have K={K} columns like 'a[0]' {tuple(x.shape)}, got shape {tuple(w.shape)}")
    _check_out(fn, "d", d, (M, N), (_BF16, _F32))
    c = _check_c(fn, c, d)
    kb = _cdiv(K, _BK)
    _check_sf(fn, "a", sfa, (M, kb))
    _check_sf(fn, "b", sfb, (_cdiv(N, _BK), kb) if kind == "1d2d" else (N, kb))
    _check_flags(fn, compiled_dims, disable_ue8m0_cast)
    same_device(fn, {"a[0]": x, "a[1]": sfa, "b[0]": w, "b[1]": sfb, "d": d, "c": c})
    if M == 0 or N == 0:
        return None
    if K == 0:  # an empty sum: d = c, or 0
        if c is None:
            d.zero_()
        elif not _same_view(c, d):
            d.copy_(c)
        return None

    Kp, Np = _cdiv(K, _BK) * _BK, _cdiv(N, _N_ALIGN) * _N_ALIGN
    x, w = _pad_last(x, Kp), _pad_dim(_pad_last(w, Kp), 0, Np)
    direct = Np == N and d.is_contiguous()
    if kind == "1d2d":
        sfb = _last_dim_packed(sfb)  # ceil(Np/128) == ceil(N/128): the block rows need no padding
        if direct and c is None:
            ops.fp8_gemm_nt(x, sfa, w, sfb, out=d)
            return None
        acc = ops.fp8_gemm_nt(x, sfa, w, sfb, out_dtype=_F32 if (c is not None or d.dtype == _F32) else _BF16)
    else:
        sfb = _pad_dim(sfb, 0, Np)
        if direct and d.dtype == _F32:
            if c is not None and not _same_view(c, d):
                d.copy_(c)
            ops.fp8_gemm_tn(x, sfa, w, sfb, out=d, accumulate=c is not None)
            return None
        acc = ops.fp8_gemm_tn(x, sfa, w, sfb)
    acc = acc[:, :N]
    if c is not None:
        acc = acc + c.float()
    d.copy_(acc)
    return None


def _swap_pair(p, name: str, fn: str):
    x, sf = _pair(fn, name, p)
    if x.dim() < 2 or sf.dim() < 2:
        raise value_error(fn, name, f"tensors must have at least 2 dims, got {tuple(x.shape)} and {tuple(sf.shape)}")
    return x.transpose(-1, -2), sf.transpose(-1, -2)


def fp8_gemm_nn(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims: str = "nk",
                disable_ue8m0_cast: bool = False) -> None:
    """``d = a @ b (+ c)`` with ``b = (w [K, N], sf [ceil(K/128), ceil(N/128)])``: :func:`fp8_gemm_nt` on
    the transposed views of ``b``, which must then be K-major (so ``w`` is the transpose of an [N, K]
    row-major tensor); an N-major ``w`` raises NotImplementedError, as on DeepGEMM's SM90 FP8 path."""
    fp8_gemm_nt(a, _swap_pair(b, "b", "fp8_gemm_nn"), d, c, recipe, recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast)


def fp8_gemm_tn(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims: str = "mn",
                disable_ue8m0_cast: bool = False) -> None:
    """``d = a^T @ b^T (+ c)`` with ``a = (x [K, M], sf [ceil(K/128), M])`` and ``b = (w [N, K]...)``
    given transposed: :func:`fp8_gemm_nt` on the transposed views of both, which must be K-major."""
    fn = "fp8_gemm_tn"
    fp8_gemm_nt(_swap_pair(a, "a", fn), _swap_pair(b, "b", fn), d, c, recipe, recipe_a, recipe_b, compiled_dims,
                disable_ue8m0_cast)


def fp8_gemm_tt(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims: str = "mn",
                disable_ue8m0_cast: bool = False) -> None:
    """``d = a^T @ b (+ c)``: :func:`fp8_gemm_nt` on the transposed views of ``a``, which must be K-major."""
    fp8_gemm_nt(_swap_pair(a, "a", "fp8_gemm_tt"), b, d, c, recipe, recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast)


# ----------------------------------------------------------------------------- M-grouped
def _grouped_b(fn: str, b):
    w, sfb = _pair(fn, "b", b)
    w = _k_major(fn, "b", w, 3)
    return w, sfb


def _psum_to_m_indices(psum: torch.Tensor, M: int) -> torch.Tensor:
    """DeepGEMM's psum layout (group g's rows are ``[align(psum[g-1], 128), psum[g])``) as per-row group
    ids with -1 for the gaps, computed on the device (no host sync)."""
    G = psum.shape[0]
    ends = psum.to(torch.int64)
    starts = torch.cat([ends.new_zeros(1), (ends[:-1] + _ALIGN - 1) // _ALIGN * _ALIGN])
    rows = torch.arange(M, device=psum.device, dtype=torch.int64)
    g = torch.searchsorted(ends, rows, right=True)
    valid = (g < G) & (rows >= starts[g.clamp(max=max(G - 1, 0))])
    return torch.where(valid, g, torch.full_like(g, -1)).to(torch.int32)


def _block_groups(idx: torch.Tensor) -> torch.Tensor:
    """DeepGEMM's SM90 contiguous kernels take each 128-row block's group from its first row and
    compute the whole block with it: -1 (padding) rows after a group's rows in its last block get
    ``a[r] @ b[g]^T`` (zero for the zeroed padding activations DeepGEMM's tests and the frameworks
    pass), and blocks that start with -1 are skipped. Filling those -1 rows with the block's group
    (on the device, no sync) gives dsmoe's op the same rows to write. ``idx`` int32 ``[128 * n]``."""
    blk = idx.view(-1, _ALIGN)
    first = blk[:, :1].expand_as(blk)
    return torch.where((blk < 0) & (first >= 0), first, blk).reshape(-1)


def m_grouped_fp8_gemm_nt_contiguous(a, b, d, grouped_layout=None, recipe=None, recipe_a=None, recipe_b=None,
                                     compiled_dims: str = "nk", disable_ue8m0_cast: bool = False,
                                     use_psum_layout: bool = False, ensure_zero_padding: bool = True,
                                     expected_m_for_psum_layout: int | None = None, *,
                                     m_indices: torch.Tensor | None = None) -> None:
    """MoE grouped GEMM, contiguous layout: ``d[r] = a[r] @ b[g(r)]^T`` (bf16 ``d [M, N]``).

    ``a = (x [M, K], sfa [M, ceil(K/128)])``, ``b = (w [G, N, K], sfb [G, ceil(N/128), ceil(K/128)])``;
    ``grouped_layout`` (``m_indices`` in DeepGEMM's older API) int32 ``[M]``: each row's group, each
    group starting at a multiple of 128 rows and padded with -1 rows; or, with ``use_psum_layout``,
    int32 ``[G]`` cumulative row ends (group g's rows ``[align(layout[g-1], 128), layout[g])``). As on
    DeepGEMM's Hopper kernels, the group of a 128-row block is its first row's: -1 rows (and psum gaps)
    in a block that starts with group g are written with ``a[r] @ b[g]^T`` (0 for zeroed padding
    activations), blocks that start with -1 are not written (their ``d`` content is kept).
    ``ensure_zero_padding`` and ``expected_m_for_psum_layout`` are SM100 options and
    tiling hints, accepted and without effect.
    """
    fn = "m_grouped_fp8_gemm_nt_contiguous"
    if m_indices is not None:
        if grouped_layout is not None:
            raise value_error(fn, "m_indices", "is the older name of 'grouped_layout': pass one of them")
        grouped_layout = m_indices
    if grouped_layout is None:
        raise DeepGEMMMissing(f"dsmoe.compat.deep_gemm.{fn}() missing required argument 'grouped_layout'")
    _recipe(fn, recipe, recipe_a, recipe_b, grouped=True)
    x, sfa = _pair(fn, "a", a)
    x = _k_major(fn, "a", x, 2)
    w, sfb = _grouped_b(fn, b)
    M, K = x.shape
    G, N = w.shape[0], w.shape[1]
    if w.shape[2] != K:
        raise value_error(fn, "b[0]", f"must have K={K} like 'a[0]' {tuple(x.shape)}, got shape {tuple(w.shape)}")
    _check_out(fn, "d", d, (M, N), (_BF16,))
    check_tensor(fn, "grouped_layout", grouped_layout, ndim=1)
    check_dtype(fn, "grouped_layout", grouped_layout, (torch.int32,))
    if not grouped_layout.is_contiguous():
        raise value_error(fn, "grouped_layout", f"must be contiguous, got strides {grouped_layout.stride()}")
    check_shape(fn, "grouped_layout", grouped_layout, (G,) if use_psum_layout else (M,))
    if not use_psum_layout and expected_m_for_psum_layout is not None:
        raise value_error(fn, "expected_m_for_psum_layout", "is only meaningful with use_psum_layout=True")
    kb = _cdiv(K, _BK)
    _check_sf(fn, "a", sfa, (M, kb))
    _check_sf(fn, "b", sfb, (G, _cdiv(N, _BK), kb))
    _check_flags(fn, compiled_dims, disable_ue8m0_cast)
    same_device(fn, {"a[0]": x, "a[1]": sfa, "b[0]": w, "b[1]": sfb, "d": d, "grouped_layout": grouped_layout})
    if N <= 0 or K <= 0 or G <= 0:
        raise value_error(fn, "b[0]", f"must have N > 0, K > 0 and at least one group (as DeepGEMM requires), "
                                      f"got shape {tuple(w.shape)}")
    if M == 0:
        return None
    if use_psum_layout and can_read_device_values(grouped_layout):
        prev = 0
        for g, end in enumerate(grouped_layout.tolist()):
            start = _cdiv(prev, _ALIGN) * _ALIGN
            if not start <= end <= M:
                raise value_error(fn, "grouped_layout", f"(psum layout) entry {g} must be in [{start}, {M}] (the previous "
                                                        f"end rounded up to {_ALIGN}, and M), got {end}")
            prev = end
    idx = _psum_to_m_indices(grouped_layout, M) if use_psum_layout else grouped_layout

    Mp, Kp, Np = _cdiv(M, _ALIGN) * _ALIGN, kb * _BK, _cdiv(N, _N_ALIGN) * _N_ALIGN
    x = _pad_dim(_pad_last(x, Kp), 0, Mp)
    w = _pad_dim(_pad_last(w, Kp), 1, Np)
    sfa = _pad_dim(sfa, 0, Mp)
    sfb = _last_dim_packed(sfb)
    if Mp != M:
        idx = torch.cat([idx, idx.new_full((Mp - M,), -1)])
    idx = _block_groups(idx)
    errors = _ops_errors(fn, {"m_indices": "grouped_layout"})
    if Mp == M and Np == N and d.is_contiguous():
        with errors:
            ops.m_grouped_fp8_gemm_nt_contiguous(x, sfa, w, sfb, idx, out=d)
        return None
    stage = torch.empty(Mp, Np, dtype=_BF16, device=d.device)
    stage[:M, :N] = d
    with errors:
        ops.m_grouped_fp8_gemm_nt_contiguous(x, sfa, w, sfb, idx, out=stage)
    d.copy_(stage[:M, :N])
    return None


def m_grouped_fp8_gemm_nn_contiguous(a, b, d, grouped_layout=None, recipe=None, recipe_a=None, recipe_b=None,
                                     compiled_dims: str = "nk", disable_ue8m0_cast: bool = False,
                                     use_psum_layout: bool = False, ensure_zero_padding: bool = True, *,
                                     m_indices: torch.Tensor | None = None) -> None:
    """:func:`m_grouped_fp8_gemm_nt_contiguous` with ``b = (w [G, K, N], sf [G, ceil(K/128), ceil(N/128)])``
    given transposed; the transposed views must be K-major."""
    m_grouped_fp8_gemm_nt_contiguous(a, _swap_pair(b, "b", "m_grouped_fp8_gemm_nn_contiguous"), d, grouped_layout,
                                     recipe, recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast, use_psum_layout,
                                     ensure_zero_padding, m_indices=m_indices)


def m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, expected_m, recipe=None, recipe_a=None, recipe_b=None,
                                 compiled_dims: str = "nk", disable_ue8m0_cast: bool = False, *,
                                 enable_overlap: bool = False, max_block_n: int = 256, signal=None) -> None:
    """MoE grouped GEMM, masked layout: ``d[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g]^T`` (bf16
    ``d [G, M_max, N]``); rows at or past ``masked_m[g]`` are not written (DeepGEMM writes the rest of
    their last 64/128-row tile with unspecified values). ``a = (x [G, M_max, K], sfa [G, M_max,
    ceil(K/128)])``, ``b = (w [G, N, K], sfb [G, ceil(N/128), ceil(K/128)])``, ``masked_m`` int32 ``[G]``
    on the device (read by the kernel: CUDA-graph safe), ``expected_m`` a host int tiling hint.
    ``enable_overlap``/``max_block_n``/``signal`` (a communication-overlap extension some frameworks
    pass) are accepted when overlap is off; ``enable_overlap=True`` raises NotImplementedError."""
    fn = "m_grouped_fp8_gemm_nt_masked"
    if enable_overlap or signal is not None:
        raise unsupported(fn, "enable_overlap/signal (GEMM-communication overlap) is not implemented; call "
                              "without them")
    _recipe(fn, recipe, recipe_a, recipe_b, grouped=True)
    x, sfa = _pair(fn, "a", a)
    x = _k_major(fn, "a", x, 3)
    w, sfb = _grouped_b(fn, b)
    G, M, K = x.shape
    N = w.shape[1]
    if w.shape[0] != G or w.shape[2] != K:
        raise value_error(fn, "b[0]", f"must have shape ({G}, N, {K}) to match 'a[0]' {tuple(x.shape)}, "
                                      f"got {tuple(w.shape)}")
    _check_out(fn, "d", d, (G, M, N), (_BF16,))
    check_tensor(fn, "masked_m", masked_m, ndim=1)
    check_dtype(fn, "masked_m", masked_m, (torch.int32,))
    check_shape(fn, "masked_m", masked_m, (G,))
    if not masked_m.is_contiguous():
        raise value_error(fn, "masked_m", f"must be contiguous, got strides {masked_m.stride()}")
    expected_m = as_int(fn, "expected_m", expected_m, min_value=0)
    as_int(fn, "max_block_n", max_block_n, min_value=1)
    kb = _cdiv(K, _BK)
    _check_sf(fn, "a", sfa, (G, M, kb))
    _check_sf(fn, "b", sfb, (G, _cdiv(N, _BK), kb))
    _check_flags(fn, compiled_dims, disable_ue8m0_cast)
    same_device(fn, {"a[0]": x, "a[1]": sfa, "b[0]": w, "b[1]": sfb, "d": d, "masked_m": masked_m})
    if K <= 0:
        raise value_error(fn, "a[0]", f"must have K > 0 (as DeepGEMM requires), got shape {tuple(x.shape)}")
    if G == 0 or M == 0 or N == 0:
        return None

    Kp, Np = kb * _BK, _cdiv(N, _N_ALIGN) * _N_ALIGN
    x = _pad_last(x, Kp)
    w = _pad_dim(_pad_last(w, Kp), 1, Np)
    sfb = _last_dim_packed(sfb)
    errors = _ops_errors(fn, {})
    if Np == N:
        with errors:
            ops.m_grouped_fp8_gemm_nt_masked(x, sfa, w, sfb, masked_m, expected_m, out=d)
        return None
    stage = torch.empty(G, M, Np, dtype=_BF16, device=d.device)
    stage[..., :N] = d
    with errors:
        ops.m_grouped_fp8_gemm_nt_masked(x, sfa, w, sfb, masked_m, expected_m, out=stage)
    d.copy_(stage[..., :N])
    return None


# ----------------------------------------------------------------------------- K-grouped (weight gradients)
def _k_grouped_args(fn: str, d, ks_cpu, grouped_layout, c, recipe, compiled_dims, use_psum_layout, ks, ks_tensor):
    if ks is not None:
        if ks_cpu is not None:
            raise value_error(fn, "ks", "is the older name of 'ks_cpu': pass one of them")
        ks_cpu = ks
    if ks_tensor is not None:
        if grouped_layout is not None:
            raise value_error(fn, "ks_tensor", "is the older name of 'grouped_layout': pass one of them")
        grouped_layout = ks_tensor
    if use_psum_layout:
        raise unsupported(fn, "use_psum_layout=True (an SM100 layout with gaps between groups) is not implemented; "
                              "pass consecutive groups with ks_cpu")
    if _tuple(fn, "recipe", recipe, 3) != (1, 1, 128):
        raise unsupported(fn, f"recipe={tuple(recipe)} is not implemented: K-grouped GEMMs take (1, 1, 128) "
                              "(float32 1x128 scales on both operands)")
    if not isinstance(compiled_dims, str):
        raise type_error(fn, "compiled_dims", f"must be a str, got {type(compiled_dims).__name__}")
    if ks_cpu is None or len(ks_cpu) == 0:
        raise value_error(fn, "ks_cpu", "(the K of each group, a host list) is required without use_psum_layout")
    ks_list = [as_int(fn, "ks_cpu", k, min_value=0) for k in ks_cpu]
    bad = [k for k in ks_list if k % _ALIGN]
    if bad:
        raise value_error(fn, "ks_cpu", f"each group's K must be a multiple of {_ALIGN} "
                                        f"(get_mk_alignment_for_contiguous_layout()), got {bad[0]}")
    check_tensor(fn, "d", d, ndim=3)
    G, M, N = d.shape
    if len(ks_list) != G:
        raise value_error(fn, "ks_cpu", f"must have one entry per group of 'd' ({G}), got {len(ks_list)}")
    _check_out(fn, "d", d, (G, M, N), (_F32,))
    if c is not None:
        _check_out(fn, "c", c, (G, M, N), (_F32,))
        if c.data_ptr() == d.data_ptr() and c.numel() and c.stride() != d.stride():
            raise value_error(fn, "c", "shares d's storage with other strides; pass d itself or a separate tensor")
    if grouped_layout is not None:
        check_tensor(fn, "grouped_layout", grouped_layout, ndim=1)
        check_dtype(fn, "grouped_layout", grouped_layout, (torch.int32,))
        check_shape(fn, "grouped_layout", grouped_layout, (G,))
        if not grouped_layout.is_contiguous():
            raise value_error(fn, "grouped_layout", f"must be contiguous, got strides {grouped_layout.stride()}")
        # The kernel reads the device copy, the host plans with ks_cpu: they must agree. Checked when the
        # values may be read back (not while capturing a CUDA graph or compiling).
        if can_read_device_values(grouped_layout):
            got = grouped_layout.tolist()
            if got != ks_list:
                raise value_error(fn, "grouped_layout", f"must hold ks_cpu={ks_list} on the device, got {got}")
    return ks_list, grouped_layout


def _k_grouped_run(fn, A, sA, B, sB, d, c, ks_list, grouped_layout) -> None:
    """A [M, T], B [N, T] K-major e4m3 with 1x128 scales [M, T/128], [N, T/128] (any strides);
    d[g] = c[g] + A[:, T_g] @ B[:, T_g]^T for the consecutive runs T_g of ks_list."""
    G, M, N = d.shape
    if M == 0 or N == 0 or G == 0:
        return
    if sum(ks_list) == 0:
        if c is None:
            d.zero_()
        elif not _same_view(c, d):
            d.copy_(c)
        return
    sizes = grouped_layout if grouped_layout is not None else torch.tensor(ks_list, dtype=torch.int32, device=d.device)
    Np = _cdiv(N, _N_ALIGN) * _N_ALIGN
    B, sB = _pad_dim(B, 0, Np), _pad_dim(sB, 0, Np)
    accumulate = c is not None
    if Np == N:
        if accumulate and not _same_view(c, d):
            d.copy_(c)
        with _ops_errors(fn, {"group_sizes": "grouped_layout"}):
            ops.k_grouped_fp8_gemm_tn_contiguous(A, sA, B, sB, sizes, out=d, accumulate=accumulate)
        return
    stage = torch.zeros(G, M, Np, dtype=_F32, device=d.device)
    if accumulate:
        stage[..., :N] = c
    with _ops_errors(fn, {"group_sizes": "grouped_layout"}):
        ops.k_grouped_fp8_gemm_tn_contiguous(A, sA, B, sB, sizes, out=stage, accumulate=accumulate)
    d.copy_(stage[..., :N])


def k_grouped_fp8_gemm_tn_contiguous(a, b, d, ks_cpu=None, grouped_layout=None, c=None, recipe=(1, 1, 128),
                                     compiled_dims: str = "mn", use_psum_layout: bool = False, *,
                                     ks=None, ks_tensor=None) -> None:
    """MoE weight gradient, K-grouped: ``d[g] = c[g] + a[K_g]^T @ b[K_g]`` (fp32 ``d [G, M, N]``), where
    ``K_g`` is the g-th run of ``ks_cpu[g]`` rows (each a multiple of 128).

    ``a = (x [sum_k, M] e4m3, sfa fp32 [sum_k/128, M])`` and ``b = (y [sum_k, N], sfb [sum_k/128, N])``,
    both MN-major contiguous (token-major activations/gradients, 128 tokens per scale, as
    ``per_channel_cast_to_fp8`` makes them); ``grouped_layout`` (``ks_tensor`` in the older API) int32
    ``[G]`` holding ``ks_cpu`` on the device; ``c`` fp32 ``[G, M, N]`` or None (then ``d`` is written,
    where DeepGEMM requires ``c``). The operands are transposed into dsmoe's K-major layout in a copy.
    """
    fn = "k_grouped_fp8_gemm_tn_contiguous"
    ks_list, grouped_layout = _k_grouped_args(fn, d, ks_cpu, grouped_layout, c, recipe, compiled_dims,
                                              use_psum_layout, ks, ks_tensor)
    x, sfa = _pair(fn, "a", a)
    y, sfb = _pair(fn, "b", b)
    G, M, N = d.shape
    T = sum(ks_list)
    for name, t, mn in (("a", x, M), ("b", y, N)):
        check_shape(fn, f"{name}[0]", t, (T, mn))
        if not t.is_contiguous():
            raise value_error(fn, f"{name}[0]", f"must be contiguous ([sum_k, mn], MN-major), got strides {t.stride()}")
    _check_sf(fn, "a", sfa, (T // _BK, M))
    _check_sf(fn, "b", sfb, (T // _BK, N))
    same_device(fn, {"a[0]": x, "a[1]": sfa, "b[0]": y, "b[1]": sfb, "d": d, "c": c, "grouped_layout": grouped_layout})
    if M == 0 or N == 0 or G == 0:
        return None
    _k_grouped_run(fn, x.t().contiguous(), sfa.t(), y.t().contiguous(), sfb.t(), d, c, ks_list, grouped_layout)
    return None


def k_grouped_fp8_gemm_nt_contiguous(a, b, d, ks_cpu=None, grouped_layout=None, c=None, recipe=(1, 1, 128),
                                     compiled_dims: str = "mn", use_psum_layout: bool = False, *,
                                     ks=None, ks_tensor=None) -> None:
    """The K-grouped weight gradient in DeepGEMM's Hopper (K-major) layout: ``d[g] = c[g] + A_g @ B_g^T``
    where ``a[0]`` is flat e4m3 ``[sum_k * M]`` holding each group's ``A_g [M, ks_cpu[g]]`` row-major one
    after another (``b[0]`` likewise with N), ``sfa`` fp32 ``[M, sum_k/128]`` and ``sfb [N, sum_k/128]``
    (any strides), ``d``/``c``/``grouped_layout`` as in :func:`k_grouped_fp8_gemm_tn_contiguous`."""
    fn = "k_grouped_fp8_gemm_nt_contiguous"
    ks_list, grouped_layout = _k_grouped_args(fn, d, ks_cpu, grouped_layout, c, recipe, compiled_dims,
                                              use_psum_layout, ks, ks_tensor)
    x, sfa = _pair(fn, "a", a)
    y, sfb = _pair(fn, "b", b)
    G, M, N = d.shape
    T = sum(ks_list)
    for name, t, mn in (("a", x, M), ("b", y, N)):
        if t.numel() != T * mn:
            raise value_error(fn, f"{name}[0]", f"must hold sum(ks_cpu) * {'M' if name == 'a' else 'N'} = {T} * {mn} "
                                                f"elements, got {t.numel()} (shape {tuple(t.shape)})")
        if not t.is_contiguous():
            raise value_error(fn, f"{name}[0]", f"must be contiguous, got strides {t.stride()}")
    _check_sf(fn, "a", sfa, (M, T // _BK))
    _check_sf(fn, "b", sfb, (N, T // _BK))
    same_device(fn, {"a[0]": x, "a[1]": sfa, "b[0]": y, "b[1]": sfb, "d": d, "c": c, "grouped_layout": grouped_layout})
    if M == 0 or N == 0 or G == 0:
        return None

    def regroup(flat: torch.Tensor, mn: int) -> torch.Tensor:
        flat = flat.reshape(-1)
        parts, off = [], 0
        for k in ks_list:
            parts.append(flat[off:off + mn * k].view(mn, k))
            off += mn * k
        return torch.cat(parts, dim=1)

    _k_grouped_run(fn, regroup(x, M), sfa, regroup(y, N), sfb, d, c, ks_list, grouped_layout)
    return None


class DeepGEMMMissing(TypeError):
    """A required argument was not passed (Python's own TypeError for a missing argument)."""
