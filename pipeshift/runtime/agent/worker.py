"""The one thread that touches the stage: micro-batches and state changes run on it, in arrival order.

Control calls queue behind the batch being computed, so a resize or layer move never races a forward.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch

from pipeshift.runtime.agent.config import AgentConfig
from pipeshift.runtime.kv import KVCapacityError
from pipeshift.runtime.metrics import AgentMetrics
from pipeshift.runtime.microbatch import MicroBatch, empty_data, last_token_spans
from pipeshift.runtime.model.config import LlamaConfig
from pipeshift.runtime.stage import Stage

logger = logging.getLogger(__name__)
T = TypeVar("T")


class StateConflict(RuntimeError):
    """A control call that is well formed but impossible in the stage's current state (HTTP 409)."""


@dataclass
class StepStats:
    """Counters for `GET /stats`; written by the worker thread only."""

    batches: int = 0
    failed_batches: int = 0
    tokens: int = 0
    step_seconds: float = 0.0
    last_step_seconds: float = 0.0
    layer_tokens_computed: int = 0

    def as_json(self) -> dict[str, Any]:
        return dict(vars(self))


class StageWorker:
    """Owns the `Stage`; every method except `call` must run on the worker thread (use `call`)."""

    def __init__(self, stage: Stage, config: AgentConfig, model: LlamaConfig, metrics: AgentMetrics) -> None:
        self.stage = stage
        self.config = config
        self.model = model
        self.metrics = metrics
        self.stats = StepStats()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stage{config.stage_id}")
        self.refresh_gauges()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.config.dtype)

    def output_width(self) -> int:
        return self.model.vocab_size if self.stage.is_last else self.model.hidden_size

    def process(self, mb: MicroBatch) -> MicroBatch:
        """Release, admit, compute; a failure marks the batch instead of ending the connection."""
        for seq_id in mb.release:
            self.stage.release(seq_id)
        if mb.error:
            return self.fail(mb, mb.error)
        if not mb.spans:
            return mb
        admitted: list[int] = []
        try:
            self._check_positions(mb)
            for span, tokens in zip(mb.spans, mb.reserve, strict=True):
                if tokens:
                    self.stage.reserve(span.seq_id, tokens)
                    admitted.append(span.seq_id)
            started = time.perf_counter()
            try:
                out = self.stage.forward(mb.spans, mb.data)
            finally:
                self._count_layer_tokens()
            elapsed = time.perf_counter() - started
        except (KVCapacityError, ValueError, IndexError, RuntimeError) as exc:
            # Blocks reserved by this batch would otherwise leak: the frontend only releases what it
            # believes every stage admitted.
            for seq_id in admitted:
                self.stage.release(seq_id)
            logger.warning("stage %d failed batch %d: %s", self.config.stage_id, mb.batch_id, exc)
            self.stats.failed_batches += 1
            return self.fail(mb, f"stage {self.config.stage_id}: {exc}")
        self._record(mb.tokens, elapsed)
        spans = last_token_spans(mb.spans) if self.stage.is_last else mb.spans
        reserve = (0,) * len(spans) if self.stage.is_last else mb.reserve
        return replace(mb, spans=spans, reserve=reserve, data=out)

    def fail(self, mb: MicroBatch, error: str) -> MicroBatch:
        """`mb` marked failed with a placeholder of this stage's output shape, valid for the next hop."""
        self.refresh_gauges()
        if not mb.spans:
            return replace(mb, data=empty_data(), error=error)
        return mb.failed(error, self.output_width(), self.dtype)

    def _count_layer_tokens(self) -> None:
        done = self.stage.layer_tokens_computed - self.stats.layer_tokens_computed
        self.stats.layer_tokens_computed += done
        self.metrics.layer_tokens.inc(done)

    def _record(self, tokens: int, elapsed: float) -> None:
        s = self.stats
        s.batches += 1
        s.tokens += tokens
        s.step_seconds += elapsed
        s.last_step_seconds = elapsed
        self.metrics.step.observe(elapsed)
        self.metrics.step_tokens.inc(tokens)
        self.refresh_gauges()

    def refresh_gauges(self) -> None:
        kv = self.stage.cache.stats()
        m = self.metrics
        m.layers.set(self.stage.end - self.stage.start)
        m.kv_total.set(kv["total_blocks"])
        m.kv_used.set(kv["used_blocks"])
        m.kv_reserved.set(kv["reserved_blocks"])
        m.kv_block_bytes.set(kv["bytes_per_block"])

    def info(self) -> dict[str, Any]:
        kv = self.stage.cache.stats()
        return {
            "stage_id": self.config.stage_id,
            "layers": [self.stage.start, self.stage.end],
            "loaded_layers": self.stage.loaded_layers,
            "kv_layers": self.stage.kv_layers(),
            "weight_bytes": self.stage.weight_bytes(),
            "num_layers": self.model.num_layers,
            "hidden_size": self.model.hidden_size,
            "vocab_size": self.model.vocab_size,
            "dtype": self.config.dtype,
            "block_size": self.config.block_size,
            "is_first": self.stage.is_first,
            "is_last": self.stage.is_last,
            "kv": {
                "total_blocks": kv["total_blocks"],
                "used_blocks": kv["used_blocks"],
                "reserved_blocks": kv["reserved_blocks"],
                "free_blocks": kv["free_blocks"],
                "block_bytes": kv["bytes_per_block"],
            },
        }

    def load_layers(self, start: int, end: int) -> None:
        self.check_range(start, end)
        if start != self.stage.end and end != self.stage.start:
            raise StateConflict(
                f"layers [{start}, {end}) do not border the held range "
                f"[{self.stage.start}, {self.stage.end}); a stage's layers stay contiguous"
            )
        try:
            self.stage.load_layers(start, end)
        except (KVCapacityError, ValueError) as exc:
            raise StateConflict(str(exc)) from None
        self.refresh_gauges()

    def unload_layers(self, start: int, end: int) -> None:
        self.check_range(start, end)
        held = (self.stage.start, self.stage.end)
        if (
            (start, end) == held
            or not (start == held[0] or end == held[1])
            or start < held[0]
            or end > held[1]
        ):
            raise StateConflict(
                f"cannot unload layers [{start}, {end}) from [{held[0]}, {held[1]}): only a "
                "prefix or suffix of the held range, never all of it"
            )
        self.stage.unload_layers(start, end)
        self.refresh_gauges()

    def resize(self, blocks: int) -> None:
        """Grow or shrink towards `blocks`; the pool moves in whole slabs, so `info` has the result."""
        cache = self.stage.cache
        try:
            if blocks > cache.total_blocks:
                cache.grow(blocks - cache.total_blocks)
            elif blocks < cache.total_blocks:
                cache.shrink(cache.total_blocks - blocks)
        except KVCapacityError as exc:
            raise StateConflict(str(exc)) from None
        self.refresh_gauges()

    def _check_positions(self, mb: MicroBatch) -> None:
        """Positions beyond the model's context would make RoPE tables grow without bound: refuse early."""
        limit = self.model.max_position_embeddings
        for span in mb.spans:
            if span.end > limit:
                raise ValueError(
                    f"sequence {span.seq_id} reaches position {span.end - 1}; the model's "
                    f"context ends at {limit - 1}"
                )

    def check_range(self, start: int, end: int) -> None:
        if not 0 <= start < end <= self.model.num_layers:
            raise ValueError(
                f"layer range [{start}, {end}) is not within the model's 0..{self.model.num_layers}"
            )
