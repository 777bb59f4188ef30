"""Access to the compiled module ``dsmoe._C`` and the glue that turns tensors into launcher arguments.

The native module never sees a torch tensor: it gets device pointers (ints), sizes, strides and the
CUDA stream handle. This file is the one place that does that conversion.
"""
from __future__ import annotations

import os

import torch

try:  # the CPU path (references) works without the native module
    from dsmoe import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: Exception | None = None
except ImportError as e:  # pragma: no cover - exercised when running from a source tree
    _C = None
    _here = os.path.dirname(os.path.abspath(__file__))
    if not any(f.startswith("_C.") and f.endswith((".so", ".pyd")) for f in os.listdir(_here)):
        _IMPORT_ERROR = ImportError(f"no compiled dsmoe._C in {_here} (a source tree without a build; run `pip install .`)")
    else:
        _IMPORT_ERROR = e

if _C is None and os.environ.get("DSMOE_REQUIRE_NATIVE") == "1":  # pragma: no cover
    raise ImportError(f"dsmoe._C could not be imported and DSMOE_REQUIRE_NATIVE=1: {_IMPORT_ERROR}")

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float8_e4m3fn: 3}


def native():
    """The compiled module, or None when dsmoe runs from a source tree without a build."""
    return _C


def cuda_compiled() -> bool:
    return _C is not None and bool(_C.build_info["cuda_compiled"])


def has_kernel(name: str) -> bool:
    """True when the native module exports the launcher ``name`` (i.e. it was built with CUDA)."""
    return cuda_compiled() and hasattr(_C, name)


def require_kernel(op: str, name: str):
    """Returns the launcher for a CUDA tensor, or raises a RuntimeError that says why there is none."""
    if _C is None:
        raise RuntimeError(
            f"dsmoe.{op}: CUDA tensors need the compiled module dsmoe._C, which failed to import "
            f"({_IMPORT_ERROR}); reinstall with `pip install .` on a machine with nvcc"
        )
    if not cuda_compiled():
        raise RuntimeError(f"dsmoe.{op}: dsmoe._C was built without CUDA (no nvcc at build time); rebuild with nvcc")
    fn = getattr(_C, name, None)
    if fn is None:
        raise RuntimeError(f"dsmoe.{op}: this build of dsmoe._C has no CUDA kernel '{name}'")
    return fn


def stream(t: torch.Tensor) -> int:
    """Handle of the current CUDA stream of ``t``'s device (what the launchers take)."""
    return torch.cuda.current_stream(t.device).cuda_stream


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()
