"""The demo's reference check (`pipeshift.local.neartie`): a request whose tokens diverge from the reference is
accepted only where the reference's logits at the first differing position are a near-tie (a margin below 1e-3 of
their spread, or below twice the rounding error measured there against float64) and the other token is one of
the tied ones; in float64 no divergence is accepted.

An exact tie is made on purpose: in a copy of a checkpoint, the head row of token `b` is set to the row of the
token `t` the model emits first, so at that position the logits of `t` and `b` are equal bit for bit.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeshift.api import Layout
from pipeshift.local.neartie import (
    NEAR_TIE_STD_FRACTION,
    ROUNDING_FACTOR,
    ReferenceLogits,
    compare,
    first_divergence,
    near_tie,
)
from pipeshift.runtime.model.checkpoint import HEAD_KEY, ModelDir
from pipeshift.runtime.pipeline import Pipeline

ModelFactory = Callable[..., Path]
PROMPT = [5, 17, 42, 99, 7]
NEW = 12


def greedy(model: Path, dtype: torch.dtype) -> list[int]:
    return Pipeline(ModelDir(model), Layout.parse("3"), dtype=dtype).generate([PROMPT], NEW)[0]


@pytest.fixture(scope="module")
def tied_at_first_token(model_factory: ModelFactory, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, int]:
    """A copy of the tiny model whose head rows of `t` (its first greedy token) and `b` are equal; (dir, t, b)."""
    source = model_factory()
    t = greedy(source, torch.float32)[0]
    b = (t + 1) % ModelDir(source).config.vocab_size
    copy = tmp_path_factory.mktemp("tie") / "model"
    shutil.copytree(source, copy)
    tensors = load_file(copy / "model.safetensors")
    tensors[HEAD_KEY][b] = tensors[HEAD_KEY][t]
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy, t, b


def test_first_divergence_counts_a_missing_token() -> None:
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2
    assert first_divergence([], [4]) == 0


def test_a_divergence_at_an_exact_tie_is_a_near_tie_in_float32_only(tied_at_first_token: tuple[Path, int, int]) -> None:
    model, t, b = tied_at_first_token
    reference = greedy(model, torch.float32)
    assert reference[0] == min(t, b)  # argmax breaks the exact tie towards the lower id
    other = [max(t, b), *reference[1:]]
    assert compare(model, "float32", [PROMPT], [reference], [reference]).divergences == 0
    result = compare(model, "float32", [PROMPT], [reference], [other])
    assert (result.divergences, result.near_ties, result.matches) == (1, 1, True)
    strict = compare(model, "float64", [PROMPT], [greedy(model, torch.float64)], [other])
    assert (strict.divergences, strict.near_ties, strict.matches) == (1, 0, False)


def test_a_divergence_with_a_clear_margin_is_not_accepted(model_factory: ModelFactory) -> None:
    model = model_factory()
    reference = greedy(model, torch.float32)
    logits = ReferenceLogits(model, "float32")
    for position in range(3, NEW):
        scores = logits.at(PROMPT, reference, position)
        top = scores.topk(2).values
        assert int(scores.argmax()) == reference[position]  # teacher forcing reproduces the greedy choice
        if top[0] - top[1] > 10 * NEAR_TIE_STD_FRACTION * scores.std():
            break
    else:
        pytest.fail("no position with a clear margin")
    changed = [*reference[:position], (reference[position] + 1) % 300, *reference[position + 1:]]
    result = compare(model, "float32", [PROMPT, PROMPT], [reference, reference], [reference, changed])
    assert (result.requests, result.divergences, result.near_ties, result.matches) == (2, 1, 0, False)
    truncated = compare(model, "float32", [PROMPT], [reference], [reference[:-2]])
    assert (truncated.divergences, truncated.near_ties) == (1, 0)


def test_a_margin_within_the_measured_rounding_error_is_a_near_tie_but_only_for_the_tied_tokens(
        model_factory: ModelFactory) -> None:
    """bfloat16 rounds logits by ~1e-2 here, far above 1e-3 of their spread: the measured error decides."""
    model = model_factory()
    served_engine, exact_engine = ReferenceLogits(model, "bfloat16"), ReferenceLogits(model, "float64")
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        prompt = torch.randint(2, 300, (8,), generator=generator).tolist()
        served, exact = served_engine.at(prompt, [], 0), exact_engine.at(prompt, [], 0)
        top = served.topk(3)
        margin, error = float(top.values[0] - top.values[1]), float((served - exact).abs().max())
        if NEAR_TIE_STD_FRACTION * float(served.std()) < margin < ROUNDING_FACTOR * error:
            break
    else:
        pytest.fail("no position whose margin lies between the fixed and the measured threshold")
    assert not near_tie(served) and near_tie(served, error)
    first, second = top.indices[:2].tolist()
    assert compare(model, "bfloat16", [prompt], [[first]], [[second]]).near_ties == 1
    far = int(served.argmin())  # a token nowhere near the top: a divergence to it is no tie
    assert float(served.max() - served[far]) > ROUNDING_FACTOR * error
    assert compare(model, "bfloat16", [prompt], [[first]], [[far]]).near_ties == 0
