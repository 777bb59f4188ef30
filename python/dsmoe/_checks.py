"""Argument checks shared by every op. Each failure names the op, the argument, and the expected and
actual values, and happens before any kernel launch."""
from __future__ import annotations

import math
from typing import Iterable

import torch


def _fmt_dtypes(dtypes: Iterable[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(op: str, arg: str, t, *, dtypes=None, ndim=None, min_ndim=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"dsmoe.{op}: argument '{arg}' must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        raise TypeError(f"dsmoe.{op}: argument '{arg}' must have dtype {_fmt_dtypes(dtypes)}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"dsmoe.{op}: argument '{arg}' must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"dsmoe.{op}: argument '{arg}' must have at least {min_ndim} dims, got shape {tuple(t.shape)}")


def check_shape(op: str, arg: str, t: torch.Tensor, expected) -> None:
    exp = tuple(expected)
    if tuple(t.shape) != exp:
        raise ValueError(f"dsmoe.{op}: argument '{arg}' must have shape {exp}, got {tuple(t.shape)}")


def check_same_device(op: str, named: dict) -> torch.device:
    devs = {k: v.device for k, v in named.items() if isinstance(v, torch.Tensor)}
    first = next(iter(devs.values()))
    for k, d in devs.items():
        if d != first:
            names = ", ".join(f"{n}={dd}" for n, dd in devs.items())
            raise ValueError(f"dsmoe.{op}: all tensors must be on one device, got {names}")
    return first


def check_contiguous(op: str, arg: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"dsmoe.{op}: argument '{arg}' must be contiguous, got shape {tuple(t.shape)} with strides {t.stride()}")


def check_last_dim_contiguous(op: str, arg: str, t: torch.Tensor) -> None:
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"dsmoe.{op}: argument '{arg}' must have a contiguous last dim (stride 1), got strides {t.stride()}")


def check_multiple(op: str, arg: str, value: int, multiple: int, what: str) -> None:
    if multiple <= 0 or value % multiple != 0:
        raise ValueError(f"dsmoe.{op}: argument '{arg}': {what}={value} must be a multiple of {multiple}")


def rows_view(op: str, arg: str, t: torch.Tensor) -> torch.Tensor:
    """Views ``t`` ([..., K], last dim contiguous) as [rows, K] without copying, or raises."""
    check_last_dim_contiguous(op, arg, t)
    K = t.shape[-1]
    try:
        return t.view(-1, K) if t.dim() != 2 else t
    except RuntimeError:
        raise ValueError(
            f"dsmoe.{op}: argument '{arg}': leading dims of shape {tuple(t.shape)} with strides {t.stride()} "
            "cannot be flattened without a copy; pass a contiguous tensor"
        ) from None


def check_int(op: str, arg: str, v, *, min_value: int | None = None) -> int:
    """``v`` must be a Python int (not a bool) and, if given, >= ``min_value``."""
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"dsmoe.{op}: argument '{arg}' must be an int, got {type(v).__name__} {v!r}")
    if min_value is not None and v < min_value:
        raise ValueError(f"dsmoe.{op}: argument '{arg}' must be >= {min_value}, got {v}")
    return v


def check_float(op: str, arg: str, v, *, min_value: float | None = None, finite: bool = True) -> float:
    """``v`` must be a real number (int or float, not a bool), finite unless ``finite=False``, and, if
    given, >= ``min_value``. Returns it as a float."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise TypeError(f"dsmoe.{op}: argument '{arg}' must be a float, got {type(v).__name__} {v!r}")
    f = float(v)
    if finite and not math.isfinite(f):
        raise ValueError(f"dsmoe.{op}: argument '{arg}' must be finite, got {v!r}")
    if min_value is not None and not f >= min_value:
        raise ValueError(f"dsmoe.{op}: argument '{arg}' must be >= {min_value}, got {v!r}")
    return f


def check_float_dtype(op: str, arg: str, dtype) -> torch.dtype:
    """An output dtype argument: a floating-point torch.dtype other than float8."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize == 1:
        raise TypeError(f"dsmoe.{op}: argument '{arg}' must be a floating-point torch.dtype (float32, float16, "
                        f"bfloat16, float64), got {dtype!r}")
    return dtype


def can_read_device_values(t: torch.Tensor | None = None) -> bool:
    """True when a check may read tensor values back to the host: not while torch.compile traces and not
    while the current CUDA stream is capturing a graph (a host read would break either)."""
    if torch.compiler.is_compiling():
        return False
    if t is not None and t.device.type != "cuda":
        return True
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_index_range(op: str, arg: str, t: torch.Tensor, lo: int, hi: int, what: str = "") -> None:
    """Values of the integer tensor ``t`` must lie in ``[lo, hi)``. Reads them back (one host sync on a
    GPU), so it is skipped while compiling or capturing (see ``can_read_device_values``)."""
    if t.numel() == 0 or not can_read_device_values(t):
        return
    vmin, vmax = int(t.min()), int(t.max())
    if vmin < lo or vmax >= hi:
        note = f" ({what})" if what else ""
        raise ValueError(f"dsmoe.{op}: argument '{arg}': values must be in [{lo}, {hi}){note}, "
                         f"got range [{vmin}, {vmax}]")
