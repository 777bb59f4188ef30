"""Pure-torch references: the specification of every dsmoe op and its CPU path.

Each submodule is one op family; the public names are re-exported here.
"""
from .quant import (  # noqa: F401
    FP8_DTYPE,
    FP8_MAX,
    mn_major_scales,
    per_block_dequant_fp8,
    per_block_quant_fp8,
    per_token_group_dequant_fp8,
    per_token_group_quant_fp8,
    ue8m0_round_up,
)

from . import gemm, mla, moe, quant  # noqa: F401,E402
from .gemm import *  # noqa: F401,F403,E402
from .mla import *  # noqa: F401,F403,E402
from .moe import *  # noqa: F401,F403,E402
