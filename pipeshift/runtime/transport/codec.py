"""The byte layout of a frame and the one parser every reader (asyncio, socket, bytes) drives.

Header, little-endian, 60 bytes: magic b"PSF1", version u8, kind u8, dtype u8, ndim u8, epoch u32,
batch id u64, span count u32, six dims u32 (unused ones 0), meta length u32, payload length u64.
Then the span table (seq_id u64, start u32, n u32 each), the meta bytes, and the raw C-contiguous
tensor bytes. The parser is sans-I/O: it yields a buffer to fill and receives how many bytes arrived,
so the checks are written once and I/O never decides when to allocate. Everything that sizes an
allocation is validated from the fixed header first; the variable part before the payload is bounded
by `max_spans` and `max_meta_bytes`, and the payload buffer is allocated only once all of it checks out.
Tensor bytes are host byte order, which is little-endian on every platform pipeshift runs on.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass

import torch

from pipeshift.runtime.kv.span import SeqSpan
from pipeshift.runtime.transport.errors import FrameError, PeerClosed
from pipeshift.runtime.transport.frame import (
    JSON_KINDS,
    DType,
    Frame,
    Kind,
    dtype_code,
    itemsize,
    torch_dtype,
)
from pipeshift.runtime.transport.kv_meta import U32_MAX, U64_MAX, KVBlocksMeta, kv_meta_size
from pipeshift.runtime.transport.limits import JSON_META_CAP, MAX_NDIM, Accepts, FrameLimits, limits_by_kind

if sys.byteorder != "little":
    raise ImportError("the pipeshift data plane sends raw tensor bytes and needs a little-endian host")

MAGIC = b"PSF1"
PROTOCOL_VERSION = 1
HEADER = struct.Struct(f"<4sBBBBIQI{MAX_NDIM}IIQ")
SPAN = struct.Struct("<QII")

Parser = Generator[memoryview, int, Frame]


@dataclass(frozen=True)
class _Header:
    kind: Kind
    dtype: DType
    shape: tuple[int, ...]
    epoch: int
    batch_id: int
    n_spans: int
    meta_len: int
    payload_len: int

    def pack(self) -> bytes:
        dims = self.shape + (0,) * (MAX_NDIM - len(self.shape))
        return HEADER.pack(
            MAGIC, PROTOCOL_VERSION, self.kind, self.dtype, len(self.shape), self.epoch, self.batch_id,
            self.n_spans, *dims, self.meta_len, self.payload_len,
        )  # fmt: skip


def _codes(codes: type[Kind] | type[DType]) -> str:
    return ", ".join(f"{c.value}={c.name}" for c in codes)


def _unpack_header(raw: bytes | bytearray, accepts: Mapping[Kind, FrameLimits]) -> _Header:
    magic, version, kind, dtype, ndim, epoch, batch_id, n_spans, *rest = HEADER.unpack(raw)
    dims, (meta_len, payload_len) = rest[:MAX_NDIM], rest[MAX_NDIM:]
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r}: a pipeshift frame starts with {MAGIC!r}")
    if version != PROTOCOL_VERSION:
        raise FrameError(f"protocol version {version} is not supported; this build speaks {PROTOCOL_VERSION}")
    try:
        kind = Kind(kind)
    except ValueError:
        raise FrameError(f"unknown frame kind {kind}; known: {_codes(Kind)}") from None
    limits = accepts.get(kind)
    if limits is None:
        accepted = ", ".join(sorted(k.name for k in accepts))
        raise FrameError(f"{kind.name} frames are not accepted here; this endpoint takes {accepted}")
    try:
        dtype = DType(dtype)
    except ValueError:
        raise FrameError(f"unknown dtype code {dtype}; known: {_codes(DType)}") from None
    if ndim > MAX_NDIM:
        raise FrameError(f"ndim {ndim} exceeds the wire format's {MAX_NDIM}")
    if any(dims[ndim:]):
        raise FrameError(f"dims beyond ndim={ndim} must be 0, got {dims}")
    header = _Header(kind, dtype, tuple(dims[:ndim]), epoch, batch_id, n_spans, meta_len, payload_len)
    _check_protocol(header)
    _check_limits(header, limits)
    return header


def _check_protocol(h: _Header) -> None:
    """Invariants of the format itself, whoever receives the frame."""
    name = h.kind.name
    if h.kind in JSON_KINDS:
        if h.dtype is not DType.NONE or h.shape or h.payload_len or h.n_spans:
            raise FrameError(
                f"{name} frames carry no tensor or spans, got dtype={h.dtype.name}, shape={list(h.shape)}, "
                f"payload={h.payload_len} bytes, spans={h.n_spans}"
            )
        if h.meta_len > JSON_META_CAP:
            raise FrameError(f"{name} meta is {h.meta_len} bytes, more than the {JSON_META_CAP}-byte cap")
        return
    if h.dtype is DType.NONE:
        raise FrameError(f"{name} frames need a tensor dtype, got NONE")
    if not h.shape or min(h.shape) < 1 or max(h.shape) > U32_MAX:
        raise FrameError(f"{name} frames need 1..{MAX_NDIM} dims, each 1..{U32_MAX}, got shape {list(h.shape)}")
    expected = math.prod(h.shape) * itemsize(h.dtype)
    if h.payload_len != expected:
        raise FrameError(
            f"payload length {h.payload_len} does not match shape {list(h.shape)} of {h.dtype.name} "
            f"({expected} bytes)"
        )
    if h.kind is Kind.ACTIVATIONS:
        if h.meta_len:
            raise FrameError(f"ACTIVATIONS frames have no meta, got {h.meta_len} bytes")
        if not 1 <= h.n_spans <= h.shape[0]:
            raise FrameError(
                f"ACTIVATIONS frame of {h.shape[0]} tokens lists {h.n_spans} spans; need 1..{h.shape[0]}"
            )
    elif h.kind is Kind.KV_BLOCKS:
        if h.n_spans:
            raise FrameError(f"KV_BLOCKS frames name their sequence in meta, not spans; got {h.n_spans} spans")
        if h.meta_len != kv_meta_size(h.shape[0]):
            raise FrameError(
                f"KV_BLOCKS frame of {h.shape[0]} blocks needs {kv_meta_size(h.shape[0])} meta bytes, "
                f"got {h.meta_len}"
            )


def _check_limits(h: _Header, limits: FrameLimits) -> None:
    """What this particular receiver accepts (kind already checked); all O(1), so nothing is read yet."""
    if h.n_spans > limits.max_spans:
        raise FrameError(f"{h.n_spans} spans exceed the limit of {limits.max_spans}")
    if h.meta_len > limits.max_meta_bytes:
        raise FrameError(f"meta of {h.meta_len} bytes exceeds the limit of {limits.max_meta_bytes}")
    if h.kind in JSON_KINDS:
        return
    if h.dtype not in limits.dtypes:
        raise FrameError(
            f"dtype {h.dtype.name} is not accepted here; expected {', '.join(sorted(d.name for d in limits.dtypes))}"
        )
    if len(h.shape) > limits.max_ndim:
        raise FrameError(f"ndim {len(h.shape)} exceeds the limit of {limits.max_ndim}")
    if max(h.shape) > limits.max_dim:
        raise FrameError(f"shape {list(h.shape)} has a dim above the limit of {limits.max_dim}")
    if math.prod(h.shape) > limits.max_elements:
        raise FrameError(f"shape {list(h.shape)} has more than the limit of {limits.max_elements} elements")
    if h.payload_len > limits.max_payload_bytes:
        raise FrameError(f"payload of {h.payload_len} bytes exceeds the limit of {limits.max_payload_bytes}")
    if limits.trailing_dims is not None and h.shape[1:] != limits.trailing_dims:
        raise FrameError(
            f"shape {list(h.shape)} does not end in the expected {list(limits.trailing_dims)} "
            f"(shape [n, {', '.join(map(str, limits.trailing_dims))}])"
        )


def _parse_body(h: _Header, body: bytes | bytearray) -> tuple[tuple[SeqSpan, ...], bytes]:
    table_len = h.n_spans * SPAN.size
    spans = []
    for seq_id, start, n in SPAN.iter_unpack(body[:table_len]):
        if n < 1:
            raise FrameError(f"span of sequence {seq_id} has n={n}; every span needs at least one token")
        spans.append(SeqSpan(seq_id, start, n))
    meta = bytes(body[table_len:])
    if h.kind is Kind.ACTIVATIONS:
        tokens = sum(s.n for s in spans)
        if tokens != h.shape[0]:
            raise FrameError(f"spans cover {tokens} tokens but the tensor's first dim is {h.shape[0]}")
        if len({s.seq_id for s in spans}) != len(spans):
            raise FrameError(f"a sequence appears twice in the spans {[s.seq_id for s in spans]}")
    elif h.kind is Kind.KV_BLOCKS:
        KVBlocksMeta.decode(meta)
    elif meta:
        try:
            body_json = json.loads(meta)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise FrameError(f"{h.kind.name} meta is not valid JSON: {str(exc)[:100]}") from None
        if not isinstance(body_json, dict):
            raise FrameError(f"{h.kind.name} meta must be a JSON object, got {type(body_json).__name__}")
    return tuple(spans), meta


def _need(got: int, want: int, part: str) -> None:
    if got < want:
        raise FrameError(f"truncated {part}: the connection closed after {got} of {want} bytes")


def frame_parser(accepts: Accepts) -> Parser:
    """Yields buffers to fill completely (send back the count; fewer means EOF) and returns the frame."""
    table = limits_by_kind(accepts)
    raw = bytearray(HEADER.size)
    got = yield memoryview(raw)
    if got == 0:
        raise PeerClosed("the peer closed the connection")
    _need(got, len(raw), "header")
    h = _unpack_header(raw, table)
    body = bytearray(h.n_spans * SPAN.size + h.meta_len)
    if body:
        _need((yield memoryview(body)), len(body), "span table and meta")
    spans, meta = _parse_body(h, body)
    tensor = None
    if h.payload_len:
        payload = bytearray(h.payload_len)
        _need((yield memoryview(payload)), len(payload), "payload")
        tensor = torch.frombuffer(payload, dtype=torch_dtype(h.dtype)).view(h.shape)
    return Frame(h.kind, h.epoch, h.batch_id, spans, meta, tensor)


def drive(parser: Parser, fill: Callable[[memoryview], int]) -> Frame:
    try:
        view = next(parser)
        while True:
            view = parser.send(fill(view))
    except StopIteration as done:
        return done.value


async def drive_async(parser: Parser, fill: Callable[[memoryview], Awaitable[int]]) -> Frame:
    try:
        view = next(parser)
        while True:
            view = parser.send(await fill(view))
    except StopIteration as done:
        return done.value


def encode_parts(frame: Frame) -> tuple[bytes, memoryview]:
    """Header + span table + meta as one small bytes, and the tensor's bytes as a zero-copy view.

    The frame is checked with the receiver-independent rules first, so nothing malformed leaves.
    """
    tensor = frame.tensor
    if tensor is None:
        dtype, shape, payload = DType.NONE, (), memoryview(b"")
    else:
        # No-ops for a contiguous host tensor; a device tensor is staged through host memory here.
        tensor = tensor.detach().cpu().contiguous()
        dtype, shape = dtype_code(tensor.dtype), tuple(tensor.shape)
        if len(shape) > MAX_NDIM:
            raise FrameError(f"tensor has {len(shape)} dims; the wire format allows at most {MAX_NDIM}")
        payload = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    for span in frame.spans:
        if span.seq_id > U64_MAX or span.start > U32_MAX or span.n > U32_MAX:
            raise FrameError(f"{span} does not fit the span record (seq_id u64, start u32, n u32)")
    table = b"".join(SPAN.pack(s.seq_id, s.start, s.n) for s in frame.spans)
    h = _Header(frame.kind, dtype, shape, frame.epoch, frame.batch_id, len(frame.spans), len(frame.meta),
                payload.nbytes)  # fmt: skip
    _check_protocol(h)
    _parse_body(h, table + frame.meta)
    return h.pack() + table + frame.meta, payload


def encode_frame(frame: Frame) -> bytes:
    head, payload = encode_parts(frame)
    return head + payload.tobytes()


def decode_frame(data: bytes | bytearray | memoryview, accepts: Accepts) -> Frame:
    """One whole frame from bytes; trailing bytes are an error, as they would desync a stream."""
    source = memoryview(data).cast("B")
    offset = 0

    def fill(view: memoryview) -> int:
        nonlocal offset
        n = min(len(view), len(source) - offset)
        view[:n] = source[offset : offset + n]
        offset += n
        return n

    frame = drive(frame_parser(accepts), fill)
    if offset != len(source):
        raise FrameError(f"{len(source) - offset} bytes follow the end of the frame")
    return frame
