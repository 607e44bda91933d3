"""The micro-batch message every hop of the data plane carries, and how it maps onto transport frames.

Admission (`reserve`) and `release` travel with the computation so every stage applies them in order.

On the wire a micro-batch is a CONTROL frame (its header: a small JSON object with the reservations,
releases and error) followed, when it has spans, by an ACTIVATIONS frame with the spans and tensor.
Two frames because the transport's ACTIVATIONS frames carry no meta and need one row per token; the
header's size is bounded by capping releases and new reservations per batch (`MAX_RELEASES`,
`MAX_RESERVES`) so it always fits the transport's JSON cap. Rows always match tokens: a last stage
that returns one logits row per span says so by sending each span as its last position,
`(seq_id, start + n - 1, 1)` (see `last_token_spans`).

Every micro-batch carries exactly one layout epoch: it is the transport header's `epoch` field of both
frames (the reader refuses a data frame whose epoch differs from its header's), so the JSON header needs
no copy of it. During an epoch switch a stage picks the layer range and route of a batch by it.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch

from pipeshift.runtime.kv.span import SeqSpan
from pipeshift.runtime.transport import FrameClient, FrameError, FrameLimits, Kind
from pipeshift.runtime.transport.frame import Frame
from pipeshift.runtime.transport.limits import JSON_META_CAP

MAX_RELEASES = 64
MAX_RESERVES = 64
MAX_ERROR_CHARS = 1000
# Sequences per batch a receiver accepts (`data_limits` default); well above any useful batch.
MAX_SEQS = 4096
_HEADER_KEY = "mb"
_FIELDS = {"reserve", "release", "error", "data"}
_ID_MAX = 2**63 - 1
_TOKENS_MAX = 2**32 - 1


@dataclass(frozen=True, eq=False, repr=False)
class MicroBatch:
    """One step's work for the pipeline; see docs/architecture.md ("Serving").

    `data` is int64 token ids `[T]` into stage 0, hidden states `[T, H]` between stages and logits
    `[len(spans), V]` out of the last stage, whose spans are then last-token spans. `reserve[i]` is
    the token count span i's sequence reserves on its first appearance (else 0); `release` lists the
    sequences every stage frees before computing. A batch without spans only releases; `error`
    marks a batch a stage failed: later stages apply `release` and pass it on.
    """

    batch_id: int
    epoch: int
    spans: tuple[SeqSpan, ...]
    reserve: tuple[int, ...]
    release: tuple[int, ...]
    data: torch.Tensor
    error: str = ""

    def __post_init__(self) -> None:
        if len(self.reserve) != len(self.spans):
            raise ValueError(
                f"reserve has {len(self.reserve)} entries for {len(self.spans)} spans; need one per span"
            )
        if any(not 0 <= r <= _TOKENS_MAX for r in self.reserve):
            raise ValueError(f"reserve {list(self.reserve)} has a token count outside 0..{_TOKENS_MAX}")
        if sum(1 for r in self.reserve if r) > MAX_RESERVES:
            raise ValueError(f"a micro-batch may admit at most {MAX_RESERVES} new sequences")
        if len(self.release) > MAX_RELEASES:
            raise ValueError(
                f"a micro-batch may release at most {MAX_RELEASES} sequences, got {len(self.release)}"
            )
        if any(not 0 <= s <= _ID_MAX for s in self.release):
            raise ValueError(f"release {list(self.release)} has an id outside 0..{_ID_MAX}")
        if len(self.error) > MAX_ERROR_CHARS:
            object.__setattr__(self, "error", self.error[: MAX_ERROR_CHARS - 3] + "...")
        rows = sum(s.n for s in self.spans)
        if self.spans and (self.data.dim() == 0 or self.data.shape[0] != rows):
            raise ValueError(
                f"data of shape {list(self.data.shape)} needs {rows} rows, one per token of the spans"
            )
        if not self.spans and self.data.numel():
            raise ValueError(
                f"a micro-batch without spans carries no data, got shape {list(self.data.shape)}"
            )

    @property
    def tokens(self) -> int:
        return sum(s.n for s in self.spans)

    def failed(self, error: str, width: int, dtype: torch.dtype) -> MicroBatch:
        """This batch marked failed: one zero row of `width` per span keeps it valid for the next hop."""
        spans = last_token_spans(self.spans)
        data = torch.zeros(len(spans), width, dtype=dtype) if spans else empty_data()
        return replace(self, spans=spans, reserve=(0,) * len(spans), data=data, error=error)

    def __repr__(self) -> str:
        return (
            f"MicroBatch(batch={self.batch_id}, epoch={self.epoch}, spans={len(self.spans)}, "
            f"tokens={self.tokens}, release={len(self.release)}, data={self.data.dtype}"
            f"{list(self.data.shape)}, error={self.error!r})"
        )


def last_token_spans(spans: Iterable[SeqSpan]) -> tuple[SeqSpan, ...]:
    """Each span reduced to its last position: the rows of a last stage's logits."""
    return tuple(SeqSpan(s.seq_id, s.end - 1, 1) for s in spans)


