"""The physical block storage behind a paged KV cache: slabs of blocks, a free list, gathers and scatters.

Knows nothing of sequences or layers; block ids are global (`slab * slab_blocks + offset`).
"""

from __future__ import annotations

import heapq
import math

import torch
from torch import Tensor

from pipeshift.runtime.kv.spec import KVSpec


class BlockPool:
    """Slabs of `slab_blocks` blocks, each slab one `[2, slab_blocks, block_size, kv_heads, head_dim]` tensor.

    K and V are separate contiguous planes of a slab (block i is `slab[:, i]`) because index_select over
    a contiguous plane is several times faster than over a strided K-of-each-block view. Free blocks
    are handed out lowest id first, so live data gathers in the low slabs and shrinking moves little.
    """

    def __init__(self, spec: KVSpec, slab_blocks: int) -> None:
        if slab_blocks < 1:
            raise ValueError(f"slab_blocks must be >= 1, got {slab_blocks}")
        self.spec = spec
        self.slab_blocks = slab_blocks
        self._k: list[Tensor] = []
        self._v: list[Tensor] = []
        # The same planes as token rows, `[slab_blocks * block_size, kv_heads, head_dim]`, for writes.
        self._k_rows: list[Tensor] = []
        self._v_rows: list[Tensor] = []
        self._free: list[int] = []
        self._buffers: dict[str, Tensor] = {}

    @property
    def total_blocks(self) -> int:
        return len(self._k) * self.slab_blocks

    @property
    def workspace_bytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers.values())

    def block_shape(self) -> tuple[int, int, int, int]:
        return (2, self.spec.block_size, self.spec.num_kv_heads, self.spec.head_dim)

    def add_slabs(self, count: int) -> None:
        spec = self.spec
        for _ in range(count):
            first = self.total_blocks
            # Zeros, not empty: masked filler rows still flow through attention, and NaN * 0 is NaN.
            shape = (2, self.slab_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
            slab = torch.zeros(shape, dtype=spec.dtype, device=spec.device)
            self._k.append(slab[0])
            self._v.append(slab[1])
            self._k_rows.append(slab[0].view(-1, spec.num_kv_heads, spec.head_dim))
            self._v_rows.append(slab[1].view(-1, spec.num_kv_heads, spec.head_dim))
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
            device = self.spec.device
            sources = torch.tensor(live, device=device)
            k, v = self._gather(self._k, sources), self._gather(self._v, sources)
            self.write_blocks(torch.tensor(targets, device=device), k, v)
        for planes in (self._k, self._v, self._k_rows, self._v_rows):
            del planes[len(planes) - count :]
        return targets

    def allocate(self, count: int) -> list[int]:
        return [heapq.heappop(self._free) for _ in range(count)]

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            heapq.heappush(self._free, block)

    def read(self, index: Tensor, scratch: bool = False) -> tuple[Tensor, Tensor]:
        """K and V of blocks `index`, each `[len(index), block_size, kv_heads, head_dim]`.

        With `scratch` they live in buffers reused by the next scratch read: a fresh multi-MB tensor per
        layer and step costs more in page faults than the gather itself.
        """
        if not scratch:
            return self._gather(self._k, index), self._gather(self._v, index)
        shape = (index.numel(), *self._k[0].shape[1:])
        return (
            self._gather(self._k, index, out=self._workspace("k", shape)),
            self._gather(self._v, index, out=self._workspace("v", shape)),
        )

    def read_blocks(self, index: Tensor) -> Tensor:
        """Copies of whole blocks, `[len(index), 2, block_size, kv_heads, head_dim]`."""
        k, v = self.read(index)
        return torch.stack((k, v), dim=1)

    def write_rows(self, rows: Tensor, k: Tensor, v: Tensor) -> None:
        """Write token rows (global `block * block_size + slot`) of K and V."""
        for slab, pos, local in self._split(rows, self.slab_blocks * self.spec.block_size):
            self._k_rows[slab].index_copy_(0, local, k if pos is None else k.index_select(0, pos))
            self._v_rows[slab].index_copy_(0, local, v if pos is None else v.index_select(0, pos))

    def write_blocks(self, index: Tensor, k: Tensor, v: Tensor) -> None:
        """Write whole blocks: `k`, `v` are `[len(index), block_size, kv_heads, head_dim]`."""
        for slab, pos, local in self._split(index, self.slab_blocks):
            self._k[slab].index_copy_(0, local, k if pos is None else k.index_select(0, pos))
            self._v[slab].index_copy_(0, local, v if pos is None else v.index_select(0, pos))

    def _gather(self, planes: list[Tensor], index: Tensor, out: Tensor | None = None) -> Tensor:
        """Blocks `index` of per-slab K or V `planes`, in order.

        Across slabs, each slab's blocks are selected into a contiguous run of a slab-sorted buffer and
        one more index_select restores the order: index_copy_/index_put_ scatter is several times slower.
        """
        if len(planes) == 1:
            return torch.index_select(planes[0], 0, index, out=out)
        slab_of = torch.div(index, self.slab_blocks, rounding_mode="floor")
        lo, hi = int(slab_of.min()), int(slab_of.max())
        local = index - slab_of * self.slab_blocks
        if lo == hi:
            return torch.index_select(planes[lo], 0, local, out=out)
        order = torch.argsort(slab_of, stable=True)
        local = local.index_select(0, order)
        by_slab = self._workspace("by_slab", (index.numel(), *planes[0].shape[1:]))
        start = 0
        for slab, count in enumerate(torch.bincount(slab_of - lo).tolist(), start=lo):
            if count:
                end = start + count
                torch.index_select(planes[slab], 0, local[start:end], out=by_slab[start:end])
                start = end
        return torch.index_select(by_slab, 0, torch.argsort(order), out=out)

    def _split(self, index: Tensor, per_slab: int) -> list[tuple[int, Tensor | None, Tensor]]:
        """Group a global index by slab: (slab, positions in `index` or None for all, index within slab)."""
        if len(self._k) == 1:
            return [(0, None, index)]
        slab_of = torch.div(index, per_slab, rounding_mode="floor")
        local = index - slab_of * per_slab
        lo, hi = int(slab_of.min()), int(slab_of.max())
        if lo == hi:
            return [(lo, None, local)]
        parts: list[tuple[int, Tensor | None, Tensor]] = []
        for slab in range(lo, hi + 1):
            pos = (slab_of == slab).nonzero().squeeze(1)
            if pos.numel():
                parts.append((slab, pos, local.index_select(0, pos)))
        return parts

    def _workspace(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """A reused buffer of at least `shape`'s size; grows, never shrinks (see `workspace_bytes`)."""
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=self.spec.dtype, device=self.spec.device)
            self._buffers[name] = buffer
        return buffer[:numel].view(shape)
