"""dsmoe.nn: trainable DeepSeek-V3 layers (FP8 linears, RMSNorm, YaRN RoPE, MLA, DeepSeekMoE)."""
from .fp8 import FP8Linear, fp8_autocast, fp8_is_enabled, fp8_linear, set_fp8  # noqa: F401
from .mla import MLA, MLAKVCache  # noqa: F401
from .moe import MLP, GroupedExperts, MoE, MoEGate  # noqa: F401
from .norm import RMSNorm  # noqa: F401
from .rope import RotaryEmbedding, apply_rope, yarn_inv_freq  # noqa: F401

__all__ = ["FP8Linear", "fp8_autocast", "fp8_is_enabled", "fp8_linear", "set_fp8", "MLA", "MLAKVCache", "MLP",
           "GroupedExperts", "MoE", "MoEGate", "RMSNorm", "RotaryEmbedding", "apply_rope", "yarn_inv_freq"]
