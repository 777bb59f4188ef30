"""dsmoe.serve: offline serving over the paged MLA latent cache (vLLM-shaped API).

``LLM(model_or_checkpoint_path, ...).generate(prompts, SamplingParams(...)) -> list[RequestOutput]``:
block manager with prefix caching, continuous batching with chunked prefill, preemption by recompute,
sampling (temperature / top-k / top-p / per-request seeds / stop strings and ids) and MTP speculative
decoding. See docs/serve.md."""
from .block_manager import BLOCK_SIZE, BlockManager  # noqa: F401
from .engine import LLM  # noqa: F401
from .params import CompletionOutput, RequestOutput, SamplingParams  # noqa: F401

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "BlockManager", "BLOCK_SIZE"]
