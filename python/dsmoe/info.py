"""`dsmoe info`: version, build, torch, GPU and which ops have CUDA kernels."""
from __future__ import annotations

import os
import platform

import torch

from . import __version__, _native
from .ops import OPS


def package_version() -> str:
    """The installed distribution's version when the running code is that installation, else ``__version__``
    (a source tree on PYTHONPATH next to an older install reports the code that runs)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("dsmoe")
        installed = os.path.realpath(str(dist.locate_file("dsmoe/__init__.py")))
    except (metadata.PackageNotFoundError, OSError, ValueError):
        return __version__
    here = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "__init__.py"))
    return dist.version if installed == here else __version__


def collect() -> dict:
    C = _native.native()
    build = dict(C.build_info) if C is not None else {"cuda_compiled": False, "error": str(_native._IMPORT_ERROR)}
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                         "memory_gib": round(p.total_memory / 2**30, 1)})
    try:
        disabled = sorted(_native.disabled_kernels())
        disabled_error = None
    except ValueError as e:  # reported, not raised: `dsmoe info` is where one looks for the cause
        disabled, disabled_error = [], str(e)
    ops = {name: {"family": o.family, "cuda_kernel": o.cuda_kernel_available(), "kernels": list(o.kernels), "note": o.note,
                  "disabled": bool(o.kernels) and o.family in disabled}
           for name, o in sorted(OPS.items(), key=lambda kv: (kv[1].family, kv[0]))}
    driver = C.cuda_driver_version() if C is not None and hasattr(C, "cuda_driver_version") else 0
    runtime = int(build.get("cudart_version", 0) or 0)
    checks = {
        "driver_version": driver,
        "driver_problem": _native.driver_problem(runtime, driver) if runtime else None,
        "sm90a_problem": [_native.sm90a_problem(build, tuple(int(x) for x in g["capability"].split("."))) for g in gpus]
        if gpus else [_native.sm90a_problem(build, None)],
    }
    return {
        "dsmoe": package_version(),
        "native_module": C is not None,
        "build": build,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "driver_devices": C.cuda_device_count() if C is not None else 0,
        "gpus": gpus,
        "disabled_kernels": disabled,
        "disabled_kernels_error": disabled_error,
        "checks": checks,
        "ops": ops,
    }


def main(as_json: bool = False) -> int:
    info = collect()
    if as_json:
        import json

        print(json.dumps(info, indent=2))
        return 0
    b = info["build"]
    print(f"dsmoe {info['dsmoe']}  (python {info['python']}, torch {info['torch']}, torch CUDA {info['torch_cuda']})")
    if not info["native_module"]:
        print(f"native module: NOT IMPORTED ({b.get('error')}); every op runs its torch reference")
    else:
        print(f"native module: dsmoe._C  CUDA compiled: {'yes' if b['cuda_compiled'] else 'no'}"
              + (f"  archs: sm_{b['cuda_archs']}  nvcc {b['cuda_version']}" if b["cuda_compiled"] else "")
              + f"  host compiler: {b['compiler']}")
    if info["gpus"]:
        for g in info["gpus"]:
            print(f"GPU {g['index']}: {g['name']} (sm_{g['capability'].replace('.', '')}, {g['sms']} SMs, {g['memory_gib']} GiB)")
    else:
        print("GPU: none found (CPU tensors run the references)")
    ch = info["checks"]
    if b.get("cuda_compiled"):
        drv = ch["driver_version"]
        print(f"CUDA driver: {'none found' if drv <= 0 else f'supports CUDA {drv // 1000}.{drv % 1000 // 10}'}"
              + (f"  PROBLEM: {ch['driver_problem']}" if ch["driver_problem"] else "  (ok for this build)"))
        for p in dict.fromkeys(x for x in ch["sm90a_problem"] if x):
            print(f"sm_90a kernels: PROBLEM: {p}")
    if info["disabled_kernels_error"]:
        print(f"DSMOE_DISABLE_KERNELS: INVALID: {info['disabled_kernels_error']} (every op with a CUDA kernel raises until it is fixed)")
    elif info["disabled_kernels"]:
        print(f"DSMOE_DISABLE_KERNELS: {', '.join(info['disabled_kernels'])} run the torch reference on CUDA tensors")
    print(f"{'op':40s} {'family':8s} CUDA kernel")
    for name, o in info["ops"].items():
        k = "yes" if o["cuda_kernel"] else ("torch" if not o["kernels"] else "not built")
        if o["disabled"]:
            k = "disabled (DSMOE_DISABLE_KERNELS: torch reference)"
        print(f"{name:40s} {o['family']:8s} {k}{('  (' + o['note'] + ')') if o['note'] else ''}")
    return 0
