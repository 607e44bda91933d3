"""The dirty set a source owes one target: every written block until sent, then only blocks written since,
per target independently, and everything again after `forget`; released sequences drop out.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeshift.runtime.kv.span import SeqSpan
from pipeshift.runtime.migrate import DirtyTracker
from pipeshift.runtime.stage import Stage

BLOCK = 4


@pytest.fixture
def stage(tiny_model: Path) -> Stage:
    return Stage(tiny_model, 0, 3, dtype=torch.float32, kv_blocks=64, block_size=BLOCK)


def write(stage: Stage, seq: int, start: int, n: int) -> None:
    if start == 0:
        stage.reserve(seq, 32)
    stage.forward([SeqSpan(seq, start, n)], torch.arange(start, start + n) % 300 + 1)


def all_blocks(tokens: int) -> list[int]:
    return list(range(math.ceil(tokens / BLOCK)))


def test_every_written_block_is_dirty_until_sent_then_only_blocks_written_since(stage: Stage) -> None:
    tracker = DirtyTracker()
    write(stage, 7, 0, 6)
    write(stage, 9, 0, 3)
    layers = [1, 2]
    assert tracker.dirty(stage, "t", layers) == {
        (7, 1): all_blocks(6), (7, 2): all_blocks(6), (9, 1): all_blocks(3), (9, 2): all_blocks(3)
    }
    tracker.mark_sent("t", tracker.plan(stage, "t", layers))
    assert tracker.dirty(stage, "t", layers) == {}
    assert tracker.remaining(stage, "t", layers) == (0, 0)
    write(stage, 7, 6, 3)  # positions 6..8: the second block (4..7) changes and a third (8) appears
    assert tracker.dirty(stage, "t", layers) == {(7, 1): [1, 2], (7, 2): [1, 2]}
    assert tracker.remaining(stage, "t", layers) == (4, 4 * stage.spec.bytes_per_block)


def test_a_target_that_was_sent_nothing_still_owes_everything(stage: Stage) -> None:
    tracker = DirtyTracker()
    write(stage, 7, 0, 5)
    tracker.mark_sent("a", tracker.plan(stage, "a", [0]))
    assert tracker.dirty(stage, "a", [0]) == {}
    assert tracker.dirty(stage, "b", [0]) == {(7, 0): all_blocks(5)}


def test_forget_makes_everything_dirty_again_and_released_sequences_drop_out(stage: Stage) -> None:
    tracker = DirtyTracker()
    write(stage, 7, 0, 5)
    write(stage, 9, 0, 2)
    tracker.mark_sent("t", tracker.plan(stage, "t", [0]))
    tracker.forget()
    assert tracker.dirty(stage, "t", [0]) == {(7, 0): all_blocks(5), (9, 0): all_blocks(2)}
    stage.release(9)
    assert tracker.dirty(stage, "t", [0]) == {(7, 0): all_blocks(5)}
