"""dsmoe: kernels and layers for DeepSeek-V3-style models (FP8 GEMM, MLA decoding, MoE routing and
expert-parallel dispatch) for PyTorch."""
__version__ = "0.1.0"

from . import ops, ref  # noqa: F401,E402
