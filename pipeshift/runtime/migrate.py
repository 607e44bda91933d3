"""Moving KV blocks between stages during live reconfiguration: what a source still owes each target
(the dirty set), how blocks travel as frames, and how a target imports them.

What to send is decided on each stage's compute worker, between micro-batches, so every chunk is a
consistent snapshot of one (sequence, layer): its block table, versions and length. The blocks' data is
copied off the worker (`PlannedChunk.load`, see `BlockCopy` for why that is safe) while serving goes on, and
sent (`stream_chunks`): by pre-copy rounds and by the pushes of an armed epoch switch alike. Imports run on
the target's worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from torch import Tensor

from pipeshift.runtime.kv import KVSpec
from pipeshift.runtime.kv.pool import BlockCopy
from pipeshift.runtime.stage import Stage
from pipeshift.runtime.transport import Frame, FrameClient, FrameError, FrameLimits, Kind, KVBlocksMeta

MIGRATE_ROLE = "migrate"
# Blocks per KV_BLOCKS frame: bounds what a target must accept (and allocate) for one frame.
MAX_FRAME_BLOCKS = 256
_HEADER_KEY = "kv"


@dataclass(frozen=True, eq=False)
class ChunkHead:
    """Logical blocks of one (sequence, layer) at their write versions, with the layer's length then and
    the tokens the sequence reserves (a target that never saw the sequence reserves as much)."""

    seq_id: int
    layer: int
    length: int
    reserve: int
    logical: tuple[int, ...]
    versions: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class KVChunk(ChunkHead):
    """A chunk with its blocks' data, `[len(logical), 2, block_size, kv_heads, head_dim]`."""

    data: Tensor

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def frames(self) -> tuple[Frame, Frame]:
        """A CONTROL header (length, reserve: what KVBlocksMeta has no room for), then the blocks."""
        header = Frame.message(Kind.CONTROL, {_HEADER_KEY: {"length": self.length, "reserve": self.reserve}})
        meta = KVBlocksMeta(self.seq_id, self.layer, self.logical, self.versions)
        return header, Frame.kv_blocks(self.data.contiguous(), meta)


@dataclass(frozen=True, eq=False)
class PlannedChunk(ChunkHead):
    """A chunk whose head was taken on the worker and whose data is still in the pool: `load()` copies it, on
    any thread."""

    where: BlockCopy
    nbytes: int

    def load(self) -> KVChunk:
        return KVChunk(self.seq_id, self.layer, self.length, self.reserve, self.logical, self.versions,
                       self.where.copy())


async def stream_chunks(client: FrameClient, chunks: Sequence[PlannedChunk], rate: float | None = None) -> None:
    """Copy each chunk's blocks on a helper thread (the next one while this one is sent) and send them, then
    ask the target to confirm (CONTROL `{flush: n}`; the caller reads the answer). With `rate` (bytes/s), a
    chunk is sent only once the ones before it have taken the time that rate gives them."""
    loop = asyncio.get_running_loop()
    started, sent = time.perf_counter(), 0
    loading = loop.run_in_executor(None, chunks[0].load) if chunks else None
    for i in range(len(chunks)):
        assert loading is not None
        chunk = await loading
        if rate is not None and (ahead := sent / rate - (time.perf_counter() - started)) > 0:
            await asyncio.sleep(ahead)
        sent += chunk.nbytes
        if i + 1 < len(chunks):
            loading = loop.run_in_executor(None, chunks[i + 1].load)
        for frame in chunk.frames():
            await client.send(frame)
    await client.send(Frame.message(Kind.CONTROL, {"flush": len(chunks)}))


def migration_limits(spec: KVSpec) -> tuple[FrameLimits, FrameLimits]:
    """What a target accepts on a migration connection: its own block geometry, dtype and frame cap."""
    shape = (2, spec.block_size, spec.num_kv_heads, spec.head_dim)
    return (
        FrameLimits.for_kv_blocks(block_shape=shape, dtypes=[spec.dtype], max_blocks=MAX_FRAME_BLOCKS),
        FrameLimits.messages(Kind.CONTROL, Kind.CLOSE),
    )


