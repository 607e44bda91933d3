"""Sampling draws from exactly the distribution the parameters describe, reproducibly per seed."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeshift.runtime.frontend.sampling import Sampler, SamplingParams, filtered_probs, sample_batch


def reference_probs(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """Written out from the definitions: scale, keep the k largest, softmax, keep the smallest nucleus."""
    z = [x / temperature for x in logits]
    keep = set(range(len(z)))
    if 0 < top_k < len(z):
        kth = sorted(z, reverse=True)[top_k - 1]
        keep = {i for i in keep if z[i] >= kth}
    m = max(z[i] for i in keep)
    weights = {i: math.exp(z[i] - m) for i in keep}
    total = sum(weights.values())
    probs = {i: w / total for i, w in weights.items()}
    if top_p < 1:
        mass, nucleus = 0.0, set()
        for i in sorted(probs, key=lambda i: -probs[i]):
            nucleus.add(i)
            mass += probs[i]
            if mass >= top_p:
                break
        total = sum(probs[i] for i in nucleus)
        probs = {i: probs[i] / total for i in nucleus}
    return [probs.get(i, 0.0) for i in range(len(logits))]


params_strategy = st.tuples(
    st.lists(st.floats(-8, 8, allow_nan=False), min_size=2, max_size=12, unique=True),
    st.floats(0.2, 2.0),
    st.integers(0, 12),
    st.floats(0.05, 1.0),
)


@settings(max_examples=60, deadline=None)
@given(params_strategy)
def test_filtered_distribution_matches_the_definition(args: tuple[list[float], float, int, float]) -> None:
    logits, temperature, top_k, top_p = args
    got = filtered_probs(
        torch.tensor(logits, dtype=torch.float64),
        SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p),
    )
    want = reference_probs(logits, temperature, top_k, top_p)
    assert got.tolist() == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.8), (1.0, 4, 0.6)]
)
def test_draw_frequencies_follow_the_distribution(temperature: float, top_k: int, top_p: float) -> None:
    rng = random.Random(7)
    logits = [rng.uniform(-2, 2) for _ in range(8)]
    sampler = Sampler(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=123))
    draws = 6000
    counts = [0] * len(logits)
    row = torch.tensor(logits, dtype=torch.float32)
    for _ in range(draws):
        counts[sampler.sample(row)] += 1
    for p, c in zip(reference_probs(logits, temperature, top_k, top_p), counts, strict=True):
        if p == 0:
            assert c == 0
        else:
            assert abs(c / draws - p) < 5 * math.sqrt(p * (1 - p) / draws) + 1e-3


def test_the_same_seed_draws_the_same_tokens_and_another_seed_does_not() -> None:
    row = torch.zeros(50)

    def draws(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [sampler.sample(row) for _ in range(40)]

    assert draws(5) == draws(5)
    assert draws(5) != draws(6)


def test_a_seeded_row_draws_the_same_whatever_it_is_batched_with() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 30, generator=gen)
    alone = Sampler(SamplingParams(temperature=0.9, top_p=0.9, seed=42))
    expected = [alone.sample(logits[2]) for _ in range(10)]
    batched = [Sampler(SamplingParams(temperature=1.0, seed=s)) for s in range(5)]
    batched[2] = Sampler(SamplingParams(temperature=0.9, top_p=0.9, seed=42))
    got = [sample_batch(logits, batched)[2] for _ in range(10)]
    assert got == expected


def test_greedy_is_the_first_maximum() -> None:
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0], [3.0, 1.0, 3.0, 3.0]])
    samplers = [Sampler(SamplingParams(temperature=0.0)), Sampler(SamplingParams(temperature=1.0, top_k=1))]
    assert sample_batch(logits, samplers) == [1, 0]


@pytest.mark.parametrize("params", [{"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_invalid_parameters_are_refused(params: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(params))):
        SamplingParams(**params)
