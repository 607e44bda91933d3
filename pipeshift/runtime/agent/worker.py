"""The one thread that touches the stage: micro-batches and state changes run on it, in arrival order.

Control calls queue behind the batch being computed, so a resize or layer move never races a forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch

from pipeshift.runtime.agent.config import AgentConfig
from pipeshift.runtime.agent.transition import Transition, missing_kv
from pipeshift.runtime.kv import KVCapacityError
from pipeshift.runtime.metrics import AgentMetrics
from pipeshift.runtime.microbatch import MicroBatch, empty_data, last_token_spans
from pipeshift.runtime.migrate import PlannedChunk
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
    # Epoch-switch batches that waited at a fence for their KV, and how long (all switches so far).
    fence_waits: int = 0
    fence_wait_ms_max: float = 0.0
    fence_wait_ms_total: float = 0.0

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
        # An armed epoch switch (see `transition`), and the sequences released in band since a change began
        # (None when no change is under way): KV for them that arrives late is dropped, not adopted.
        self.transition: Transition | None = None
        self.gone: set[int] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stage{config.stage_id}")
        self.refresh_gauges()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.config.dtype)

    def output_width(self, epoch: int | None = None) -> int:
        """Logits on the last stage of the batch's epoch, hidden states elsewhere."""
        last = self.stage.is_last
        if epoch is not None and self.transition is not None:
            with contextlib.suppress(ValueError):
                last = self.transition.range_for(epoch)[1] == self.model.num_layers
        return self.model.vocab_size if last else self.model.hidden_size

    def step(self, mb: MicroBatch) -> tuple[MicroBatch | None, list[tuple[str, list[PlannedChunk]]]]:
        """`admit` then `compute`, in one hop to the worker: the path of every batch that waits for nothing."""
        failed = self.admit(mb)
        if failed is not None:
            return failed, []
        return self.compute(mb)

    def admit(self, mb: MicroBatch) -> MicroBatch | None:
        """Releases, then the reservations of the sequences the batch admits, in arrival order (before any
        later batch may overtake this one at a fence). A failed batch to pass on, or None."""
        for seq_id in mb.release:
            self.stage.release(seq_id)
            if self.gone is not None:
                self.gone.add(seq_id)
        if mb.error or not mb.spans:
            return None
        admitted: list[int] = []
        try:
            self._check_positions(mb)
            for span, tokens in zip(mb.spans, mb.reserve, strict=True):
                if tokens:
                    self.stage.reserve(span.seq_id, tokens)
                    admitted.append(span.seq_id)
        except (KVCapacityError, ValueError) as exc:
            return self._failed(mb, admitted, exc)
        if self.transition is not None:
            self.transition.admitted.update(admitted)
        return None

    def compute(
        self, mb: MicroBatch, waited_s: float = 0.0
    ) -> tuple[MicroBatch | None, list[tuple[str, list[PlannedChunk]]]]:
        """The batch's output (None while it waits at the fence, see `transition`) and, on a source during an
        epoch switch, the final deltas its old-epoch step leaves for the targets. `waited_s`: how long the
        batch has been held at the fence so far (recorded once it runs)."""
        if mb.error:
            return self.fail(mb, mb.error), []
        if not mb.spans:
            return mb, []
        t = self.transition
        try:
            layer_range = None if t is None else t.range_for(mb.epoch)
            if t is not None and mb.epoch == t.epoch and missing_kv(self.stage, mb.spans, t.fence_layers):
                return None, []
            if t is not None and mb.epoch == t.epoch:
                t.new_batches += 1
                if waited_s > 0:
                    self._record_fence(t, waited_s)
            started = time.perf_counter()
            try:
                out = self.stage.forward(mb.spans, mb.data, layer_range=layer_range)
            finally:
                self._count_layer_tokens()
            elapsed = time.perf_counter() - started
        except (KVCapacityError, ValueError, IndexError, RuntimeError) as exc:
            return self._failed(mb, [s.seq_id for s, r in zip(mb.spans, mb.reserve, strict=True) if r], exc), []
        pushes = []
        if t is not None and mb.epoch < t.epoch and t.collect is not None:
            pushes = t.collect(self.stage, [span.seq_id for span in mb.spans])
        self._record(mb.tokens, elapsed)
        last = self.stage.is_last if layer_range is None else layer_range[1] == self.model.num_layers
        spans = last_token_spans(mb.spans) if last else mb.spans
        reserve = (0,) * len(spans) if last else mb.reserve
        return replace(mb, spans=spans, reserve=reserve, data=out), pushes

    def _record_fence(self, t: Transition, seconds: float) -> None:
        t.fence.record(seconds)
        s = self.stats
        s.fence_waits += 1
        s.fence_wait_ms_max = max(s.fence_wait_ms_max, seconds * 1e3)
        s.fence_wait_ms_total += seconds * 1e3

    def fenced(self, mb: MicroBatch) -> list[str]:
        """What an E+1 batch still waits for here (empty once it may run)."""
        t = self.transition
        if t is None or mb.epoch != t.epoch or mb.error or not mb.spans:
            return []
        return missing_kv(self.stage, mb.spans, t.fence_layers)

    def expire(self, mb: MicroBatch, waited_s: float) -> MicroBatch:
        """`mb` failed after waiting `waited_s` at the fence for KV that never came (a source died)."""
        missing = self.fenced(mb)
        if self.transition is not None:
            self.transition.fence.timeouts += 1
        admitted = [s.seq_id for s, r in zip(mb.spans, mb.reserve, strict=True) if r]
        why = ValueError(f"waited {waited_s:.1f}s at the epoch fence for KV that never came: " + "; ".join(missing[:4]))
        return self._failed(mb, admitted, why)

    def _failed(self, mb: MicroBatch, admitted: list[int], exc: Exception) -> MicroBatch:
        # Blocks reserved by this batch would otherwise leak: the frontend only releases what it believes
        # every stage admitted.
        for seq_id in admitted:
            self.stage.release(seq_id)
        logger.warning("stage %d failed batch %d: %s", self.config.stage_id, mb.batch_id, exc)
        self.stats.failed_batches += 1
        return self.fail(mb, f"stage {self.config.stage_id}: {exc}")

    def fail(self, mb: MicroBatch, error: str) -> MicroBatch:
        """`mb` marked failed with a placeholder of this stage's output shape, valid for the next hop."""
        self.refresh_gauges()
        if not mb.spans:
            return replace(mb, data=empty_data(), error=error)
        return mb.failed(error, self.output_width(mb.epoch), self.dtype)

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
            "memory_bytes": self.config.memory_bytes,  # None: the pool was sized by --kv-bytes
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
                # the read workspaces beside the pool: reused gather buffers, grown to the widest batch read
                "workspace_bytes": kv["workspace_bytes"],
                # per sequence, so a frontend taking over a pool can count what it does not know about
                "reservations": {str(seq): self.stage.cache.reserved_for(seq) for seq in self.stage.cache.sequences()},
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
