"""dsmoe.models: DeepSeek-V3 (config, causal LM with MTP, Hugging Face-layout checkpoints)."""
from .checkpoint import CheckpointError  # noqa: F401
from .config import DeepseekV3Config  # noqa: F401
from .deepseek_v3 import CausalLMOutput, DecoderLayer, DeepseekV3ForCausalLM, MTPModule  # noqa: F401

__all__ = ["CheckpointError", "DeepseekV3Config", "CausalLMOutput", "DecoderLayer", "DeepseekV3ForCausalLM",
           "MTPModule"]
