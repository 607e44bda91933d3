"""A stage's device-memory budget: the weights it holds come first, the KV pool gets what is left.

On an accelerator a stage has a fixed amount of memory. Giving layers away frees their weights' memory,
which becomes KV blocks; taking layers on needs room for their weights, which the pool must give up.
Kept apart from the cache so the sizing rule can be checked (and planned) without building a pool.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryBudget:
    """`memory_bytes` for weights and KV together; the pool moves in slabs of `slab_blocks` blocks."""

    memory_bytes: int
    block_bytes: int
    slab_blocks: int

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "block_bytes", "slab_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MemoryBudget.{name} must be a positive int, got {value!r}")

    @property
    def slab_bytes(self) -> int:
        return self.block_bytes * self.slab_blocks

    def pool_blocks(self, weight_bytes: int) -> int:
        """Blocks of the largest pool of whole slabs that fits beside `weight_bytes` of weights (0 if none)."""
        return max(0, (self.memory_bytes - weight_bytes) // self.slab_bytes) * self.slab_blocks

    def fits(self, weight_bytes: int, pool_blocks: int) -> bool:
        """Whether weights of `weight_bytes` and a pool of `pool_blocks` blocks fit in the memory together."""
        return weight_bytes + pool_blocks * self.block_bytes <= self.memory_bytes

    def describe(self, weight_bytes: int) -> str:
        """The figures behind `pool_blocks`, for error messages."""
        left = self.memory_bytes - weight_bytes
        return (f"memory {self.memory_bytes} bytes - weights {weight_bytes} bytes leaves {left} bytes, room for "
                f"{self.pool_blocks(weight_bytes)} KV blocks in slabs of {self.slab_blocks} blocks of "
                f"{self.block_bytes} bytes ({self.slab_bytes} bytes per slab)")
