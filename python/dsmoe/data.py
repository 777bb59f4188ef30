"""Synthetic task for the training demo: *permuted copy*, an algorithmic language with a known loss floor.

A sequence is ``[BOS] a_1 .. a_L [SEP] p(a_1) .. p(a_L) [EOS]``: ``L`` symbols drawn uniformly from ``S``,
then the same symbols mapped through a fixed random permutation ``p`` of the alphabet. The model reads the
sequence left to right and predicts each next token:

- the ``L`` source symbols are unpredictable: each costs ``ln S`` nats whatever the model;
- ``SEP``, the ``L`` mapped symbols and ``EOS`` are determined by what came before: 0 nats once learned.

Loss floor (mean next-token cross entropy over the ``2L + 2`` predicted positions):
``L ln S / (2L + 2)`` (the depth-1 MTP loss, which predicts one token further: ``(L - 1) ln S / (2L + 1)``).
Task accuracy: greedy generation of the ``L`` mapped symbols from the prompt
``[BOS] a [SEP]`` (per-symbol and whole-sequence exact match). Solving it needs attention at a fixed
offset (copy) and a lookup (the permutation), which the experts learn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["PermutedCopyTask"]

BOS, EOS, SEP = 0, 1, 2
_FIRST = 3


@dataclass
class PermutedCopyTask:
    num_symbols: int = 32
    length: int = 12
    seed: int = 0

    def __post_init__(self):
        g = torch.Generator().manual_seed(self.seed)
        self.perm = torch.randperm(self.num_symbols, generator=g)

    @property
    def vocab_size(self) -> int:
        return _FIRST + self.num_symbols

    @property
    def seq_len(self) -> int:
        """Tokens per sequence."""
        return 2 * self.length + 3

    @property
    def loss_floor(self) -> float:
        return self.length * math.log(self.num_symbols) / (2 * self.length + 2)

    @property
    def mtp_loss_floor(self) -> float:
        """Floor of the depth-1 MTP loss (predicting the token after next): ``(L - 1) ln S / (2L + 1)``."""
        return (self.length - 1) * math.log(self.num_symbols) / (2 * self.length + 1)

    def sample(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[batch, seq_len]`` int64 sequences."""
        a = torch.randint(0, self.num_symbols, (batch, self.length), generator=generator)
        b = self.perm[a]
        col = lambda v: torch.full((batch, 1), v, dtype=torch.long)  # noqa: E731
        return torch.cat([col(BOS), a + _FIRST, col(SEP), b + _FIRST, col(EOS)], 1)

    def batch(self, batch: int, generator: torch.Generator | None = None):
        """``(input_ids [B, seq_len], labels [B, seq_len])`` with ``labels`` equal to ``input_ids`` (the Hugging
        Face convention: the model shifts, position t is scored against labels[:, t + 1])."""
        s = self.sample(batch, generator)
        return s, s.clone()

    def prompt_len(self) -> int:
        return self.length + 2

    def decode(self, ids) -> str:
        names = {BOS: "<s>", EOS: "</s>", SEP: "|"}
        return " ".join(names.get(int(t), f"{int(t) - _FIRST}") for t in ids)

    def accuracy(self, generated: torch.Tensor, seqs: torch.Tensor) -> tuple[float, float]:
        """``(per-symbol accuracy, exact-match rate)`` of the mapped part of ``generated`` vs ``seqs``."""
        p = self.prompt_len()
        got, want = generated[:, p: p + self.length], seqs[:, p: p + self.length]
        eq = got == want
        return eq.float().mean().item(), eq.all(1).float().mean().item()
