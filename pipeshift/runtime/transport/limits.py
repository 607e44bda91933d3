"""What a receiver is willing to accept, checked against each frame header before any body is read.

A stage builds its limits from what it knows (hidden size, dtype, batch caps), so a hostile or buggy
peer cannot make it allocate more than one legitimate frame's worth of memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from pipeshift.runtime.transport.frame import JSON_KINDS, TENSOR_DTYPES, DType, Kind, dtype_code, itemsize
from pipeshift.runtime.transport.kv_meta import kv_meta_size

# The header has room for six dimensions: a KV frame is [blocks, 2, block_size, kv_heads, head_dim],
# and one more leaves space for a layer axis when several layers travel together.
MAX_NDIM = 6
# JSON is only for rare, tiny messages (handshake, control); the cap keeps parsing cost trivial.
JSON_META_CAP = 4096


@dataclass(frozen=True)
class FrameLimits:
    """Caps and expectations for incoming frames; every field is checked before allocation.

    `trailing_dims`, when given, is the exact shape after the first dimension (e.g. `(hidden_size,)`).
    `kinds` and `dtypes` accept any iterable (dtypes as torch dtypes or `DType`) and are normalised.
    """

    kinds: frozenset[Kind]
    dtypes: frozenset[DType] = TENSOR_DTYPES
    max_ndim: int = MAX_NDIM
    max_dim: int = 1 << 20
    max_elements: int = 1 << 28
    max_spans: int = 4096
    max_meta_bytes: int = 1 << 16
    max_payload_bytes: int = 1 << 30
    trailing_dims: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", frozenset(Kind(k) for k in self.kinds))
        object.__setattr__(self, "dtypes", frozenset(dtype_code(d) for d in self.dtypes))
        if not self.kinds:
            raise ValueError("FrameLimits.kinds is empty; a receiver must accept at least one frame kind")
        if DType.NONE in self.dtypes:
            raise ValueError("FrameLimits.dtypes lists DType.NONE; list only tensor element types")
        if not 1 <= self.max_ndim <= MAX_NDIM:
            raise ValueError(f"FrameLimits.max_ndim is {self.max_ndim}; the wire format allows 1..{MAX_NDIM}")
        for name in ("max_dim", "max_elements", "max_spans", "max_meta_bytes", "max_payload_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"FrameLimits.{name} must be an int >= 0, got {value!r}")
        if self.trailing_dims is not None:
            object.__setattr__(self, "trailing_dims", tuple(self.trailing_dims))
            if len(self.trailing_dims) >= self.max_ndim or any(d < 1 for d in self.trailing_dims):
                raise ValueError(
                    f"FrameLimits.trailing_dims={self.trailing_dims} needs positive sizes and fewer than "
                    f"max_ndim={self.max_ndim} entries"
                )

    @classmethod
    def for_activations(
        cls, *, hidden_size: int, dtypes: Iterable[torch.dtype], max_tokens: int, max_seqs: int
    ) -> FrameLimits:
        """Hidden states `[tokens, hidden_size]` of at most `max_tokens` tokens from `max_seqs` sequences."""
        codes = frozenset(dtype_code(d) for d in dtypes)
        elements = max_tokens * hidden_size
        return cls(
            kinds=frozenset({Kind.ACTIVATIONS}),
            dtypes=codes,
            max_ndim=2,
            max_dim=max(max_tokens, hidden_size),
            max_elements=elements,
            max_spans=max_seqs,
            max_meta_bytes=0,
            max_payload_bytes=elements * max(itemsize(c) for c in codes),
            trailing_dims=(hidden_size,),
        )

    @classmethod
    def for_kv_blocks(
        cls, *, block_shape: tuple[int, ...], dtypes: Iterable[torch.dtype], max_blocks: int
    ) -> FrameLimits:
        """Up to `max_blocks` KV blocks of `block_shape` each (e.g. `(2, block_size, kv_heads, head_dim)`)."""
        codes = frozenset(dtype_code(d) for d in dtypes)
        elements = max_blocks * math.prod(block_shape)
        return cls(
            kinds=frozenset({Kind.KV_BLOCKS}),
            dtypes=codes,
            max_ndim=1 + len(block_shape),
            max_dim=max(max_blocks, *block_shape),
            max_elements=elements,
            max_spans=0,
            max_meta_bytes=kv_meta_size(max_blocks),
            max_payload_bytes=elements * max(itemsize(c) for c in codes),
            trailing_dims=tuple(block_shape),
        )

    @classmethod
    def messages(cls, *kinds: Kind) -> FrameLimits:
        """Only tensor-less JSON frames of the given kinds (handshakes, replies)."""
        if not set(kinds) <= JSON_KINDS:
            raise ValueError(f"FrameLimits.messages takes JSON kinds only, got {sorted(k.name for k in kinds)}")
        return cls(
            kinds=frozenset(kinds),
            max_dim=0,
            max_elements=0,
            max_spans=0,
            max_meta_bytes=JSON_META_CAP,
            max_payload_bytes=0,
        )


Accepts = FrameLimits | Iterable[FrameLimits] | Mapping[Kind, FrameLimits]


def limits_by_kind(accepts: Accepts) -> dict[Kind, FrameLimits]:
    """The limits that apply to each accepted kind.

    One endpoint often takes kinds of different shapes (activations and KV blocks), so receivers take
    several `FrameLimits`, each naming its kinds; a kind named twice would be ambiguous.
    """
    if isinstance(accepts, Mapping):
        return dict(accepts)
    table: dict[Kind, FrameLimits] = {}
    for limits in [accepts] if isinstance(accepts, FrameLimits) else accepts:
        for kind in limits.kinds:
            if kind in table:
                raise ValueError(f"{kind.name} appears in two FrameLimits; give each kind one set of limits")
            table[kind] = limits
    return table
