"""The stages of a layout chained in one process, and greedy generation over them.

All requests decode together: one prefill micro-batch holding every prompt, then one decode
micro-batch per step holding every sequence still running.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from pipeshift.api import Layout
from pipeshift.runtime.kv import SeqSpan
from pipeshift.runtime.model.checkpoint import ModelDir
from pipeshift.runtime.stage import Stage


class Pipeline:
    """KV pools start at `kv_blocks` per stage (default empty) and grow as requests reserve, in large
    slabs: this process never shrinks them, and gathers within one slab are the fastest."""

    def __init__(self, model: ModelDir, layout: Layout, *, dtype: torch.dtype = torch.float32,
                 kv_blocks: int = 0, block_size: int = 16, slab_blocks: int = 1024) -> None:
        if layout.num_layers != model.config.num_layers:
            raise ValueError(f"layout {layout.short()} covers {layout.num_layers} layers; "
                             f"the model has {model.config.num_layers}")
        self.model = model
        self.stages = [Stage(model, plan.start, plan.end, dtype=dtype, kv_blocks=kv_blocks, block_size=block_size,
                             slab_blocks=slab_blocks) for plan in layout]
        self._ids = itertools.count()

    def forward(self, spans: Sequence[SeqSpan], token_ids: torch.Tensor, *, all_logits: bool = False) -> torch.Tensor:
        x = token_ids
        for stage in self.stages:
            x = stage.forward(spans, x, all_logits=all_logits)
        return x

    def reserve(self, seq_id: int, tokens: int) -> None:
        """Reserve on every stage, growing a stage's pool when it lacks room: this process owns them all."""
        for stage in self.stages:
            short = stage.blocks_for(tokens) - stage.cache.reserved_for(seq_id)
            if short > 0 and not stage.cache.can_reserve(short):
                stage.cache.grow(stage.cache.reserved_blocks + short - stage.cache.total_blocks)
            stage.reserve(seq_id, tokens)

    def release(self, seq_id: int) -> None:
        for stage in self.stages:
            stage.release(seq_id)

    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: int,
                 stop_ids: Sequence[int] = ()) -> list[list[int]]:
        """Greedy continuations of each prompt: up to `max_tokens` ids, ending early with (and
        including) the first stop id."""
        if any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        limit = self.model.config.max_position_embeddings
        too_long = [len(p) for p in prompts if len(p) + max_tokens > limit]
        if too_long:
            raise ValueError(f"a prompt of {too_long[0]} tokens plus {max_tokens} new ones exceeds the model's "
                             f"{limit} positions (max_position_embeddings)")
        outputs: list[list[int]] = [[] for _ in prompts]
        if max_tokens == 0 or not prompts:
            return outputs
        stops = set(stop_ids)
        seq_ids = [next(self._ids) for _ in prompts]
        try:
            for seq_id, prompt in zip(seq_ids, prompts, strict=True):
                self.reserve(seq_id, len(prompt) + max_tokens)
            active = list(range(len(prompts)))
            spans = [SeqSpan(seq_ids[i], 0, len(prompts[i])) for i in active]
            inputs = torch.tensor([t for p in prompts for t in p])
            while True:
                next_ids = self.forward(spans, inputs).argmax(-1).tolist()
                running = []
                for i, token in zip(active, next_ids, strict=True):
                    outputs[i].append(token)
                    if token not in stops and len(outputs[i]) < max_tokens:
                        running.append(i)
                if not running:
                    return outputs
                active = running
                spans = [SeqSpan(seq_ids[i], len(prompts[i]) + len(outputs[i]) - 1, 1) for i in active]
                inputs = torch.tensor([outputs[i][-1] for i in active])
        finally:
            for seq_id in seq_ids:
                self.release(seq_id)