def chunk_header(frame: Frame) -> tuple[int, int] | None:
    """`(length, reserve)` of a chunk header frame; None for any other CONTROL message."""
    body = frame.body().get(_HEADER_KEY)
    if body is None:
        return None
    if not isinstance(body, dict) or set(body) != {"length", "reserve"}:
        raise FrameError(f"a KV chunk header needs exactly 'length' and 'reserve', got {body!r}")
    length, reserve = body["length"], body["reserve"]
    for name, value in (("length", length), ("reserve", reserve)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
            raise FrameError(f"KV chunk header {name} must be an integer in 0..2^32-1, got {value!r}")
    return length, reserve


def chunk_from(header: tuple[int, int] | None, frame: Frame) -> KVChunk:
    if header is None:
        raise FrameError("a KV_BLOCKS frame must follow its chunk header (CONTROL {kv: {length, reserve}})")
    meta = frame.kv_meta()
    assert frame.tensor is not None
    return KVChunk(meta.seq_id, meta.layer, header[0], header[1], meta.block_indices, meta.versions, frame.tensor)


def import_chunk(stage: Stage, chunk: KVChunk, receivable: Collection[int], gone: Collection[int] = ()) -> int:
    """Place a chunk's blocks into `stage` (reserving for the sequence if needed); returns the blocks accepted.

    Imports only move forward: a block is written only if it is newer than the one held, and the length
    only grows (KV positions are written once, so a newer snapshot never contradicts an older one). A
    chunk for a sequence in `gone` (released here since the change began) is accepted and dropped, so a
    delta that loses the race with its sequence's release cannot bring the sequence back as a leak.
    """
    if chunk.layer not in receivable:
        raise ValueError(
            f"layer {chunk.layer} is not one this stage receives KV for; it receives {sorted(receivable)}"
        )
    if chunk.seq_id in gone:
        return len(chunk.logical)
    stage.adopt(chunk.seq_id, chunk.reserve)
    cache = stage.cache
    table, held = cache.block_table(chunk.seq_id, chunk.layer), cache.versions(chunk.seq_id, chunk.layer)
    keep = [i for i, lb in enumerate(chunk.logical)
            if lb >= len(table) or table[lb] < 0 or held[lb] < chunk.versions[i]]  # fmt: skip
    length = max(chunk.length, cache.length(chunk.seq_id, chunk.layer))
    data = chunk.data if len(keep) == len(chunk.logical) else chunk.data[keep]
    cache.import_blocks(
        chunk.seq_id, chunk.layer, [chunk.logical[i] for i in keep], data, [chunk.versions[i] for i in keep], length
    )
    return len(chunk.logical)


class DirtyTracker:
    """The last version sent per (sequence, layer, logical block), per target.

    A block is dirty for a target when it was never sent there or was written since: the cache stamps
    each write with a cache-wide clock, so any change of version means new content.
    """

    def __init__(self) -> None:
        self._sent: dict[str, dict[tuple[int, int], dict[int, int]]] = {}

    def dirty(self, stage: Stage, target: str, layers: Iterable[int],
              only: Collection[int] | None = None) -> dict[tuple[int, int], list[int]]:
        """Dirty logical blocks per (sequence, layer) of live sequences (of those in `only`, if given);
        forgets released sequences."""
        cache = stage.cache
        live = set(cache.sequences())
        sent = self._sent.setdefault(target, {})
        for key in [k for k in sent if k[0] not in live]:
            del sent[key]
        out: dict[tuple[int, int], list[int]] = {}
        layers = list(layers)
        for seq in sorted(live if only is None else live & set(only)):
            for layer in layers:
                known = sent.get((seq, layer), {})
                table = cache.block_table(seq, layer)
                versions = cache.versions(seq, layer)
                blocks = [lb for lb, (p, v) in enumerate(zip(table, versions, strict=True))
                          if p >= 0 and known.get(lb) != v]  # fmt: skip
                if blocks:
                    out[seq, layer] = blocks
        return out

    def plan(self, stage: Stage, target: str, layers: Iterable[int],
             only: Collection[int] | None = None) -> list[PlannedChunk]:
        """Every dirty block (of the sequences in `only`, if given), at most `MAX_FRAME_BLOCKS` per chunk, to be
        copied off the worker (`PlannedChunk.load`)."""
        chunks = []
        for (seq, layer), blocks in self.dirty(stage, target, layers, only).items():
            length = stage.cache.length(seq, layer)
            for i in range(0, len(blocks), MAX_FRAME_BLOCKS):
                part = blocks[i : i + MAX_FRAME_BLOCKS]
                where, versions = stage.cache.locate_blocks(seq, layer, part)
                assert where is not None
                chunks.append(PlannedChunk(seq, layer, length, stage.reserved_tokens(seq), tuple(part),
                                           tuple(versions), where, len(part) * stage.spec.bytes_per_block))
        return chunks

    def mark_sent(self, target: str, chunks: Iterable[ChunkHead]) -> None:
        """Called once the target confirmed the import, so a failed round leaves its blocks dirty."""
        sent = self._sent.setdefault(target, {})
        for chunk in chunks:
            sent.setdefault((chunk.seq_id, chunk.layer), {}).update(zip(chunk.logical, chunk.versions, strict=True))

    def sent_then_remaining(self, stage: Stage, target: str, layers: Sequence[int],
                            chunks: Iterable[ChunkHead]) -> tuple[int, int]:
        """`mark_sent`, then `remaining`: one hop to the worker at the end of a round instead of two."""
        self.mark_sent(target, chunks)
        return self.remaining(stage, target, layers)

    def remaining(self, stage: Stage, target: str, layers: Iterable[int]) -> tuple[int, int]:
        """Dirty blocks and bytes still owed to `target`: what the stop rule weighs against the link."""
        blocks = sum(len(b) for b in self.dirty(stage, target, layers).values())
        return blocks, blocks * stage.spec.bytes_per_block

    def forget(self) -> None:
        self._sent.clear()


def frame_bytes(chunks: Iterable[KVChunk | PlannedChunk]) -> int:
    return sum(c.nbytes for c in chunks)


def blocks_in(chunks: Iterable[ChunkHead]) -> int:
    return sum(len(c.logical) for c in chunks)

