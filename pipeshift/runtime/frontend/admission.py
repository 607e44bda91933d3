"""The frontend's mirror of every stage's KV block accounting: admission decides here, not on the stages.

A request is admitted only if every stage can reserve `layers * ceil((prompt + max_tokens) / block_size)`
blocks, so nothing is evicted mid-generation; the stages still enforce the same rule with their caches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class StageBudget:
    """One stage's pool as `GET /info` reported it, plus the reservations admitted since."""

    stage_id: int
    num_layers: int
    block_size: int
    total_blocks: int
    reserved_blocks: int = 0

    def blocks_for(self, tokens: int) -> int:
        return self.num_layers * math.ceil(tokens / self.block_size)

    @property
    def free_blocks(self) -> int:
        return self.total_blocks - self.reserved_blocks


class KVMirror:
    def __init__(self, stages: Sequence[StageBudget]) -> None:
        if not stages:
            raise ValueError("KVMirror needs at least one stage")
        self.stages = list(stages)

    def fits(self, tokens: int) -> bool:
        """Whether a sequence of `tokens` positions can be reserved on every stage now."""
        return all(s.blocks_for(tokens) <= s.free_blocks for s in self.stages)

    def never_fits(self, tokens: int) -> str | None:
        """Why a sequence of `tokens` positions could not be admitted even on idle stages, or None."""
        for s in self.stages:
            if s.blocks_for(tokens) > s.total_blocks:
                return (
                    f"{tokens} tokens need {s.blocks_for(tokens)} KV blocks on stage {s.stage_id}, "
                    f"whose pool holds {s.total_blocks}"
                )
        return None

    def reserve(self, tokens: int) -> None:
        if not self.fits(tokens):
            raise RuntimeError(f"admission bug: {tokens} tokens do not fit ({self.describe()})")
        for s in self.stages:
            s.reserved_blocks += s.blocks_for(tokens)

    def release(self, tokens: int) -> None:
        for s in self.stages:
            s.reserved_blocks -= s.blocks_for(tokens)
            if s.reserved_blocks < 0:
                raise RuntimeError(f"admission bug: stage {s.stage_id} released more blocks than reserved")

    @property
    def reserved_blocks(self) -> list[int]:
        return [s.reserved_blocks for s in self.stages]

    def describe(self) -> str:
        return ", ".join(
            f"stage {s.stage_id}: {s.reserved_blocks}/{s.total_blocks} blocks reserved" for s in self.stages
        )
