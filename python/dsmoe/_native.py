"""Access to the compiled module ``dsmoe._C`` and the glue that turns tensors into launcher arguments.

The native module never sees a torch tensor: it gets device pointers (ints), sizes, strides and the
CUDA stream handle. This file is the one place that does that conversion.
"""
from __future__ import annotations

import contextlib
import functools
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


# ----------------------------------------------------------------------------- kernel dispatch
# Op families whose CUDA kernels DSMOE_DISABLE_KERNELS can switch off (dsmoe.ops registry families).
KERNEL_FAMILIES = ("gemm", "mla", "moe", "quant", "ep")
DISABLE_ENV = "DSMOE_DISABLE_KERNELS"


@functools.lru_cache(maxsize=16)
def parse_disabled_kernels(value: str) -> frozenset:
    """The families named by a DSMOE_DISABLE_KERNELS value: a comma list of KERNEL_FAMILIES or ``all``
    (case and spaces ignored; empty: none). Unknown names raise a ValueError that lists the valid ones."""
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    if "all" in names:
        return frozenset(KERNEL_FAMILIES)
    bad = [n for n in names if n not in KERNEL_FAMILIES]
    if bad:
        raise ValueError(f"{DISABLE_ENV}={value!r}: unknown op family {bad[0]!r}; valid names are "
                         f"{', '.join(KERNEL_FAMILIES)} or all (comma-separated)")
    return frozenset(names)


def disabled_kernels() -> frozenset:
    """Families whose CUDA tensors run the torch reference, from the environment (read on every call:
    one dict lookup, the parse is cached, so a change takes effect at the next op)."""
    return parse_disabled_kernels(os.environ.get(DISABLE_ENV, ""))


def dispatch(family: str, device: torch.device) -> str:
    """``"kernel"`` or ``"reference"``: how an op of ``family`` runs on ``device``. The one decision every
    op's CUDA/CPU branch takes: CPU tensors and disabled families run the pure-torch reference."""
    if family not in KERNEL_FAMILIES:
        raise ValueError(f"dsmoe: unknown op family {family!r}; valid: {', '.join(KERNEL_FAMILIES)}")
    # NOTE: parsed before the device test, so a misspelt value fails on every device, not only on a GPU.
    disabled = disabled_kernels()
    if device.type != "cuda":
        return "reference"
    return "reference" if family in disabled else "kernel"


def use_kernel(family: str, t: torch.Tensor) -> bool:
    """True when ``t``'s op of ``family`` runs the CUDA kernel (see dispatch)."""
    return dispatch(family, t.device) == "kernel"


# ----------------------------------------------------------------------------- driver and build checks
# First CUDA driver branch of each CUDA major version. A runtime of major X (cudart is linked
# statically) runs on any driver of that major or later (minor version compatibility; our kernels are
# SASS, no PTX JIT), so what counts is the driver's CUDA major.
_DRIVER_BRANCH = {11: 450, 12: 525, 13: 580}


def min_driver_for_runtime(runtime_version: int) -> tuple[int, str]:
    """``(driver CUDA version, driver branch)`` needed by a CUDA runtime ``runtime_version`` (CUDART_VERSION
    encoding, 1000 * major + 10 * minor): e.g. 13000 -> (13000, "R580+")."""
    if not isinstance(runtime_version, int) or runtime_version < 1000:
        raise ValueError(f"dsmoe: CUDA runtime version must be 1000 * major + 10 * minor, got {runtime_version!r}")
    major = runtime_version // 1000
    branch = _DRIVER_BRANCH.get(major)
    return major * 1000, (f"R{branch}+" if branch else f"one that supports CUDA {major}.0")


def _fmt_cuda(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def driver_problem(runtime_version: int, driver_version: int) -> str | None:
    """None when the driver (cudaDriverGetVersion: the CUDA version it supports, 0 without a driver) can
    run this build's CUDA runtime; otherwise what is needed."""
    need, branch = min_driver_for_runtime(runtime_version)
    if driver_version >= need:
        return None
    have = "no CUDA driver was found" if driver_version <= 0 else f"the installed driver supports CUDA {_fmt_cuda(driver_version)}"
    return (f"dsmoe._C links the CUDA {_fmt_cuda(runtime_version)} runtime, which needs an NVIDIA driver {branch} "
            f"(CUDA {_fmt_cuda(need)} or later); {have}. Update the driver, or rebuild dsmoe with an nvcc "
            f"not newer than the driver's CUDA version")


def sm90a_problem(build_info: dict, capability: tuple[int, int] | None) -> str | None:
    """None when the GEMM and MLA decode kernels can run on a device of ``capability``; else why not.
    ``build_info["sm90a"]`` says whether sm_90a code was compiled (csrc/runtime.cpp parses the archs)."""
    if not build_info.get("cuda_compiled"):
        return "dsmoe._C was built without CUDA"
    if not build_info.get("sm90a", False):
        return (f"dsmoe._C was compiled for CUDA archs {build_info.get('cuda_archs')!r} without 90a: the FP8 GEMM "
                f"and MLA decode kernels need sm_90a (wgmma, setmaxnreg) and refuse to launch; rebuild with "
                f"DSMOE_CUDA_ARCHS=90a")
    if capability is not None and tuple(capability) != (9, 0):
        return (f"the FP8 GEMM and MLA decode kernels need an sm_90 (Hopper) GPU, this one is "
                f"sm_{capability[0]}{capability[1]}")
    return None


_RUNTIME_OK: list = []  # [None] once the driver passed, [message] when it failed (checked once)


def _check_runtime(op: str) -> None:
    if not _RUNTIME_OK:
        rt = _C.build_info.get("cudart_version", 0) if _C is not None else 0
        drv = _C.cuda_driver_version() if rt and hasattr(_C, "cuda_driver_version") else None
        _RUNTIME_OK.append(None if drv is None else driver_problem(int(rt), int(drv)))
    if _RUNTIME_OK[0] is not None:
        raise RuntimeError(f"dsmoe.{op}: {_RUNTIME_OK[0]}")


def _call_on(device: torch.device, fn, *args):
    with torch.cuda.device(device):
        return fn(*args)


def on_device(device: torch.device):
    """Context that makes ``device`` (a CUDA device) current, a no-op when it already is: the launchers
    query attributes and launch on the current device while the stream they get is the tensor's."""
    if device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def require_kernel(op: str, name: str, device: torch.device | None = None):
    """Returns the launcher for a CUDA tensor, or raises a RuntimeError that says why there is none.

    With ``device``, the launcher returned runs with that device current (see on_device). The first call
    also checks that the CUDA driver can run this build's runtime (once per process)."""
    fn = _require_kernel(op, name)
    _check_runtime(op)
    if device is not None and device.index is not None and device.index != torch.cuda.current_device():
        return functools.partial(_call_on, device, fn)
    return fn


def _require_kernel(op: str, name: str):
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
