"""Request-level types, in the shape of vLLM's offline API: ``SamplingParams`` in, ``RequestOutput`` out."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["SamplingParams", "CompletionOutput", "RequestOutput"]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    """How one request samples and when it stops.

    ``temperature`` 0 is greedy (argmax); otherwise logits / temperature, then ``top_k`` (-1 = all), then
    ``top_p`` (the smallest set of most likely tokens whose mass reaches top_p), then a draw with the
    request's own generator (``seed``: same seed, same output whatever else is in the batch).
    ``stop``: strings that end the completion (not included in the text; needs a tokenizer);
    ``stop_token_ids``: ids that end it (kept in ``token_ids``); the model's EOS ends it unless
    ``ignore_eos``. ``max_tokens``: at most this many new tokens. ``logprobs``: None, or return each generated
    token's log-probability and the ``logprobs`` most likely alternatives (0..20) under the model's own
    distribution (log-softmax of the raw logits, before temperature / top-k / top-p)."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> "SamplingParams":
        def bad(arg, want, got):
            raise ValueError(f"SamplingParams: argument '{arg}' must be {want}, got {got!r}")
        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            bad("max_tokens", "an int >= 1", self.max_tokens)
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            bad("temperature", "a finite float >= 0 (0 = greedy)", t)
        p = self.top_p
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
            bad("top_p", "a float in (0, 1]", p)
        if not _is_int(self.top_k) or not (self.top_k == -1 or self.top_k >= 1):
            bad("top_k", "-1 (all tokens) or an int >= 1", self.top_k)
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", "None or an int", self.seed)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and (not isinstance(self.stop, (list, tuple)) or
                                      not all(isinstance(s, str) and s for s in self.stop)):
            bad("stop", "None, a non-empty string or a list of them", self.stop)
        if self.stop_token_ids is not None and (not isinstance(self.stop_token_ids, (list, tuple)) or
                                                not all(_is_int(i) and i >= 0 for i in self.stop_token_ids)):
            bad("stop_token_ids", "None or a list of token ids >= 0", self.stop_token_ids)
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            bad("logprobs", "None or an int in [0, 20]", self.logprobs)
        return self


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None      # "stop" (EOS, a stop id or string) or "length"
    stop_reason: int | str | None = None  # the stop id or string that ended it (None for EOS / length)
    # with SamplingParams.logprobs: per token, (its log-probability, [(id, log-probability)] top ones first)
    logprobs: list | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0            # prompt tokens served from the prefix cache (a multiple of 64)
    # speculative decoding: drafts proposed and accepted for this request
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # main-model forward passes this request took part in (prefill chunks and decode/verify steps)
    num_forward_passes: int = 0
    metrics: dict = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None
