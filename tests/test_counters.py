"""The per-layer work counter against a brute-force count of positions fed through layers, and the
recomputation it reveals: 0 for a clean run, exactly the repeated work when a batch is run twice.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeshift.control import needed_layer_tokens, tokens_recomputed
from pipeshift.runtime.kv.span import SeqSpan
from pipeshift.runtime.stage import Stage


def inputs(stage: Stage, start: int, n: int) -> torch.Tensor:
    if stage.embed is not None:
        return torch.arange(start, start + n) % 299 + 1
    return torch.ones(n, stage.config.hidden_size)


def generate(stage: Stage, seq: int, prompt: int, generated: int) -> None:
    """Prefill, then decode `generated - 1` positions: the last generated token is never fed back."""
    stage.reserve(seq, prompt + generated)
    stage.forward([SeqSpan(seq, 0, prompt)], inputs(stage, 0, prompt))
    for pos in range(prompt, prompt + generated - 1):
        stage.forward([SeqSpan(seq, pos, 1)], inputs(stage, pos, 1))


@settings(max_examples=6, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 9), st.integers(1, 6)), min_size=1, max_size=3))
def test_a_clean_generation_recomputes_nothing(tiny_model: Path, requests: list[tuple[int, int]]) -> None:
    first, second = Stage(tiny_model, 0, 1), Stage(tiny_model, 1, 3)
    for seq, (prompt, generated) in enumerate(requests):
        generate(first, seq, prompt, generated)
        generate(second, seq, prompt, generated)
    brute = sum(p + g - 1 for p, g in requests)
    assert first.layer_tokens_computed == brute * 1 and second.layer_tokens_computed == brute * 2
    assert tokens_recomputed([first.layer_tokens_computed, second.layer_tokens_computed], requests, 3) == 0


def test_a_batch_run_twice_shows_as_exactly_its_work_recomputed(tiny_model: Path) -> None:
    stage = Stage(tiny_model, 0, 3)
    generate(stage, 0, 5, 4)
    stage.forward([SeqSpan(0, 3, 3)], inputs(stage, 3, 3))  # positions 3..5 again, through 3 layers
    assert tokens_recomputed({"a": stage.layer_tokens_computed}, [(5, 4)], 3) == 3 * 3


def test_a_request_that_generated_nothing_still_needed_its_prefill() -> None:
    assert needed_layer_tokens([(4, 0), (4, 1)], 2) == 8 + 8
    with pytest.raises(ValueError, match="prompt"):
        needed_layer_tokens([(0, 3)], 2)
