"""The agent's side of live reconfiguration: prepare, pre-copy rounds, commit and abort of one change.

State changes run on the compute worker between micro-batches; calls are serialised by a lock, and a
repeated call for the reconfiguration already done answers again instead of acting twice.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeshift.errors import UserError
from pipeshift.runtime.agent.dataplane import DataPlane
from pipeshift.runtime.agent.downstream import parse_address
from pipeshift.runtime.agent.epoch import EpochSwitching, resize_for, resize_fully
from pipeshift.runtime.agent.pusher import KVPusher
from pipeshift.runtime.agent.weights import source_reader
from pipeshift.runtime.agent.worker import StageWorker, StateConflict
from pipeshift.runtime.kv import KVCapacityError
from pipeshift.runtime.migrate import (
    MIGRATE_ROLE,
    DirtyTracker,
    KVChunk,
    PlannedChunk,
    blocks_in,
    frame_bytes,
    import_chunk,
    stream_chunks,
)
from pipeshift.runtime.stage import Stage, TensorReader
from pipeshift.runtime.transport import FrameClient, FrameError, FrameLimits, Kind, PeerClosed

logger = logging.getLogger(__name__)

PRECOPY_TIMEOUT_S = 120.0


@dataclass
class _Change:
    """The reconfiguration in progress here: its id, the epoch it will adopt and what prepare did."""

    reconfig_id: str
    phase: str  # "prepared" (weights loaded, KV reserved) or "precopy" (a source that only sends)
    epoch: int | None = None
    layers: tuple[int, int] | None = None
    grown_blocks: int = 0
    blocks_per_layer: float = 0.0
    resize: bool = True
    # Layers KV may be imported into: the prepared ones (and, on a stage that never served, all it holds).
    receivable: frozenset[int] = frozenset()


class Reconfigurer(EpochSwitching):
    """One agent's reconfiguration state; `epoch` is the layout epoch the stage serves. The drain switch
    commits here; the epoch switch arms, flushes and retires (see `epoch`)."""

    def __init__(self, worker: StageWorker, data: DataPlane, token: str | None) -> None:
        self.worker = worker
        self.data = data
        self.token = token
        self.epoch = 0
        self.change: _Change | None = None
        self._done: dict[str, str] = {}  # reconfig id -> "committed" | "aborted"
        self._tracker = DirtyTracker()
        self._lock = asyncio.Lock()
        self._pushers: dict[str, KVPusher] = {}
        data.kv_import = self._import

    def describe(self) -> dict[str, Any] | None:
        c = self.change
        return None if c is None else {"id": c.reconfig_id, "phase": c.phase, "epoch": c.epoch}

    # ---- prepare ---------------------------------------------------------------------------------

    async def prepare(
        self, reconfig_id: str, epoch: int, layers: tuple[int, int], sequences: Mapping[int, int], resize: bool,
        weight_sources: Mapping[int, str] | None = None,
    ) -> dict[str, Any]:
        """`weight_sources` (layer → control URL of the stage computing it): stream the incoming layers' weights
        from there instead of reading the checkpoint."""
        async with self._lock:
            self._check_open(reconfig_id)
            if epoch <= self.epoch:
                raise StateConflict(f"epoch {epoch} is not after the epoch served now ({self.epoch})")
            c = self.change
            if c is not None and c.phase == "prepared" and (c.epoch, c.layers) != (epoch, layers):
                raise StateConflict(
                    f"reconfiguration {reconfig_id!r} was prepared for epoch {c.epoch} layers "
                    f"{list(c.layers or ())}; abort it to prepare epoch {epoch} layers {list(layers)}"
                )
            fresh = c is None or c.phase != "prepared"
            stage = self.worker.stage
            per_layer = stage.cache.total_blocks / max(1, stage.end - stage.start)
            read = None if weight_sources is None else await source_reader(
                self.worker, layers, weight_sources, self.token)  # fmt: skip
            loaded, grown = await self.worker.call(self._prepare_on_worker, layers, sequences, resize, read)
            if fresh:
                self.change = _Change(reconfig_id, "prepared", epoch, layers, grown, per_layer)
            else:
                assert c is not None
                c.grown_blocks += grown
            assert self.change is not None
            self.change.resize = resize
            self.change.receivable = await self.worker.call(self._receivable)
            logger.info("stage %d: prepared %s for epoch %d (layers %s)", self.worker.config.stage_id,
                        reconfig_id, epoch, layers)  # fmt: skip
            return {"loaded": loaded, "kv": self.worker.info()["kv"], "grown_blocks": grown}

    def _prepare_on_worker(
        self, layers: tuple[int, int], sequences: Mapping[int, int], resize: bool, read: TensorReader | None = None
    ) -> tuple[list[int], int]:
        stage = self.worker.stage
        self.worker.check_range(*layers)
        before = stage.cache.total_blocks
        try:
            if stage.memory is None:
                self._fit(lambda: _prepare_need(stage, layers, sequences), resize)
            else:
                self._make_room(layers, _prepare_need(stage, layers, sequences), resize)
            loaded = stage.prepare(*layers, read=read)
            for seq, tokens in sequences.items():
                stage.adopt(seq, tokens)
            if sequences and self.worker.stats.batches == 0:  # joins the pipeline: its first steps read them all
                # Every sequence padded to the widest reservation, but never more than one layer's share of the
                # pool: reservations are prompt + max_tokens, which a large max_tokens makes far wider than
                # anything read soon; a gather that outgrows it grows the workspaces as before.
                widest = max(stage.spec.blocks_for(tokens, 1) for tokens in sequences.values())
                share = stage.cache.total_blocks // max(1, len(stage.loaded_layers))
                stage.cache.prefault_reads(min(len(sequences) * widest, share))
        except KVCapacityError as exc:
            stage.discard_prepared()
            self._restore_pool(before)
            raise StateConflict(f"{exc} (resize was {'on' if resize else 'off'})") from None
        except ValueError as exc:
            self._restore_pool(before)
            raise StateConflict(str(exc)) from None
        except UserError as exc:  # the checkpoint lacks or garbles an incoming layer's tensors: say which
            self._restore_pool(before)
            raise StateConflict(f"cannot load layers [{layers[0]}, {layers[1]}): {exc}") from None
        self.worker.refresh_gauges()
        return loaded, stage.cache.total_blocks - before

    def _make_room(self, layers: tuple[int, int], need: int, resize: bool) -> None:
        """With a memory budget, before loading `layers`: the weights of every layer held or prepared must fit
        beside the pool. With `resize` the pool becomes what fits beside them (shrinking gives up free blocks
        only), and must still hold what is reserved plus `need` more blocks; without, the pool stays and the
        weights must fit next to it. StateConflict (nothing changed) names the figures when they do not."""
        stage = self.worker.stage
        cache, memory = stage.cache, stage.memory
        assert memory is not None
        loaded = stage.loaded_layers
        lo, hi = min(loaded[0], layers[0]), max(loaded[-1] + 1, layers[1])
        weights = stage.planned_weight_bytes(lo, hi)
        where = (f"stage {self.worker.config.stage_id} holding layers [{lo}, {hi}) after loading "
                 f"[{layers[0]}, {layers[1]})")
        if not resize:
            if not memory.fits(weights, cache.total_blocks):
                raise StateConflict(
                    f"{where} does not fit in memory without resizing the pool: weights {weights} bytes + the pool's "
                    f"{cache.total_blocks} blocks of {memory.block_bytes} bytes exceed memory {memory.memory_bytes} "
                    f"bytes ({memory.describe(weights)})")
            return
        room = memory.pool_blocks(weights)
        wanted = cache.reserved_blocks + need
        if wanted > room:
            raise StateConflict(
                f"{where} cannot shrink its KV pool to make room for the weights: {memory.describe(weights)}, but "
                f"{cache.reserved_blocks} blocks are reserved and live sequences need {need} more")
        if cache.total_blocks > room:
            cache.shrink(cache.total_blocks - room)
        elif wanted > cache.total_blocks:
            cache.grow(wanted - cache.total_blocks)

    def _restore_pool(self, blocks: int) -> None:
        """After a failed prepare: give back the slabs `_make_room` took (grown slabs are left to abort)."""
        cache = self.worker.stage.cache
        if cache.total_blocks < blocks:
            cache.grow(blocks - cache.total_blocks)

    def _receivable(self) -> frozenset[int]:
        """On the worker, after prepare: the layers KV may arrive for; releases are tracked from now on."""
        if self.worker.gone is None:
            self.worker.gone = set()
        stage = self.worker.stage
        return frozenset(stage.inactive) | (frozenset(stage.layers) if self.worker.stats.batches == 0 else frozenset())

    def _new_change(self, reconfig_id: str) -> _Change:
        return _Change(reconfig_id, "armed")

    def _fit(self, need: Callable[[], int], resize: bool) -> None:
        """Grow the pool so `need()` more blocks can be reserved, when resizing is allowed; with a memory budget
        never past what fits beside the weights loaded (the reservation then fails, naming the figures)."""
        stage = self.worker.stage
        cache = stage.cache
        short = need() - (cache.total_blocks - cache.reserved_blocks)
        if short > 0 and resize and stage.memory is not None:
            short = min(short, stage.memory.pool_blocks(stage.weight_bytes()) - cache.total_blocks)
        if short > 0 and resize:
            cache.grow(short)

    # ---- pre-copy --------------------------------------------------------------------------------

    async def precopy(self, reconfig_id: str, target: str, layers: Sequence[int],
                      max_bytes_per_s: float | None = None) -> dict[str, Any]:
        """One round to `target`: every block of `layers` written since the last round it confirmed, sent at
        `max_bytes_per_s` at most (None: as fast as it goes)."""
        async with self._lock:
            self._check_open(reconfig_id)
            host, port = parse_address(target)
            held = range(self.worker.stage.start, self.worker.stage.end)
            foreign = [layer for layer in layers if layer not in held]
            if foreign or not layers:
                raise StateConflict(
                    f"layers {list(layers)} must be a non-empty list of layers this stage serves, "
                    f"[{held.start}, {held.stop}); not held: {foreign}"
                )
            if self.change is None:
                self.change = _Change(reconfig_id, "precopy")
            started = time.perf_counter()
            # Only the plan (tables, versions, lengths) is taken on the worker; the blocks are copied off it.
            chunks = await self.worker.call(self._tracker.plan, self.worker.stage, target, layers)
            if chunks:
                await self._send(host, port, chunks, max_bytes_per_s)
            seconds = time.perf_counter() - started
            remaining, remaining_bytes = await self.worker.call(
                self._tracker.sent_then_remaining, self.worker.stage, target, list(layers), chunks
            )
            return {
                "blocks": blocks_in(chunks),
                "bytes": frame_bytes(chunks),
                "seconds": seconds,
                "sequences": len({c.seq_id for c in chunks}),
                "dirty_blocks_remaining": remaining,
                "dirty_bytes_remaining": remaining_bytes,
            }

    async def _send(self, host: str, port: int, chunks: Sequence[PlannedChunk], rate: float | None) -> None:
        """Stream the chunks (`stream_chunks`, at `rate` bytes/s at most) and check that the target imported
        all of them."""
        try:
            client = await FrameClient.connect(
                host, port, role=MIGRATE_ROLE, stage_id=self.worker.config.stage_id, token=self.token,
                replies=FrameLimits.messages(Kind.CONTROL),
            )  # fmt: skip
        except (OSError, TimeoutError, FrameError) as exc:
            raise StateConflict(f"cannot reach target {host}:{port} for pre-copy: {exc}") from None
        try:
            await stream_chunks(client, chunks, rate)
            reply = (await asyncio.wait_for(client.recv(), PRECOPY_TIMEOUT_S)).body()
        except (OSError, TimeoutError, FrameError, PeerClosed) as exc:
            raise StateConflict(f"pre-copy to {host}:{port} failed: {exc}") from None
        finally:
            await client.close()
        if "error" in reply or reply.get("imported") != blocks_in(chunks):
            raise StateConflict(f"target {host}:{port} did not import the round: {reply.get('error', reply)}")

    def _import(self, chunk: KVChunk) -> int:
        """Worker side of a migration connection: only a prepared stage receives, into layers it will add
        (or any of its layers if it had never served when prepared: a stage that joins the pipeline), also
        once armed, when final deltas arrive while it already serves the new epoch."""
        c = self.change
        if c is None or not c.receivable:
            raise StateConflict("this stage is not prepared for a reconfiguration; call /reconfig/prepare first")
        stage = self.worker.stage
        gone = self.worker.gone or set()
        if chunk.seq_id not in gone and chunk.seq_id not in stage.sequences():
            self._fit(lambda: stage.blocks_for(chunk.reserve), c.resize)
        try:
            return import_chunk(stage, chunk, c.receivable, gone)
        finally:
            self.worker.refresh_gauges()

    # ---- commit and abort ------------------------------------------------------------------------

    async def commit(
        self,
        reconfig_id: str,
        epoch: int,
        layers: tuple[int, int],
        downstream: str,
        sequences: Sequence[int],
        resize: bool,
    ) -> bool:
        """False when this reconfiguration was already committed (a retry): nothing is done again."""
        parse_address(downstream)
        async with self._lock:
            if self._done.get(reconfig_id) == "committed":
                return False
            self._check_open(reconfig_id)
            c = self.change
            if c is not None and c.epoch is not None and c.epoch != epoch:
                raise StateConflict(f"reconfiguration {reconfig_id!r} was prepared for epoch {c.epoch}, not {epoch}")
            if epoch <= self.epoch:
                raise StateConflict(f"epoch {epoch} is not after the epoch served now ({self.epoch})")
            stage = self.worker.stage
            per_layer = c.blocks_per_layer if c is not None and c.blocks_per_layer else (
                stage.cache.total_blocks / max(1, stage.end - stage.start))  # fmt: skip
            more = await self.worker.call(self._commit_on_worker, layers, set(sequences), resize, per_layer)
            await resize_fully(self.worker, more, per_layer)
            await self.data.downstream.route(downstream)
            self.epoch = epoch
            self.change = None
            self._done[reconfig_id] = "committed"
            self._tracker.forget()
            logger.info("stage %d: committed %s, epoch %d, layers %s", self.worker.config.stage_id,
                        reconfig_id, epoch, layers)  # fmt: skip
            return True

    def _commit_on_worker(self, layers: tuple[int, int], live: set[int], resize: bool, per_layer: float) -> bool:
        """True when the pool has more to shrink (see `resize_fully`)."""
        stage = self.worker.stage
        self.worker.check_range(*layers)
        missing = [i for i in range(*layers) if i not in stage.layers and i not in stage.inactive]
        if missing:
            raise StateConflict(f"layers {missing} of [{layers[0]}, {layers[1]}) are not loaded; prepare them first")
        gaps = _uneven(stage, layers, live)
        if gaps:
            raise StateConflict(
                "KV is incomplete for the new range (run a final pre-copy after the drain): " + "; ".join(gaps[:5])
            )
        for seq in stage.sequences():
            if seq not in live:
                stage.release(seq)
        stage.activate(*layers)
        self.worker.gone = None
        more = resize and resize_for(stage, per_layer)
        self.worker.refresh_gauges()
        return more

    async def abort(self, reconfig_id: str) -> list[int]:
        """Layers whose prepared weights were dropped; a repeated abort answers [] and does nothing."""
        async with self._lock:
            done = self._done.get(reconfig_id)
            if done == "committed":
                raise StateConflict(f"reconfiguration {reconfig_id!r} is committed; it can only roll forward")
            c = self.change
            if c is not None and c.reconfig_id != reconfig_id:
                raise StateConflict(f"reconfiguration {c.reconfig_id!r} is in progress, not {reconfig_id!r}")
            if c is None:
                return []
            await self._disarm()
            dropped = await self.worker.call(self._abort_on_worker, c.grown_blocks)
            self.change = None
            self._done[reconfig_id] = "aborted"
            self._tracker.forget()
            logger.info("stage %d: aborted %s", self.worker.config.stage_id, reconfig_id)
            return dropped

    def _abort_on_worker(self, grown: int) -> list[int]:
        stage = self.worker.stage
        self.worker.gone = None
        dropped = stage.discard_prepared()
        cache = stage.cache
        spare = cache.total_blocks - cache.reserved_blocks
        if grown > 0 and spare:
            cache.shrink(min(grown, spare))
        elif grown < 0:  # prepare shrank the pool for weights that are gone again
            cache.grow(-grown)
        self.worker.refresh_gauges()
        return dropped

    def _check_open(self, reconfig_id: str) -> None:
        if reconfig_id in self._done:
            raise StateConflict(f"reconfiguration {reconfig_id!r} is already {self._done[reconfig_id]}")
        c = self.change
        if c is not None and c.reconfig_id != reconfig_id:
            raise StateConflict(f"reconfiguration {c.reconfig_id!r} is in progress, not {reconfig_id!r}")


def _prepare_need(stage: Stage, layers: tuple[int, int], sequences: Mapping[int, int]) -> int:
    """Blocks that reserving every sequence (live here or listed) over held plus incoming layers adds."""
    count = len(set(stage.loaded_layers) | set(range(*layers)))
    tokens = {seq: stage.reserved_tokens(seq) for seq in stage.sequences()}
    for seq, t in sequences.items():
        tokens[seq] = max(t, tokens.get(seq, 0))
    return sum(max(0, stage.spec.blocks_for(t, count) - stage.cache.reserved_for(seq)) for seq, t in tokens.items())


def _uneven(stage: Stage, layers: tuple[int, int], live: set[int]) -> list[str]:
    """Live sequences whose KV length differs between layers of the new range, or has unfilled blocks."""
    problems = []
    bs = stage.spec.block_size
    for seq in sorted(live & set(stage.sequences())):
        lengths = {layer: stage.cache.length(seq, layer) for layer in range(*layers)}
        holes = [
            layer for layer, n in lengths.items() if -1 in stage.cache.block_table(seq, layer)[: math.ceil(n / bs)]
        ]
        if len(set(lengths.values())) > 1 or holes:
            problems.append(f"sequence {seq} has lengths {lengths} (unfilled blocks in layers {holes})")
    return problems
