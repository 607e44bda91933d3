"""A Stage: micro-batches that mix prefill chunks and decode steps of many sequences compute what
each sequence alone computes, and layer ranges grow and shrink without changing results."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeshift.runtime.kv import KVCapacityError, SeqSpan
from pipeshift.runtime.model.checkpoint import ModelDir
from pipeshift.runtime.stage import Stage

F64 = torch.float64


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> ModelDir:
    return ModelDir(tiny_model)


def alone(model: ModelDir, tokens: list[int], start: int = 0, end: int | None = None) -> torch.Tensor:
    """Reference: the whole sequence in one prefill on a fresh stage, every position's output."""
    stage = Stage(model, start, end or model.config.num_layers, dtype=F64, kv_blocks=64)
    stage.reserve(0, len(tokens))
    return stage.forward([SeqSpan(0, 0, len(tokens))], torch.tensor(tokens), all_logits=True)


@st.composite
def schedules(draw: st.DrawFn) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Sequences and a schedule: each step advances some sequences by a chunk (1 token = decode)."""
    seqs = draw(st.lists(st.lists(st.integers(0, 299), min_size=1, max_size=40), min_size=1, max_size=5))
    done = [0] * len(seqs)
    steps: list[list[tuple[int, int]]] = []
    while any(d < len(s) for d, s in zip(done, seqs, strict=True)):
        pending = [i for i, s in enumerate(seqs) if done[i] < len(s)]
        chosen = draw(st.lists(st.sampled_from(pending), min_size=1, unique=True))
        step = []
        for i in chosen:
            n = draw(st.integers(1, len(seqs[i]) - done[i]))
            step.append((i, n))
            done[i] += n
        steps.append(step)
    return seqs, steps


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=schedules(), block_size=st.sampled_from([1, 4, 16]))
def test_mixed_micro_batches_equal_each_sequence_alone(model: ModelDir, case: tuple, block_size: int) -> None:
    seqs, steps = case
    stage = Stage(model, 0, model.config.num_layers, dtype=F64, kv_blocks=512, block_size=block_size)
    seq_ids = [7 * i + 100 for i in range(len(seqs))]  # arbitrary caller-chosen ids
    for seq_id, tokens in zip(seq_ids, seqs, strict=True):
        stage.reserve(seq_id, len(tokens))
    got: list[list[torch.Tensor]] = [[] for _ in seqs]
    done = [0] * len(seqs)
    for step in steps:
        spans = [SeqSpan(seq_ids[i], done[i], n) for i, n in step]
        inputs = torch.tensor([t for i, n in step for t in seqs[i][done[i] : done[i] + n]])
        logits = stage.forward(spans, inputs, all_logits=True)
        row = 0
        for i, n in step:
            got[i].append(logits[row : row + n])
            row += n
            done[i] += n
    for i, tokens in enumerate(seqs):
        torch.testing.assert_close(torch.cat(got[i]), alone(model, tokens), rtol=1e-9, atol=1e-9)


def test_last_stage_returns_each_spans_last_token_logits(model: ModelDir) -> None:
    a, b = [5, 6, 7, 8], [9, 10]
    stage = Stage(model, 0, 3, dtype=F64, kv_blocks=64)
    stage.reserve(1, 4)
    stage.reserve(2, 2)
    logits = stage.forward([SeqSpan(1, 0, 4), SeqSpan(2, 0, 2)], torch.tensor(a + b))
    assert logits.shape == (2, model.config.vocab_size)
    torch.testing.assert_close(logits[0], alone(model, a)[-1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logits[1], alone(model, b)[-1], rtol=1e-9, atol=1e-9)


def test_chained_stages_equal_one_stage(model: ModelDir) -> None:
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    first, last = Stage(model, 0, 1, dtype=F64, kv_blocks=64), Stage(model, 1, 3, dtype=F64, kv_blocks=64)
    spans = [SeqSpan(0, 0, len(tokens))]
    for s in (first, last):
        s.reserve(0, len(tokens))
    hidden = first.forward(spans, torch.tensor(tokens))
    assert hidden.shape == (len(tokens), model.config.hidden_size)
    torch.testing.assert_close(last.forward(spans, hidden, all_logits=True), alone(model, tokens))


def test_loading_and_unloading_layers_keeps_results(model: ModelDir) -> None:
    tokens = [11, 12, 13, 14, 15]
    stage = Stage(model, 1, 2, dtype=F64, kv_blocks=64)
    assert not stage.is_first and not stage.is_last
    stage.load_layers(0, 1)  # grow at the front: becomes first
    stage.load_layers(2, 3)  # grow at the back: becomes last
    assert (stage.start, stage.end, stage.is_first, stage.is_last) == (0, 3, True, True)
    stage.reserve(0, len(tokens))
    full = stage.forward([SeqSpan(0, 0, 5)], torch.tensor(tokens), all_logits=True)
    torch.testing.assert_close(full, alone(model, tokens), rtol=1e-12, atol=1e-12)
    assert stage.cache.layers_of(0) == [0, 1, 2]

    stage.unload_layers(2, 3)  # no longer last: returns hidden states
    assert stage.cache.layers_of(0) == [0, 1]
    assert stage.head is None and not stage.is_last
    assert stage.cache.reserved_for(0) == stage.blocks_for(len(tokens))  # reservation shrank with the layers
    stage.release(0)
    stage.reserve(0, len(tokens))
    hidden = stage.forward([SeqSpan(0, 0, 5)], torch.tensor(tokens))
    tail = Stage(model, 2, 3, dtype=F64, kv_blocks=64)
    tail.reserve(0, len(tokens))
    torch.testing.assert_close(tail.forward([SeqSpan(0, 0, 5)], hidden, all_logits=True), full,
                               rtol=1e-12, atol=1e-12)


def test_loading_layers_extends_live_reservations(model: ModelDir) -> None:
    stage = Stage(model, 0, 1, dtype=F64, kv_blocks=64, block_size=4)
    stage.reserve(3, 10)
    assert stage.cache.reserved_for(3) == 3  # ceil(10 / 4) blocks x 1 layer
    stage.load_layers(1, 3)
    assert stage.cache.reserved_for(3) == 9
    stage.forward([SeqSpan(3, 0, 10)], torch.arange(10))  # every layer can write all 10 positions


@pytest.mark.parametrize(("held", "load"), [((0, 1), (2, 3)), ((1, 2), (1, 2)), ((1, 2), (0, 4))])
def test_loading_a_range_that_does_not_border_is_refused(model: ModelDir, held: tuple, load: tuple) -> None:
    stage = Stage(model, *held, dtype=F64, kv_blocks=8)
    with pytest.raises(ValueError, match="border"):
        stage.load_layers(*load)
    assert (stage.start, stage.end) == held


@pytest.mark.parametrize("unload", [(0, 3), (1, 2), (2, 4)])
def test_unloading_all_or_a_middle_layer_is_refused(model: ModelDir, unload: tuple) -> None:
    stage = Stage(model, 0, 3, dtype=F64, kv_blocks=8)
    with pytest.raises(ValueError, match="prefix or suffix"):
        stage.unload_layers(*unload)
    assert sorted(stage.layers) == [0, 1, 2]


def test_reservations_are_bounded_by_the_pool(model: ModelDir) -> None:
    stage = Stage(model, 0, 3, dtype=F64, kv_blocks=64, block_size=16)  # pools come in 64-block slabs
    assert stage.can_reserve(16 * 21) and not stage.can_reserve(16 * 22)  # 3 layers x 22 blocks > 64
    stage.reserve(0, 16 * 20)
    with pytest.raises(KVCapacityError):
        stage.reserve(1, 32)
    stage.release(0)
    stage.reserve(1, 32)


def test_bad_inputs_are_refused(model: ModelDir) -> None:
    stage = Stage(model, 0, 3, dtype=F64, kv_blocks=8)
    stage.reserve(0, 4)
    with pytest.raises(ValueError, match=r"token ids must be in 0\.\.299"):
        stage.forward([SeqSpan(0, 0, 2)], torch.tensor([1, 300]))
    with pytest.raises(ValueError, match="2 rows but the 1 spans hold 3 tokens"):
        stage.forward([SeqSpan(0, 0, 3)], torch.tensor([1, 2]))
    middle = Stage(model, 1, 2, dtype=F64, kv_blocks=8)
    with pytest.raises(ValueError, match="hidden states"):
        middle.forward([SeqSpan(0, 0, 2)], torch.tensor([1, 2]))
