"""The paged KV cache of one pipeline stage: one pool of physical blocks that belongs to no layer.

Block tables map (sequence, layer, logical block) to a physical block, so a stage that gains or loses
layers only edits tables; the pool grows by appending slabs and shrinks by compacting tail slabs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pipeshift.runtime.kv.pool import BlockCopy, BlockPool
from pipeshift.runtime.kv.span import SeqSpan
from pipeshift.runtime.kv.spec import KVCapacityError, KVSpec

# A logical block with no physical block behind it: import may place blocks out of order.
_HOLE = -1


@dataclass
class _LayerBlocks:
    """One (sequence, layer): physical block and write version per logical block, and its length."""

    table: list[int] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    length: int = 0


@dataclass
class _SeqState:
    """Accounting is per sequence, not per layer: the scheduler reserves for all of a stage's layers."""

    reserved: int = 0
    allocated: int = 0
    layers: dict[int, _LayerBlocks] = field(default_factory=dict)


class PagedKVCache:
    """Capacity is promised by reservations (`reserve`) and writes draw on the writer's reservation, so
    a sequence that was admitted never fails half-way through a step because another one grew.

    `num_blocks` is rounded up to whole slabs of `slab_blocks`.
    """

    def __init__(self, spec: KVSpec, num_blocks: int, slab_blocks: int = 64) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.spec = spec
        self.slab_blocks = slab_blocks
        self._pool = BlockPool(spec, slab_blocks)
        self._seqs: dict[int, _SeqState] = {}
        self._reserved_total = 0
        self._used = 0
        self._clock = 0
        self.grow(num_blocks)

    @property
    def total_blocks(self) -> int:
        return self._pool.total_blocks

    @property
    def used_blocks(self) -> int:
        return self._used

    @property
    def reserved_blocks(self) -> int:
        return self._reserved_total

    @property
    def free_blocks(self) -> int:
        return self.total_blocks - self._used

    def reserved_for(self, seq_id: int) -> int:
        state = self._seqs.get(seq_id)
        return state.reserved if state else 0

    def allocated_for(self, seq_id: int) -> int:
        state = self._seqs.get(seq_id)
        return state.allocated if state else 0

    def can_reserve(self, blocks: int) -> bool:
        return self._reserved_total + blocks <= self.total_blocks

    def reserve(self, seq_id: int, blocks: int) -> None:
        """Add `blocks` to the sequence's reservation."""
        if blocks < 0:
            raise ValueError(f"reserve needs blocks >= 0, got {blocks} for sequence {seq_id}")
        if not self.can_reserve(blocks):
            raise KVCapacityError(
                f"cannot reserve {blocks} blocks for sequence {seq_id}: {self._reserved_total} of "
                f"{self.total_blocks} blocks are already reserved, so at most "
                f"{self.total_blocks - self._reserved_total} more can be"
            )
        self._seqs.setdefault(seq_id, _SeqState()).reserved += blocks
        self._reserved_total += blocks

    def unreserve(self, seq_id: int, blocks: int) -> None:
        """Lower the sequence's reservation, never below what it has allocated."""
        state = self._seqs.get(seq_id)
        reserved = state.reserved if state else 0
        allocated = state.allocated if state else 0
        if blocks < 0 or reserved - blocks < allocated:
            raise ValueError(
                f"cannot unreserve {blocks} blocks of sequence {seq_id}: it reserves {reserved} and has "
                f"{allocated} allocated, so between 0 and {reserved - allocated} can be unreserved"
            )
        if state is not None:
            state.reserved -= blocks
            self._reserved_total -= blocks

    def release(self, seq_id: int) -> None:
        """Free all of the sequence's blocks (every layer) and its reservation; a no-op if unknown."""
        state = self._seqs.pop(seq_id, None)
        if state is None:
            return
        for blocks in state.layers.values():
            self._free_table(blocks.table)
        self._used -= state.allocated
        self._reserved_total -= state.reserved

    def drop_layer(self, layer: int) -> int:
        """Free every sequence's blocks of `layer` (it left this stage); reservations stay as they are."""
        freed = 0
        for state in self._seqs.values():
            blocks = state.layers.pop(layer, None)
            if blocks is not None:
                count = self._free_table(blocks.table)
                state.allocated -= count
                freed += count
        self._used -= freed
        return freed

    def stats(self) -> dict[str, int]:
        per_block = self.spec.bytes_per_block
        return {
            "total_blocks": self.total_blocks,
            "used_blocks": self.used_blocks,
            "reserved_blocks": self.reserved_blocks,
            "free_blocks": self.free_blocks,
            "bytes_per_block": per_block,
            "total_bytes": self.total_blocks * per_block,
            "used_bytes": self.used_blocks * per_block,
            "workspace_bytes": self._pool.workspace_bytes,
        }

    def sequences(self) -> list[int]:
        return sorted(self._seqs)

    def layers_of(self, seq_id: int) -> list[int]:
        state = self._seqs.get(seq_id)
        return sorted(state.layers) if state else []

    def length(self, seq_id: int, layer: int) -> int:
        blocks = self._blocks(seq_id, layer)
        return blocks.length if blocks else 0

    def block_table(self, seq_id: int, layer: int) -> list[int]:
        """Physical block per logical block (-1 where an import has not filled it yet), for inspection."""
        blocks = self._blocks(seq_id, layer)
        return list(blocks.table) if blocks else []

    def versions(self, seq_id: int, layer: int) -> list[int]:
        """Write version per logical block: values of a cache-wide clock, so "changed since" is `>`."""
        blocks = self._blocks(seq_id, layer)
        return list(blocks.versions) if blocks else []

    def write(self, seq_id: int, layer: int, start: int, k: Tensor, v: Tensor) -> None:
        """Write positions `start .. start + len(k) - 1` of (seq, layer); `start` may not pass the length."""
        if k.shape[0] == 0:
            self._check_kv(k, v, 0)
            return
        self.write_spans(layer, [SeqSpan(seq_id, start, k.shape[0])], k, v)

    def write_spans(self, layer: int, spans: Sequence[SeqSpan], k: Tensor, v: Tensor) -> None:
        """Write a batch in one go: `k`, `v` are `[sum(n), kv_heads, head_dim]`, the spans' tokens in order.

        All or nothing: every span is checked against its sequence's reservation before any block is taken.
        """
        self._check_kv(k, v, sum(span.n for span in spans))
        if not spans:
            return
        if len({span.seq_id for span in spans}) != len(spans):
            raise ValueError(f"write_spans got a sequence more than once in {list(spans)}")
        plans = [self._plan_write(layer, span) for span in spans]
        self._clock += 1
        bs = self.spec.block_size
        rows: list[int] = []
        for span, blocks, missing in plans:
            if missing:
                self._seqs[span.seq_id].layers[layer] = blocks
                self._place(blocks, missing, self._allocate(span.seq_id, len(missing)))
            end = span.start + span.n
            first, last = span.start // bs, (end - 1) // bs
            blocks.versions[first : last + 1] = [self._clock] * (last - first + 1)
            blocks.length = max(blocks.length, end)
            if span.n == 1:  # decode: most spans, worth skipping the general path's loop
                rows.append(blocks.table[first] * bs + span.start % bs)
            else:
                rows += _token_rows(blocks.table, span.start, end, bs)
        self._pool.write_rows(rows, k, v)

    def read(self, seq_id: int, layer: int, length: int | None = None) -> tuple[Tensor, Tensor]:
        """Contiguous K and V of positions `0 .. length - 1`, each `[length, kv_heads, head_dim]` (copies)."""
        if length is None:
            length = self.length(seq_id, layer)
        k, v = self.read_batch(layer, [(seq_id, length)])
        return k[0, :length], v[0, :length]

    def read_batch(
        self, layer: int, seq_lengths: Sequence[tuple[int, int]], scratch: bool = False
    ) -> tuple[Tensor, Tensor]:
        """K and V of several sequences in one gather, each `[B, P, kv_heads, head_dim]`.

        P is the longest request rounded up to whole blocks; rows past a sequence's own length hold
        finite filler (another of its blocks), which attention must mask. With `scratch`, the result
        lives in buffers that the next scratch read overwrites (see `BlockPool.read`).
        """
        tables = [self._readable(seq_id, layer, length) for seq_id, length in seq_lengths]
        width = max(map(len, tables), default=0)
        ids: list[int] = []
        for table in tables:
            ids += table
            ids += [table[0] if table else 0] * (width - len(table))
        shape = (len(seq_lengths), width * self.spec.block_size, self.spec.num_kv_heads, self.spec.head_dim)
        if not ids:
            empty = torch.empty(shape, dtype=self.spec.dtype, device=self.spec.device)
            return empty, empty.clone()
        k, v = self._pool.read(ids, scratch)
        return k.view(shape), v.view(shape)

    def prefault_reads(self, blocks: int) -> None:
        """Size and touch the read workspaces for a gather of `blocks` blocks now (see `BlockPool.prefault`)."""
        self._pool.prefault(blocks)

    def export_blocks(self, seq_id: int, layer: int, logical: list[int]) -> tuple[Tensor, list[int]]:
        """Copies of the given logical blocks, `[len(logical), 2, block_size, kv_heads, head_dim]`, and versions."""
        where, versions = self.locate_blocks(seq_id, layer, logical)
        if where is None:
            return torch.empty((0, *self._pool.block_shape()), dtype=self.spec.dtype, device=self.spec.device), []
        return where.copy(), versions

    def locate_blocks(self, seq_id: int, layer: int, logical: list[int]) -> tuple[BlockCopy | None, list[int]]:
        """Where the given logical blocks lie (None for no blocks) and their versions now: `export_blocks`
        without the copy, which the caller may make on another thread (see `BlockCopy`)."""
        blocks = self._blocks(seq_id, layer)
        table = blocks.table if blocks else []
        absent = [lb for lb in logical if not 0 <= lb < len(table) or table[lb] == _HOLE]
        if absent:
            raise ValueError(
                f"cannot export logical blocks {absent} of sequence {seq_id} layer {layer}: it has "
                f"{len(table)} logical blocks (holes: {[i for i, p in enumerate(table) if p == _HOLE]})"
            )
        if not logical:
            return None, []
        assert blocks is not None
        return self._pool.locate([table[lb] for lb in logical]), [blocks.versions[lb] for lb in logical]

    def import_blocks(
        self,
        seq_id: int,
        layer: int,
        logical: list[int],
        data: Tensor,
        versions: list[int],
        length: int,
    ) -> None:
        """Place logical blocks (allocating against the sequence's reservation), their versions and the length.

        Blocks may arrive in any order; a logical block not yet imported is a hole that `read` refuses.
        """
        if tuple(data.shape) != (len(logical), *self._pool.block_shape()):
            raise ValueError(
                f"import data for {len(logical)} blocks must be {[len(logical), *self._pool.block_shape()]}, "
                f"got {list(data.shape)}"
            )
        if len(versions) != len(logical):
            raise ValueError(f"import got {len(logical)} logical blocks but {len(versions)} versions")
        if len(set(logical)) != len(logical) or any(lb < 0 for lb in logical):
            raise ValueError(f"import needs distinct logical block indices >= 0, got {logical}")
        if seq_id not in self._seqs:
            raise KVCapacityError(f"sequence {seq_id} has no reservation in this cache; reserve before importing")
        blocks = self._blocks(seq_id, layer)
        table = blocks.table if blocks else []
        slots = max(len(table), max(logical, default=-1) + 1)
        if not 0 <= length <= slots * self.spec.block_size:
            raise ValueError(
                f"import length {length} for sequence {seq_id} layer {layer} must be between 0 and "
                f"{slots * self.spec.block_size} ({slots} logical blocks of {self.spec.block_size})"
            )
        missing = [lb for lb in logical if lb >= len(table) or table[lb] == _HOLE]
        self._check_reservation(seq_id, layer, len(missing))

        blocks = self._seqs[seq_id].layers.setdefault(layer, _LayerBlocks())
        self._place(blocks, missing, self._allocate(seq_id, len(missing)))
        for lb, version in zip(logical, versions, strict=True):
            blocks.versions[lb] = version
        blocks.length = length
        self._clock = max(self._clock, *versions, 0)
        if logical:
            self._pool.write_blocks([blocks.table[lb] for lb in logical], data[:, 0], data[:, 1])

    def grow(self, blocks: int) -> None:
        """Append `ceil(blocks / slab_blocks)` slabs; existing data is not copied."""
        if blocks < 0:
            raise ValueError(f"grow needs blocks >= 0, got {blocks}")
        self._pool.add_slabs(math.ceil(blocks / self.slab_blocks))

    def shrink(self, blocks: int, max_moved: int | None = None) -> int:
        """Release whole tail slabs totalling at most `blocks`, first moving their live blocks down; returns
        the blocks released.

        With `max_moved`, stop at the last tail slab that keeps the live blocks moved within it (at least one
        slab always goes), so a caller can shrink in bounded steps between micro-batches instead of stalling
        one for the whole compaction. Versions belong to logical blocks, so they survive the move unchanged.
        """
        if blocks < 0:
            raise ValueError(f"shrink needs blocks >= 0, got {blocks}")
        drop = min(blocks // self.slab_blocks, self.total_blocks // self.slab_blocks)
        if drop == 0:
            return 0
        new_total = self.total_blocks - drop * self.slab_blocks
        if new_total < self._reserved_total:
            spare = (self.total_blocks - self._reserved_total) // self.slab_blocks * self.slab_blocks
            raise KVCapacityError(
                f"cannot shrink the pool by {drop * self.slab_blocks} blocks to {new_total}: "
                f"{self._reserved_total} blocks are reserved, so at most {spare} blocks "
                f"({self.slab_blocks} per slab) can be released now"
            )
        moving = [
            (blocks_, lb)
            for state in self._seqs.values()
            for blocks_ in state.layers.values()
            for lb, block in enumerate(blocks_.table)
            if block >= new_total
        ]
        if max_moved is not None:
            drop, moving = self._bounded_drop(drop, moving, max_moved)
        # Reserved <= new_total and used <= reserved, so the low slabs always have room for the movers.
        targets = self._pool.drop_slabs(drop, [b.table[lb] for b, lb in moving])
        for (blocks_, lb), target in zip(moving, targets, strict=True):
            blocks_.table[lb] = target
        return drop * self.slab_blocks

    def _bounded_drop(self, drop: int, moving: list[tuple[_LayerBlocks, int]],
                      max_moved: int) -> tuple[int, list[tuple[_LayerBlocks, int]]]:
        """The fewest-moves prefix of the tail: as many of the last `drop` slabs as keep the movers within
        `max_moved` (at least the last slab), and the movers that leaves."""
        slabs = self.total_blocks // self.slab_blocks
        per_slab = [0] * drop  # live blocks in the k-th slab from the end
        for blocks_, lb in moving:
            per_slab[slabs - 1 - blocks_.table[lb] // self.slab_blocks] += 1
        keep, moved = 1, per_slab[0]
        while keep < drop and moved + per_slab[keep] <= max_moved:
            moved += per_slab[keep]
            keep += 1
        first = (slabs - keep) * self.slab_blocks
        return keep, [(b, lb) for b, lb in moving if b.table[lb] >= first]

    def _blocks(self, seq_id: int, layer: int) -> _LayerBlocks | None:
        state = self._seqs.get(seq_id)
        return state.layers.get(layer) if state else None

    def _plan_write(self, layer: int, span: SeqSpan) -> tuple[SeqSpan, _LayerBlocks, list[int]]:
        """The span's (seq, layer) blocks (new and not yet attached if it has none) and the logical blocks
        it writes that have no physical block yet, checked against the reservation."""
        state = self._seqs.get(span.seq_id)
        blocks = state.layers.get(layer) if state else None
        if blocks is None:
            blocks = _LayerBlocks()
        if span.start > blocks.length:
            raise ValueError(
                f"write at position {span.start} of sequence {span.seq_id} layer {layer} would leave "
                f"a hole: it holds {blocks.length} positions, so start must be <= {blocks.length}"
            )
        table, bs = blocks.table, self.spec.block_size
        logical = range(span.start // bs, (span.start + span.n - 1) // bs + 1)
        missing = [lb for lb in logical if lb >= len(table) or table[lb] == _HOLE]
        if missing:
            self._check_reservation(span.seq_id, layer, len(missing))
        return span, blocks, missing

    def _readable(self, seq_id: int, layer: int, length: int) -> list[int]:
        blocks = self._blocks(seq_id, layer)
        held = blocks.length if blocks else 0
        if not 0 <= length <= held:
            raise ValueError(f"cannot read {length} positions of sequence {seq_id} layer {layer}: it holds {held}")
        if length == 0:
            return []
        assert blocks is not None
        table = blocks.table[: math.ceil(length / self.spec.block_size)]
        if _HOLE in table:
            raise ValueError(
                f"cannot read {length} positions of sequence {seq_id} layer {layer}: logical blocks "
                f"{[i for i, p in enumerate(table) if p == _HOLE]} have not been imported yet"
            )
        return table

    def _check_kv(self, k: Tensor, v: Tensor, tokens: int) -> None:
        want = (tokens, self.spec.num_kv_heads, self.spec.head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"k and v must both be {list(want)}, got {list(k.shape)} and {list(v.shape)}")

    def _check_reservation(self, seq_id: int, layer: int, needed: int) -> None:
        reserved, allocated = self.reserved_for(seq_id), self.allocated_for(seq_id)
        if allocated + needed > reserved:
            raise KVCapacityError(
                f"sequence {seq_id} needs {needed} more blocks for layer {layer} but only "
                f"{reserved - allocated} of its reservation of {reserved} are left ({allocated} allocated); "
                f"reserve more first"
            )

    def _allocate(self, seq_id: int, count: int) -> list[int]:
        """Take `count` lowest free blocks; the caller has checked the reservation, which bounds `used`."""
        self._seqs[seq_id].allocated += count
        self._used += count
        return self._pool.allocate(count)

    def _place(self, blocks: _LayerBlocks, logical: list[int], physical: list[int]) -> None:
        if not logical:
            return
        grow_to = max(logical) + 1 - len(blocks.table)
        if grow_to > 0:
            blocks.table.extend([_HOLE] * grow_to)
            blocks.versions.extend([0] * grow_to)
        for lb, block in zip(logical, physical, strict=True):
            blocks.table[lb] = block

    def _free_table(self, table: list[int]) -> int:
        held = [block for block in table if block != _HOLE]
        self._pool.release(held)
        return len(held)


def _token_rows(table: list[int], start: int, end: int, bs: int) -> list[int]:
    """Global rows (`block * bs + slot`) of positions `start .. end - 1`: a range per block, so long prompts
    stay cheap."""
    rows: list[int] = []
    for lb in range(start // bs, (end - 1) // bs + 1):
        base = table[lb] * bs - lb * bs
        rows += range(base + max(start, lb * bs), base + min(end, lb * bs + bs))
    return rows
