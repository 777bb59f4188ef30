"""dsmoe.ops: the public functional API.

Every op validates its inputs (clear errors naming the argument, before any launch), allocates its
outputs with torch and runs a dsmoe CUDA kernel for CUDA tensors or the reference (``dsmoe.ref``) for
CPU tensors. Ops are registered with ``torch.library`` (namespace ``dsmoe``) with fake
implementations, so they work under ``torch.compile(fullgraph=True)`` and CUDA-graph capture.
"""
from . import gemm, mla, moe, quant  # noqa: F401
from ._registry import OPS  # noqa: F401
from .gemm import *  # noqa: F401,F403
from .mla import *  # noqa: F401,F403
from .moe import *  # noqa: F401,F403
from .quant import *  # noqa: F401,F403
