"""`dsmoe info`: version, build, torch, GPU and which ops have CUDA kernels."""
from __future__ import annotations

import platform

import torch

from . import __version__, _native
from .ops import OPS


def collect() -> dict:
    C = _native.native()
    build = dict(C.build_info) if C is not None else {"cuda_compiled": False, "error": str(_native._IMPORT_ERROR)}
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                         "memory_gib": round(p.total_memory / 2**30, 1)})
    ops = {name: {"family": o.family, "cuda_kernel": o.cuda_kernel_available(), "kernels": list(o.kernels), "note": o.note}
           for name, o in sorted(OPS.items(), key=lambda kv: (kv[1].family, kv[0]))}
    return {
        "dsmoe": __version__,
        "native_module": C is not None,
        "build": build,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "driver_devices": C.cuda_device_count() if C is not None else 0,
        "gpus": gpus,
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
    print(f"{'op':40s} {'family':8s} CUDA kernel")
    for name, o in info["ops"].items():
        k = "yes" if o["cuda_kernel"] else ("torch" if not o["kernels"] else "not built")
        print(f"{name:40s} {o['family']:8s} {k}{('  (' + o['note'] + ')') if o['note'] else ''}")
    return 0
