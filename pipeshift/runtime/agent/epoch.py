"""The agent's calls of a drain-free epoch switch E → E+1: arm, flush, retire (and disarm on abort).

- **arm** (after pre-copy): the stage learns its E+1 range and route and keeps its E ones; a source learns
  which moving layers it owes which target, pushes everything still dirty at once and, from then on, the
  blocks each E step writes in them right after the step (see `pusher`); a target reserves for sequences
  admitted since prepare and holds E+1 batches at its fence until their KV has arrived (see
  `transition`). Until the frontend arms too, this is undone by abort.
- **flush** (once the frontend reports no E batch in flight): answers when every push is imported.
- **retire** (after every source flushed): sequences that finished before the frontend armed and that only
  a change reserved here are released, layers that left are dropped with their KV, the pool is resized to
  the new range (`planned_pool`), the E+1 route becomes the only one and E+1 the stage's epoch.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pipeshift.runtime.agent.downstream import parse_address
from pipeshift.runtime.agent.pusher import KVPusher
from pipeshift.runtime.agent.transition import Transition
from pipeshift.runtime.agent.worker import StateConflict
from pipeshift.runtime.kv import KVCapacityError
from pipeshift.runtime.migrate import PlannedChunk
from pipeshift.runtime.stage import Stage

if TYPE_CHECKING:
    from pipeshift.runtime.agent.dataplane import DataPlane
    from pipeshift.runtime.agent.reconfig import _Change
    from pipeshift.runtime.agent.worker import StageWorker
    from pipeshift.runtime.migrate import DirtyTracker

logger = logging.getLogger(__name__)
Range = tuple[int, int]


def planned_pool(stage: Stage, per_layer: float, layers: Range) -> int:
    """The pool a resize gives a stage holding `layers`: with a memory budget, the whole slabs left beside those
    layers' weights (the weights of departed layers become KV); without, `per_layer` blocks per layer."""
    if stage.memory is not None:
        return stage.memory.pool_blocks(stage.planned_weight_bytes(*layers))
    return math.ceil(per_layer * (layers[1] - layers[0]))


# Live blocks one shrink step may move (8 MiB at the benchmark's 64 KiB blocks): a pool that shrinks after a
# change compacts in steps between micro-batches rather than stalling one batch for the whole move.
SHRINK_STEP_BLOCKS = 128


def resize_for(stage: Stage, per_layer: float) -> bool:
    """One step of resizing the pool for the held range to `planned_pool`, never below what is reserved (the
    frontend admits against the same figure while the switch is armed): a grow at once, a shrink moving at
    most `SHRINK_STEP_BLOCKS` live blocks. True while the pool is still larger than wanted by a slab or more;
    the caller repeats the call in later worker hops (`resize_fully`)."""
    cache = stage.cache
    want = max(cache.reserved_blocks, planned_pool(stage, per_layer, (stage.start, stage.end)))
    if want > cache.total_blocks:
        cache.grow(want - cache.total_blocks)
    elif want < cache.total_blocks:
        cache.shrink(cache.total_blocks - want, max_moved=SHRINK_STEP_BLOCKS)
    return cache.total_blocks - want >= cache.slab_blocks


async def resize_fully(worker: StageWorker, more: bool, per_layer: float) -> None:
    """Finish a resize whose first step ran on the worker (`more`: it said there is more), a step per hop."""
    while more:
        more = await worker.call(resize_for, worker.stage, per_layer)
    worker.refresh_gauges()