def empty_data() -> torch.Tensor:
    return torch.empty(0, dtype=torch.int64)


def to_frames(mb: MicroBatch) -> tuple[Frame, ...]:
    """The header frame, then the data frame when the batch has spans."""
    body = {
        "reserve": [[i, r] for i, r in enumerate(mb.reserve) if r],
        "release": list(mb.release),
        "data": bool(mb.spans),
    }
    error = mb.error
    meta = _header_meta({**body, "error": error})
    while len(meta) > JSON_META_CAP and error:
        # Only the error text is unbounded in bytes (escaped non-ASCII); the counts are capped.
        error = error[: len(error) // 2]
        meta = _header_meta({**body, "error": f"{error}..."})
    if len(meta) > JSON_META_CAP:
        raise FrameError(f"micro-batch {mb.batch_id}'s header is {len(meta)} bytes, above {JSON_META_CAP}")
    header = Frame(Kind.CONTROL, mb.epoch, mb.batch_id, (), meta, None)
    if not mb.spans:
        return (header,)
    return header, Frame.activations(mb.data, mb.spans, epoch=mb.epoch, batch_id=mb.batch_id)


def _header_meta(body: dict[str, object]) -> bytes:
    return json.dumps({_HEADER_KEY: body}, separators=(",", ":")).encode("utf-8")


def data_limits(
    *, width: int | None, dtypes: Iterable[torch.dtype], max_tokens: int, max_seqs: int
) -> tuple[FrameLimits, FrameLimits]:
    """What a micro-batch receiver accepts: rows of `width` values (`None`: 1-D token ids) and headers."""
    codes = frozenset(dtypes)
    elements = max_tokens * (width or 1)
    data = FrameLimits(
        kinds=frozenset({Kind.ACTIVATIONS}),
        dtypes=codes,
        max_ndim=1 if width is None else 2,
        max_dim=max(max_tokens, width or 1),
        max_elements=elements,
        max_spans=max_seqs,
        max_meta_bytes=0,
        max_payload_bytes=elements * max(d.itemsize for d in codes),
        trailing_dims=() if width is None else (width,),
    )
    return data, FrameLimits.messages(Kind.CONTROL)


@dataclass(frozen=True)
class _Header:
    batch_id: int
    epoch: int
    reserve: tuple[tuple[int, int], ...]
    release: tuple[int, ...]
    error: str
    data: bool


def _int(value: object, what: str, low: int = 0, high: int = _ID_MAX) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise FrameError(f"micro-batch header: {what} must be an integer in {low}..{high}, got {value!r}")
    return value


def _parse_header(frame: Frame) -> _Header:
    body = frame.body().get(_HEADER_KEY)
    if not isinstance(body, dict) or set(body) != _FIELDS:
        raise FrameError(
            f"a CONTROL frame on the data plane must be a micro-batch header {{{_HEADER_KEY}: "
            f"{{{', '.join(sorted(_FIELDS))}}}}}"
        )
    reserve, release, error, data = body["reserve"], body["release"], body["error"], body["data"]
    if not isinstance(reserve, list) or len(reserve) > MAX_RESERVES:
        raise FrameError(
            f"micro-batch header: reserve must be a list of at most {MAX_RESERVES} [index, tokens]"
        )
    pairs = []
    for item in reserve:
        if not isinstance(item, list) or len(item) != 2:
            raise FrameError(f"micro-batch header: reserve entry {item!r} is not [index, tokens]")
        index = _int(item[0], "a reserve index", 0, MAX_SEQS - 1)
        pairs.append((index, _int(item[1], "a reserve token count", 1, _TOKENS_MAX)))
    if not isinstance(release, list) or len(release) > MAX_RELEASES:
        raise FrameError(f"micro-batch header: release must be a list of at most {MAX_RELEASES} sequence ids")
    if not isinstance(error, str) or len(error) > MAX_ERROR_CHARS:
        raise FrameError(
            f"micro-batch header: error must be a string of at most {MAX_ERROR_CHARS} characters"
        )
    if not isinstance(data, bool):
        raise FrameError(f"micro-batch header: data must be true or false, got {data!r}")
    if pairs and not data:
        raise FrameError("micro-batch header: a batch without spans cannot reserve")
    ids = tuple(_int(s, "a released sequence id") for s in release)
    return _Header(frame.batch_id, frame.epoch, tuple(pairs), ids, error, data)


def _assemble(h: _Header, frame: Frame | None) -> MicroBatch:
    if frame is None:
        return MicroBatch(h.batch_id, h.epoch, (), (), h.release, empty_data(), h.error)
    if frame.tensor is None:
        raise FrameError(f"micro-batch {h.batch_id}'s data frame has no tensor")
    reserve = [0] * len(frame.spans)
    for index, tokens in h.reserve:
        if index >= len(reserve):
            raise FrameError(f"micro-batch {h.batch_id} reserves for span {index} of {len(reserve)}")
        reserve[index] = tokens
    return MicroBatch(h.batch_id, h.epoch, frame.spans, tuple(reserve), h.release, frame.tensor, h.error)


class MicroBatchReader:
    """Turns one connection's frames back into micro-batches; keep one per connection.

    `feed` returns a batch when one is complete, None after a header that announced data, and raises
    FrameError on anything out of order, so the caller can close that connection.
    """

    def __init__(self) -> None:
        self._pending: _Header | None = None

    def feed(self, frame: Frame) -> MicroBatch | None:
        pending, self._pending = self._pending, None
        if frame.kind is Kind.CONTROL:
            if pending is not None:
                raise FrameError(f"micro-batch {pending.batch_id}'s header was followed by another header")
            header = _parse_header(frame)
            if header.data:
                self._pending = header
                return None
            return _assemble(header, None)
        if frame.kind is Kind.ACTIVATIONS:
            if pending is None:
                raise FrameError(f"data frame of batch {frame.batch_id} arrived without its header")
            if (frame.batch_id, frame.epoch) != (pending.batch_id, pending.epoch):
                raise FrameError(
                    f"data frame (batch {frame.batch_id}, epoch {frame.epoch}) does not follow its "
                    f"header (batch {pending.batch_id}, epoch {pending.epoch})"
                )
            return _assemble(pending, frame)
        raise FrameError(f"{frame.kind.name} frames do not belong on a micro-batch connection")


def from_frames(frames: Sequence[Frame]) -> MicroBatch:
    """The micro-batch `to_frames` produced (for tests and one-shot decoding)."""
    reader = MicroBatchReader()
    for i, frame in enumerate(frames):
        mb = reader.feed(frame)
        if mb is not None:
            if i != len(frames) - 1:
                raise FrameError(f"{len(frames) - i - 1} frames follow a complete micro-batch")
            return mb
    raise FrameError("the frames end before the micro-batch is complete")


_send_locks: weakref.WeakKeyDictionary[FrameClient, asyncio.Lock] = weakref.WeakKeyDictionary()


async def send_microbatch(client: FrameClient, mb: MicroBatch) -> None:
    """Sends header and data back to back; concurrent senders on one client never interleave them."""
    frames = to_frames(mb)
    lock = _send_locks.setdefault(client, asyncio.Lock())
    async with lock:
        for frame in frames:
            await client.send(frame)
