"""The physical block storage behind a paged KV cache: slabs of blocks, a free list, gathers and scatters.

Knows nothing of sequences or layers; block ids are global (`slab * slab_blocks + offset`).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeshift.runtime.kv.spec import KVSpec

# Gather plans are kept, keyed by block list, for this many block ids in all (~10 MB at most): a layer
# reads the same blocks every decode step until a sequence grows a block, so a plan serves many steps.
_PLANNED_IDS = 1 << 18
# (slab, rows of its K and V planes) per slab touched; then the order that undoes the grouping, if any.
_GatherPlan = tuple[list[tuple[int, Tensor]], Tensor | None]


@dataclass(frozen=True, eq=False)
class BlockCopy:
    """Where some whole blocks lie, captured on the stage's thread; `copy()` may run on any thread.

    It holds the slab tensors themselves, not their places in the pool, so a shrink that compacts or drops
    slabs meanwhile cannot redirect the read. What it reads is only as stable as the blocks: positions a
    live sequence has written never change (KV is written once), while the blocks of a sequence released
    meanwhile may be reused, which is harmless only because a released sequence's KV is never read again.
    """

    count: int
    block: tuple[int, int, int]
    dtype: torch.dtype
    # (slab tensor viewed as [2, slab_blocks, *block], its block indices, their places in the result or None)
    parts: tuple[tuple[Tensor, Tensor, Tensor | None], ...]

    def copy(self) -> Tensor:
        """A fresh `[count, 2, block_size, kv_heads, head_dim]` tensor."""
        out = torch.empty((self.count, 2, *self.block), dtype=self.dtype, device=self.parts[0][0].device)
        for planes, index, places in self.parts:
            picked = planes.index_select(1, index).transpose(0, 1)
            if places is None:
                out.copy_(picked)
            else:
                out.index_copy_(0, places, picked)
        return out


class BlockPool:
    """Slabs of `slab_blocks` blocks, each slab one `[2 * slab_blocks, block_size, kv_heads, head_dim]` tensor:
    the K of every block, then the V of every block (block i is rows i and slab_blocks + i).

    K and V are contiguous planes because index_select over a contiguous plane is several times faster
    than over a strided K-of-each-block view; sharing one tensor lets one index move both. Free blocks
    are handed out lowest id first, so live data gathers in the low slabs and shrinking moves little.
    Indices arrive as Python ints and are grouped by slab in Python: a decode step moves a few dozen
    blocks per layer, and each small tensor op on the index costs a few µs, about what the copy does.
    """

    def __init__(self, spec: KVSpec, slab_blocks: int) -> None:
        if slab_blocks < 1:
            raise ValueError(f"slab_blocks must be >= 1, got {slab_blocks}")
        self.spec = spec
        self.slab_blocks = slab_blocks
        self._block = (spec.block_size, spec.num_kv_heads, spec.head_dim)
        self._device = torch.device(spec.device)
        self._slabs: list[Tensor] = []
        self._free: list[int] = []
        self._buffers: dict[str, Tensor] = {}
        self._plans: dict[tuple[int, ...], _GatherPlan] = {}
        self._planned_ids = 0

    @property
    def total_blocks(self) -> int:
        return len(self._slabs) * self.slab_blocks

    @property
    def workspace_bytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers.values())

    def block_shape(self) -> tuple[int, int, int, int]:
        return (2, *self._block)

    def add_slabs(self, count: int) -> None:
        for _ in range(count):
            first = self.total_blocks
            # Zeros, not empty: masked filler rows still flow through attention, and NaN * 0 is NaN.
            shape = (2 * self.slab_blocks, *self._block)
            self._slabs.append(torch.zeros(shape, dtype=self.spec.dtype, device=self._device))
            for block in range(first, first + self.slab_blocks):
                heapq.heappush(self._free, block)

    def drop_slabs(self, count: int, live: list[int]) -> list[int]:
        """Drop the last `count` slabs, first copying the `live` blocks among them into free lower blocks.

        Returns the new id of each live block. The caller guarantees room (its reservations bound use).
        """
        new_total = self.total_blocks - count * self.slab_blocks
        low_free = sorted(block for block in self._free if block < new_total)
        targets, self._free = low_free[: len(live)], low_free[len(live) :]
        if live:
            self.write_blocks(targets, *self.read(live))
        del self._slabs[len(self._slabs) - count :]
        return targets

    def allocate(self, count: int) -> list[int]:
        return [heapq.heappop(self._free) for _ in range(count)]

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            heapq.heappush(self._free, block)

    def read(self, blocks: Sequence[int], scratch: bool = False) -> tuple[Tensor, Tensor]:
        """K and V of `blocks` (not empty), each `[len(blocks), block_size, kv_heads, head_dim]`.

        With `scratch` they live in a buffer reused by the next scratch read: a fresh multi-MB tensor per
        layer and step costs more in page faults than the gather itself.
        """
        count = len(blocks)
        out = self._workspace("kv", (2 * count, *self._block)) if scratch else None
        kv = self._gather(blocks, out)
        return kv[:count], kv[count:]

    def prefault(self, blocks: int) -> None:
        """Grow the read workspaces to a gather of `blocks` blocks and touch every page now. A stage that joins
        a running pipeline would otherwise fault them in during its first steps, which every sequence waits
        for: on the benchmark's host (a VM, where memory a process touches for the first time costs ~2 ms per
        MiB) its first step took 0.6–0.9 s and the next 0.1 s. Workspaces already that large are left as they
        are: an agent started with `--warm` prefaulted them at start."""
        for name in ("kv", "by_slab"):
            before = self._buffers.get(name)
            self._workspace(name, (2 * blocks, *self._block))
            if self._buffers[name] is not before:
                self._buffers[name].zero_()

    def locate(self, blocks: Sequence[int]) -> BlockCopy:
        """Whole `blocks` (not empty), to copy now or later from another thread (see `BlockCopy`). It shares no
        workspace and no gather plan with `read`, so an export never evicts the plans decode steps reuse."""
        groups = self._by_slab(blocks, self.slab_blocks)
        parts = []
        for slab, positions in groups:
            local = torch.tensor([blocks[pos] - slab * self.slab_blocks for pos in positions], device=self._device)
            places = None if len(groups) == 1 else torch.tensor(list(positions), device=self._device)
            parts.append((self._slabs[slab].view(2, self.slab_blocks, *self._block), local, places))
        return BlockCopy(len(blocks), self._block, self.spec.dtype, tuple(parts))

    def write_rows(self, rows: Sequence[int], k: Tensor, v: Tensor) -> None:
        """Write token rows (global `block * block_size + slot`): `k`, `v` are `[len(rows), kv_heads, head_dim]`."""
        self._scatter(rows, self.slab_blocks * self.spec.block_size, torch.cat((k, v)))

    def write_blocks(self, blocks: Sequence[int], k: Tensor, v: Tensor) -> None:
        """Write whole blocks: `k`, `v` are `[len(blocks), block_size, kv_heads, head_dim]`."""
        self._scatter(blocks, self.slab_blocks, torch.cat((k, v)))

    def _gather(self, blocks: Sequence[int], out: Tensor | None) -> Tensor:
        """K of `blocks` then their V, in order: `[2 * len(blocks), block_size, kv_heads, head_dim]`.

        Across slabs, each slab's blocks are selected into a contiguous run of a slab-sorted buffer and
        one more index_select restores the order: index_copy_/index_put_ scatter is several times slower.
        """
        parts, order = self._cached_plan(tuple(blocks))
        if order is None:
            ((slab, index),) = parts
            return torch.index_select(self._slabs[slab], 0, index, out=out)
        by_slab = self._workspace("by_slab", (order.shape[0], *self._block))
        start = 0
        for slab, index in parts:
            end = start + index.shape[0]
            torch.index_select(self._slabs[slab], 0, index, out=by_slab[start:end])
            start = end
        return torch.index_select(by_slab, 0, order, out=out)

    def _cached_plan(self, blocks: tuple[int, ...]) -> _GatherPlan:
        """The plan for `blocks`, built if new; the oldest plans are dropped to stay within the id budget."""
        plan = self._plans.get(blocks)
        if plan is None:
            plan = self._plans[blocks] = self._plan(blocks)
            self._planned_ids += len(blocks)
            while self._planned_ids > _PLANNED_IDS:
                oldest = next(iter(self._plans))
                self._planned_ids -= len(oldest)
                del self._plans[oldest]
        return plan

    def _plan(self, blocks: Sequence[int]) -> _GatherPlan:
        """Per slab touched, its rows to select; and unless only one slab is, where each result row lies."""
        groups = self._by_slab(blocks, self.slab_blocks)
        parts = [(slab, self._local(blocks, positions, slab, self.slab_blocks)) for slab, positions in groups]
        if len(groups) == 1:
            return parts, None
        count = len(blocks)
        order = [0] * (2 * count)
        start = 0
        for _, positions in groups:
            for rank, pos in enumerate(positions):
                order[pos] = start + rank
                order[count + pos] = start + len(positions) + rank
            start += 2 * len(positions)
        return parts, torch.tensor(order, device=self._device)

    def _scatter(self, ids: Sequence[int], per_slab: int, kv: Tensor) -> None:
        """Write `kv` (the units `ids` of K, then the same units of V) into the slabs, `per_slab` units each."""
        kv = kv.to(dtype=self.spec.dtype, device=self._device)
        groups = self._by_slab(ids, per_slab)
        for slab, positions in groups:
            target = self._slabs[slab].view(2 * per_slab, *kv.shape[1:])
            if len(groups) > 1:
                count = len(ids)
                rows = torch.tensor([*positions, *(count + pos for pos in positions)], device=self._device)
                source = kv.index_select(0, rows)
            else:
                source = kv
            target.index_copy_(0, self._local(ids, positions, slab, per_slab), source)

    def _by_slab(self, ids: Sequence[int], per_slab: int) -> list[tuple[int, Sequence[int]]]:
        """(slab, positions in `ids` that fall in it) for every slab that `ids` touch, lowest slab first."""
        lo, hi = min(ids) // per_slab, max(ids) // per_slab
        if lo == hi:
            return [(lo, range(len(ids)))]
        groups: dict[int, list[int]] = {}
        for pos, unit in enumerate(ids):
            groups.setdefault(unit // per_slab, []).append(pos)
        return sorted(groups.items())

    def _local(self, ids: Sequence[int], positions: Sequence[int], slab: int, per_slab: int) -> Tensor:
        """Rows of the K plane and then of the V plane, within `slab`, of the units `ids[positions]`."""
        local = [ids[pos] - slab * per_slab for pos in positions]
        return torch.tensor([*local, *(unit + per_slab for unit in local)], device=self._device)

    def _workspace(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """A reused buffer of at least `shape`'s size; grows, never shrinks (see `workspace_bytes`).

        Never an inference tensor, even when first needed under `torch.inference_mode` (a stage's forward):
        those refuse in-place writes outside it, where exports and migrations read blocks.
        """
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            with torch.inference_mode(False):
                buffer = torch.empty(numel, dtype=self.spec.dtype, device=self._device)
            self._buffers[name] = buffer
        return buffer[:numel].view(shape)
