"""What one agent knows of an armed epoch switch E → E+1: the layer ranges of both epochs side by side, the
fence that holds an E+1 batch until the KV it reads has arrived, and the final deltas a source owes.

The fence is explicit per (sequence, layer) and carried in band: a span `(seq, start, n)` of an E+1 batch
reads positions `0 .. start - 1` of every layer it computes, and `start` is exactly the KV length the
sequence's last E step left (a sequence is in one batch at a time, and its next batch is built only after
the previous one returned). So for each layer this stage gains in E+1, the batch may run only once the
stage holds that (sequence, layer) up to `start` with no unfilled block. KV positions are written once,
so a chunk imported at length `start` carries exactly the versions the last E step wrote, whichever
connection or order the chunks came by; no assumption about channel ordering is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeshift.runtime.kv.span import SeqSpan
from pipeshift.runtime.migrate import PlannedChunk
from pipeshift.runtime.stage import Stage

# Collects the final deltas after an E batch: (target data address, chunks) per push target.
Collector = Callable[[Stage, Sequence[int]], list[tuple[str, list[PlannedChunk]]]]


@dataclass
class FenceStats:
    """E+1 batches that had to wait for KV at this stage, and for how long."""

    waits: int = 0
    max_ms: float = 0.0
    total_ms: float = 0.0
    timeouts: int = 0

    def record(self, seconds: float) -> None:
        self.waits += 1
        self.max_ms = max(self.max_ms, seconds * 1e3)
        self.total_ms += seconds * 1e3

    def as_json(self) -> dict[str, Any]:
        return {"waits": self.waits, "max_ms": self.max_ms, "total_ms": self.total_ms, "timeouts": self.timeouts}


@dataclass
class Transition:
    """`old_range` is None for a stage that joins at E+1, `new_range` None for one that leaves after E.
    `fence_layers`: the layers of `new_range` that arrive from other stages. `collect`: set on a source,
    exports what its moving layers still owe the targets for the given sequences."""

    epoch: int
    old_range: tuple[int, int] | None
    new_range: tuple[int, int] | None
    fence_layers: tuple[int, ...]
    collect: Collector | None = None
    fence: FenceStats = field(default_factory=FenceStats)
    # Sequences admitted in band since arming: never adopted for the change, so never cleaned up by it.
    admitted: set[int] = field(default_factory=set)
    # E+1 batches computed here: once there is one, the frontend has armed and the switch cannot be undone.
    new_batches: int = 0

    def range_for(self, epoch: int) -> tuple[int, int]:
        """The layers a batch of `epoch` computes here; ValueError for an epoch this stage has no range in."""
        if epoch == self.epoch:
            chosen = self.new_range
        elif epoch < self.epoch:
            chosen = self.old_range
        else:
            chosen = None
        if chosen is None:
            served = [e for e, r in ((self.epoch - 1, self.old_range), (self.epoch, self.new_range)) if r]
            raise ValueError(f"a batch of epoch {epoch} reached a stage that serves epochs {served}")
        return chosen


def missing_kv(stage: Stage, spans: Sequence[SeqSpan], layers: Sequence[int]) -> list[str]:
    """The (sequence, layer) pairs whose KV does not yet reach the span's start: what the fence waits for."""
    cache, bs = stage.cache, stage.spec.block_size
    missing = []
    for span in spans:
        if span.start == 0:
            continue  # admitted at E+1: nothing to wait for
        blocks = math.ceil(span.start / bs)
        for layer in layers:
            held = cache.length(span.seq_id, layer)
            if held < span.start or -1 in cache.block_table(span.seq_id, layer)[:blocks]:
                missing.append(f"sequence {span.seq_id} layer {layer} holds {held} of {span.start} positions")
    return missing
