"""The shape of one stage's KV cache and the error raised when it runs out of blocks.

Kept apart from the cache so planners can size a pool (blocks, bytes) without building one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class KVCapacityError(RuntimeError):
    """Not enough blocks (in the pool or in a sequence's reservation); the message gives the numbers."""


@dataclass(frozen=True, kw_only=True)
class KVSpec:
    """Geometry of every physical block: `[2, block_size, num_kv_heads, head_dim]` (K then V).

    Keyword-only so `block_size` can keep its default ahead of the required head geometry.
    """

    block_size: int = 16
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"

    def __post_init__(self) -> None:
        for name in ("block_size", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KVSpec.{name} must be a positive int, got {value!r}")

    @property
    def bytes_per_block(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    def blocks_for(self, tokens: int, num_layers: int) -> int:
        """Blocks one sequence of `tokens` positions needs across `num_layers` layers."""
        if tokens < 0 or num_layers < 0:
            raise ValueError(f"tokens and num_layers must be >= 0, got tokens={tokens}, num_layers={num_layers}")
        return num_layers * math.ceil(tokens / self.block_size)
