"""Turns one row of logits into the next token: greedy, or temperature/top-k/top-p sampling.

Each request owns its `torch.Generator`: a seeded request draws the same tokens whatever it is batched with.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """`temperature == 0` means greedy; `top_k <= 0` and `top_p == 1` disable those filters."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Sampler:
    """The per-request sampling state: its parameters and, unless greedy, its random generator."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else random.SystemRandom().getrandbits(63)
            self.generator = torch.Generator().manual_seed(seed)

    def sample(self, logits: torch.Tensor) -> int:
        """The next token from a `[vocab]` row of logits."""
        if self.generator is None:
            return int(torch.argmax(logits))
        probs = filtered_probs(logits, self.params)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampled: softmax(logits / T) restricted to top-k, then to the top-p nucleus.

    Ties at the k-th value are all kept (as Hugging Face does), and the nucleus is the smallest set of the
    most likely tokens whose mass reaches `top_p` (the token that crosses the threshold is included).
    """
    scaled = logits.to(torch.float64) / params.temperature
    vocab = scaled.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop = order[mass_before >= params.top_p]
        probs = probs.index_fill(0, drop, 0.0)
        probs = probs / probs.sum()
    return probs


def sample_batch(logits: torch.Tensor, samplers: list[Sampler]) -> list[int]:
    """One token per row of `[rows, vocab]` logits; greedy rows share one argmax, the rest draw row by row."""
    tokens = torch.argmax(logits, dim=-1).tolist()
    for row, sampler in enumerate(samplers):
        if sampler.generator is not None:
            tokens[row] = sampler.sample(logits[row])
    return tokens
