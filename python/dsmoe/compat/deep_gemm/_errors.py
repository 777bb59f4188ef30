"""Exception types of ``dsmoe.compat.deep_gemm``.

DeepGEMM reports every failed host check as a ``RuntimeError`` (its C++ assertion surfaces through
pybind11 as one), and its older Python API as an ``AssertionError``. The errors here are also the
``ValueError``/``TypeError`` dsmoe raises everywhere else, so a framework's ``except RuntimeError`` and
dsmoe-style handlers both catch them. Unsupported recipes and layouts raise ``NotImplementedError``
(itself a ``RuntimeError``).
"""
from __future__ import annotations

import operator

import torch

__all__ = ["DeepGEMMValueError", "DeepGEMMTypeError"]


class DeepGEMMValueError(ValueError, RuntimeError):
    """A bad shape, stride or value."""


class DeepGEMMTypeError(TypeError, RuntimeError):
    """A wrong dtype or Python type."""


def _prefix(fn: str) -> str:
    return f"dsmoe.compat.deep_gemm.{fn}"


def value_error(fn: str, arg: str, msg: str) -> DeepGEMMValueError:
    return DeepGEMMValueError(f"{_prefix(fn)}: argument '{arg}' {msg}")


def type_error(fn: str, arg: str, msg: str) -> DeepGEMMTypeError:
    return DeepGEMMTypeError(f"{_prefix(fn)}: argument '{arg}' {msg}")


def unsupported(fn: str, msg: str) -> NotImplementedError:
    return NotImplementedError(f"{_prefix(fn)}: {msg}")


def dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


def check_tensor(fn: str, arg: str, t, *, ndim=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise type_error(fn, arg, f"must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise value_error(fn, arg, f"must have {ndim} dims, got shape {tuple(t.shape)}")
    return t


def check_shape(fn: str, arg: str, t: torch.Tensor, shape) -> None:
    if tuple(t.shape) != tuple(shape):
        raise value_error(fn, arg, f"must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_dtype(fn: str, arg: str, t: torch.Tensor, dtypes) -> None:
    if t.dtype not in tuple(dtypes):
        want = " or ".join(dtype_name(d) for d in dtypes)
        raise type_error(fn, arg, f"must have dtype {want}, got {dtype_name(t.dtype)}")


def as_int(fn: str, arg: str, v, *, min_value: int | None = None) -> int:
    if isinstance(v, bool):
        raise type_error(fn, arg, f"must be an int, got bool {v!r}")
    try:
        i = operator.index(v)
    except TypeError:
        raise type_error(fn, arg, f"must be an int, got {type(v).__name__} {v!r}") from None
    if min_value is not None and i < min_value:
        raise value_error(fn, arg, f"must be >= {min_value}, got {i}")
    return i


def same_device(fn: str, named: dict) -> torch.device:
    devs = {k: v.device for k, v in named.items() if isinstance(v, torch.Tensor)}
    first = next(iter(devs.values()))
    if any(d != first for d in devs.values()):
        names = ", ".join(f"{k}={d}" for k, d in devs.items())
        raise DeepGEMMValueError(f"{_prefix(fn)}: all tensors must be on one device, got {names}")
    return first
