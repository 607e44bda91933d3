"""The in-memory form of one data-plane frame and the vocabulary it is written in (kinds, dtypes).

The byte layout lives in `codec`; handlers only ever see `Frame`.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from pipeshift.runtime.kv.span import SeqSpan
from pipeshift.runtime.transport.errors import FrameError
from pipeshift.runtime.transport.kv_meta import U32_MAX, U64_MAX, KVBlocksMeta


class Kind(enum.IntEnum):
    """What a frame is for; only ACTIVATIONS and KV_BLOCKS carry a tensor, the rest carry small JSON."""

    HANDSHAKE = 1
    ACK = 2
    ACTIVATIONS = 3
    KV_BLOCKS = 4
    CONTROL = 5
    CLOSE = 6


TENSOR_KINDS = frozenset({Kind.ACTIVATIONS, Kind.KV_BLOCKS})
JSON_KINDS = frozenset(Kind) - TENSOR_KINDS


class DType(enum.IntEnum):
    """Wire codes for element types; NONE marks a frame without a tensor."""

    NONE = 0
    FLOAT32 = 1
    FLOAT64 = 2
    BFLOAT16 = 3
    FLOAT16 = 4
    INT64 = 5
    INT32 = 6


_TORCH_DTYPES = {
    DType.FLOAT32: torch.float32,
    DType.FLOAT64: torch.float64,
    DType.BFLOAT16: torch.bfloat16,
    DType.FLOAT16: torch.float16,
    DType.INT64: torch.int64,
    DType.INT32: torch.int32,
}
_CODES = {dtype: code for code, dtype in _TORCH_DTYPES.items()}
TENSOR_DTYPES = frozenset(_TORCH_DTYPES)


def dtype_code(dtype: torch.dtype | DType) -> DType:
    """The wire code for a torch dtype (a DType passes through)."""
    if isinstance(dtype, DType):
        return dtype
    try:
        return _CODES[dtype]
    except KeyError:
        known = ", ".join(str(d) for d in _CODES)
        raise FrameError(f"dtype {dtype} cannot be sent; supported: {known}") from None


def torch_dtype(code: DType) -> torch.dtype:
    return _TORCH_DTYPES[code]


def itemsize(code: DType) -> int:
    return _TORCH_DTYPES[code].itemsize


@dataclass(frozen=True, eq=False, repr=False)
class Frame:
    """One message on a stage-to-stage connection.

    `spans` lists the micro-batch's sequences in the order their tokens are concatenated along the
    tensor's first dimension. `meta` is kind-specific bytes: fixed records for KV_BLOCKS, a small
    JSON object for the JSON kinds, empty for ACTIVATIONS. Use the constructors below, which build
    `meta` in the right format; a received frame's tensor is backed by its receive buffer.
    """

    kind: Kind
    epoch: int = 0
    batch_id: int = 0
    spans: tuple[SeqSpan, ...] = ()
    meta: bytes = b""
    tensor: torch.Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind(self.kind))
        object.__setattr__(self, "spans", tuple(self.spans))
        if not 0 <= self.epoch <= U32_MAX:
            raise FrameError(f"epoch {self.epoch} is outside 0..{U32_MAX}")
        if not 0 <= self.batch_id <= U64_MAX:
            raise FrameError(f"batch id {self.batch_id} is outside 0..{U64_MAX}")

    @classmethod
    def activations(
        cls, tensor: torch.Tensor, spans: Sequence[SeqSpan], *, epoch: int = 0, batch_id: int = 0
    ) -> Frame:
        return cls(Kind.ACTIVATIONS, epoch, batch_id, tuple(spans), b"", tensor)

    @classmethod
    def kv_blocks(cls, tensor: torch.Tensor, meta: KVBlocksMeta, *, epoch: int = 0, batch_id: int = 0) -> Frame:
        """Blocks of one sequence and layer; `tensor.shape[0]` must equal the number of blocks in `meta`."""
        return cls(Kind.KV_BLOCKS, epoch, batch_id, (), meta.encode(), tensor)

    @classmethod
    def message(cls, kind: Kind, body: Mapping[str, object] | None = None, *, epoch: int = 0) -> Frame:
        """A tensor-less frame (HANDSHAKE, ACK, CONTROL, CLOSE) whose meta is a small JSON object."""
        if kind not in JSON_KINDS:
            raise FrameError(f"{kind.name} frames carry a tensor; use Frame.activations or Frame.kv_blocks")
        meta = json.dumps(dict(body), separators=(",", ":")).encode("utf-8") if body else b""
        return cls(kind, epoch, 0, (), meta, None)

    def body(self) -> dict[str, object]:
        """The JSON object of a tensor-less frame (empty meta reads as `{}`)."""
        if self.kind not in JSON_KINDS:
            raise FrameError(f"{self.kind.name} frames have no JSON body")
        return json.loads(self.meta) if self.meta else {}

    def kv_meta(self) -> KVBlocksMeta:
        if self.kind is not Kind.KV_BLOCKS:
            raise FrameError(f"{self.kind.name} frames have no KV block records")
        return KVBlocksMeta.decode(self.meta)

    def __repr__(self) -> str:
        # Summarises instead of dumping: meta can hold a token, tensors can be huge.
        tensor = "none" if self.tensor is None else f"{self.tensor.dtype}{list(self.tensor.shape)}"
        return (
            f"Frame({self.kind.name}, epoch={self.epoch}, batch={self.batch_id}, "
            f"spans={len(self.spans)}, meta={len(self.meta)}B, tensor={tensor})"
        )