class EpochSwitching:
    """Mixed into `Reconfigurer`; the attributes below are its."""

    worker: StageWorker
    data: DataPlane
    token: str | None
    epoch: int
    change: _Change | None
    _done: dict[str, str]
    _tracker: DirtyTracker
    _lock: asyncio.Lock
    _pushers: dict[str, KVPusher]

    def _check_open(self, reconfig_id: str) -> None:  # provided by Reconfigurer
        raise NotImplementedError

    def _new_change(self, reconfig_id: str) -> _Change:  # provided by Reconfigurer
        raise NotImplementedError

    def _fit(self, need: Any, resize: bool) -> None:  # provided by Reconfigurer
        raise NotImplementedError

    async def arm(self, reconfig_id: str, epoch: int, old: Range | None, new: Range | None, downstream: str | None,
                  pushes: Mapping[str, Sequence[int]], sequences: Mapping[int, int], resize: bool) -> dict[str, Any]:
        """Serve E and E+1 side by side (see the module docstring). A repeat for the same switch answers
        again without acting."""
        if new is not None and downstream is None:
            raise ValueError("field 'downstream': a stage with layers in the new epoch needs its new route")
        if old is None and new is None:
            raise ValueError("fields 'old_layers'/'layers': a stage must serve the old epoch, the new one or both")
        for target in pushes:
            parse_address(target)
        async with self._lock:
            t = self.worker.transition
            if t is not None and self.change is not None and self.change.reconfig_id == reconfig_id:
                if (t.epoch, t.old_range, t.new_range) != (epoch, old, new):
                    raise StateConflict(f"reconfiguration {reconfig_id!r} is armed for epoch {t.epoch} with layers "
                                        f"{t.old_range} → {t.new_range}; abort it to arm anything else")
                return await self._armed_answer(t)
            self._check_open(reconfig_id)
            if epoch <= self.epoch:
                raise StateConflict(f"epoch {epoch} is not after the epoch served now ({self.epoch})")
            c = self.change or self._new_change(reconfig_id)
            if c.epoch is not None and c.epoch != epoch:
                raise StateConflict(f"reconfiguration {reconfig_id!r} was prepared for epoch {c.epoch}, not {epoch}")
            stage = self.worker.stage
            held = (stage.start, stage.end)
            if old is not None and old != held:
                raise StateConflict(f"this stage serves layers {list(held)}, not {list(old)} (field 'old_layers')")
            foreign = sorted({layer for ls in pushes.values() for layer in ls} - set(range(*(old or (0, 0)))))
            if foreign:
                raise StateConflict(f"layers {foreign} to push are not computed here in the old epoch")
            fence = tuple(sorted(set(range(*new)) - set(range(*old)) if new and old else range(*(new or (0, 0)))))
            per_layer = c.blocks_per_layer or stage.cache.total_blocks / max(1, stage.end - stage.start)
            targets = {target: tuple(layers) for target, layers in pushes.items() if layers}
            t = Transition(epoch, old, new, fence)
            try:
                if targets:
                    t.collect = lambda s, seqs: self._collect(s, targets, seqs)
                    self._pushers = {a: KVPusher(a, self.worker.config.stage_id, self.token) for a in targets}
                    self.data.push = self._push
                if new is not None and downstream is not None:
                    await self.data.arm_route(epoch, downstream)
                initial = await self.worker.call(self._arm_on_worker, t, sequences, resize)
            except BaseException:
                await self._disarm()
                raise
            self._push_all(initial)
            c.phase, c.epoch, c.blocks_per_layer, c.resize = "armed", epoch, per_layer, resize
            self.change = c
            logger.info("stage %d: armed %s for epoch %d: %s → %s, fence on %s, pushing to %s",
                        self.worker.config.stage_id, reconfig_id, epoch, old, new, list(fence), list(targets))
            return await self._armed_answer(t)

    def _arm_on_worker(
        self, t: Transition, sequences: Mapping[int, int], resize: bool
    ) -> list[tuple[str, list[PlannedChunk]]]:
        """Between batches: adopt late sequences (targets), start serving both epochs, export what is dirty."""
        stage = self.worker.stage
        gone = self.worker.gone if self.worker.gone is not None else set()
        if t.fence_layers:
            late = {seq: tokens for seq, tokens in sequences.items() if seq not in gone}
            need = sum(max(0, stage.blocks_for(n) - stage.cache.reserved_for(s)) for s, n in late.items())
            self._fit(lambda: need, resize)
            try:
                for seq, tokens in late.items():
                    stage.adopt(seq, tokens)
            except KVCapacityError as exc:
                raise StateConflict(f"{exc} (resize was {'on' if resize else 'off'})") from None
        self.worker.gone = gone
        self.worker.transition = t
        self.worker.refresh_gauges()
        return t.collect(stage, ()) if t.collect is not None else []

    def _collect(self, stage: Stage, targets: Mapping[str, Sequence[int]],
                 seqs: Sequence[int]) -> list[tuple[str, list[PlannedChunk]]]:
        """On the worker: what each target is still owed for `seqs` (all live sequences when empty), marked
        sent at once (a push that fails is reported by flush; its batch then fails at the target's fence).
        Planned only: the pusher copies the blocks off the worker, so neither the arm (everything still dirty,
        tens of MB) nor the step after which a push is planned waits for the copy."""
        out = []
        for target, layers in targets.items():
            chunks = self._tracker.plan(stage, target, layers, seqs or None)
            self._tracker.mark_sent(target, chunks)
            out.append((target, chunks))
        return out

    def _push(self, target: str, chunks: list[PlannedChunk]) -> None:
        self._pushers[target].push(chunks)

    def _push_all(self, pushes: list[tuple[str, list[PlannedChunk]]]) -> None:
        for target, chunks in pushes:
            self._push(target, chunks)

    async def _armed_answer(self, t: Transition) -> dict[str, Any]:
        return {"armed": True, "epoch": t.epoch, "old_layers": t.old_range, "layers": t.new_range,
                "fence_layers": list(t.fence_layers), "push_targets": sorted(self._pushers)}  # fmt: skip

    async def flush(self, reconfig_id: str, timeout_s: float) -> dict[str, Any]:
        """Every push queued so far confirmed by its target: what was pushed, and any push that failed."""
        t = self.worker.transition
        if t is None or self.change is None or self.change.reconfig_id != reconfig_id:
            if self._done.get(reconfig_id) == "committed":
                return {"bytes": 0, "blocks": 0, "pushes": [], "errors": []}
            raise StateConflict(f"reconfiguration {reconfig_id!r} is not armed here")
        try:
            pushes = [await p.flush(timeout_s) for p in self._pushers.values()]
        except TimeoutError:
            raise StateConflict(f"pushes to {sorted(self._pushers)} not confirmed within {timeout_s}s") from None
        errors = [e for p in pushes for e in p["errors"]]
        return {"bytes": sum(p["bytes"] for p in pushes), "blocks": sum(p["blocks"] for p in pushes),
                "seconds": sum(p["seconds"] for p in pushes), "pushes": pushes, "errors": errors}  # fmt: skip

    async def retire(self, reconfig_id: str, epoch: int, live: Sequence[int]) -> dict[str, Any]:
        """Serve E+1 only (see the module docstring); `live`: the sequences running when the frontend armed.
        A repeat answers `retired: false` without acting."""
        async with self._lock:
            if self._done.get(reconfig_id) == "committed":
                return {"retired": False, "epoch": self.epoch}
            c, t = self.change, self.worker.transition
            if c is None or t is None or c.reconfig_id != reconfig_id or t.epoch != epoch:
                raise StateConflict(f"reconfiguration {reconfig_id!r} is not armed here for epoch {epoch}")
            if t.new_range is None:
                raise StateConflict("this stage leaves the pipeline with the old epoch: stop it instead of retiring")
            pushed = [p.stats() for p in self._pushers.values()]
            more = await self.worker.call(self._retire_on_worker, t, set(live), c.resize, c.blocks_per_layer)
            await resize_fully(self.worker, more, c.blocks_per_layer)
            await self._close_pushers()
            await self.data.retire_route()
            self.epoch, self.change = epoch, None
            self._done[reconfig_id] = "committed"
            self._tracker.forget()
            logger.info("stage %d: retired epoch %d for %s: layers %s, fence %s", self.worker.config.stage_id,
                        epoch - 1, reconfig_id, t.new_range, t.fence.as_json())  # fmt: skip
            return {"retired": True, "epoch": epoch, "layers": list(t.new_range), "fence": t.fence.as_json(),
                    "pushed": pushed}  # fmt: skip

    def _retire_on_worker(self, t: Transition, live: set[int], resize: bool, per_layer: float) -> bool:
        """True when the pool has more to shrink (see `resize_fully`)."""
        stage = self.worker.stage
        assert t.new_range is not None
        for seq in stage.sequences():
            if seq not in live and seq not in t.admitted:
                stage.release(seq)  # finished before the frontend armed; only the change still reserved it here
        self.worker.transition = None
        self.worker.gone = None
        stage.activate(*t.new_range)
        more = resize and resize_for(stage, per_layer)
        self.worker.refresh_gauges()
        return more

    async def _disarm(self) -> None:
        """Undo an arm (abort before the frontend armed): one epoch, one route, no pushes."""
        t = self.worker.transition
        if t is not None and t.new_batches:
            raise StateConflict(f"epoch {t.epoch} is already served here ({t.new_batches} batches): the frontend "
                                "armed, so the change can only roll forward")
        await self.worker.call(self._disarm_on_worker)
        await self._close_pushers()
        await self.data.disarm_route()

    def _disarm_on_worker(self) -> None:
        self.worker.transition = None

    async def _close_pushers(self) -> None:
        pushers, self._pushers = self._pushers, {}
        self.data.push = None
        await asyncio.gather(*(p.close() for p in pushers.values()))

    def epoch_info(self) -> dict[str, Any]:
        """On the worker, for `/info`: the armed epoch's layers, and what admission must count with while it is
        armed."""
        t, c, stage = self.worker.transition, self.change, self.worker.stage
        if t is None or t.new_range is None or c is None:
            return {"armed": None, "admission": None}
        total = stage.cache.total_blocks
        planned = planned_pool(stage, c.blocks_per_layer, t.new_range) if c.resize else total
        after = {"layers": t.new_range[1] - t.new_range[0], "blocks": planned}
        return {"armed": {"epoch": t.epoch, "layers": list(t.new_range)},
                "admission": {"layers": len(stage.loaded_layers), "blocks": total, "after": after}}  # fmt: skip
