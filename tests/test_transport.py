"""The data plane: framed tensors round-trip bit-exactly over loopback, and hostile bytes never get far."""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import struct
import tracemalloc
from collections.abc import Awaitable, Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeshift.runtime.kv.span import SeqSpan
from pipeshift.runtime.security import TOKEN_ENV, TOKEN_FILE_ENV
from pipeshift.runtime.transport import (
    BlockingFrameClient,
    Frame,
    FrameClient,
    FrameError,
    FrameLimits,
    FrameServer,
    HandshakeRefused,
    Kind,
    KVBlocksMeta,
    Peer,
    PeerClosed,
    decode_frame,
    encode_frame,
    read_frame,
    write_frame,
)

# The wire format as documented, written out independently of the implementation's own struct.
WIRE_HEADER = struct.Struct("<4sBBBBIQI6IIQ")
WIRE_SPAN = struct.Struct("<QII")
KIND_CODES = {"HANDSHAKE": 1, "ACK": 2, "ACTIVATIONS": 3, "KV_BLOCKS": 4, "CONTROL": 5, "CLOSE": 6}
DTYPE_CODES = {
    torch.float32: 1,
    torch.float64: 2,
    torch.bfloat16: 3,
    torch.float16: 4,
    torch.int64: 5,
    torch.int32: 6,
}
HIDDEN = 8
ACTIVATION_LIMITS = FrameLimits.for_activations(
    hidden_size=HIDDEN, dtypes=list(DTYPE_CODES), max_tokens=64, max_seqs=8
)
KV_BLOCK_SHAPE = (2, 4, 2, 3)
KV_LIMITS = FrameLimits.for_kv_blocks(block_shape=KV_BLOCK_SHAPE, dtypes=list(DTYPE_CODES), max_blocks=8)
DATA_LIMITS = (ACTIVATION_LIMITS, KV_LIMITS)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)


def wire_header(
    *,
    magic: bytes = b"PSF1",
    version: int = 1,
    kind: int = KIND_CODES["ACTIVATIONS"],
    dtype: int = 1,
    shape: tuple[int, ...] = (3, HIDDEN),
    dims: tuple[int, ...] | None = None,
    epoch: int = 0,
    batch_id: int = 0,
    n_spans: int = 1,
    meta_len: int = 0,
    payload_len: int | None = None,
) -> bytes:
    itemsizes = {0: 0, 1: 4, 2: 8, 3: 2, 4: 2, 5: 8, 6: 4}
    if payload_len is None:
        payload_len = math.prod(shape) * itemsizes.get(dtype, 4)
    slots = dims if dims is not None else shape + (0,) * (6 - len(shape))
    return WIRE_HEADER.pack(
        magic, version, kind, dtype, len(shape), epoch, batch_id, n_spans, *slots, meta_len, payload_len
    )


def sample_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Values that catch lossy paths: NaN, infinities, -0.0, extreme integers."""
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        t = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1e3).to(dtype)
        flat = t.view(-1)
        flat[:4] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0], dtype=dtype)
        return t
    info = torch.iinfo(dtype)
    t = torch.randint(-1000, 1000, shape, generator=gen, dtype=dtype)
    t.view(-1)[:2] = torch.tensor([info.min, info.max], dtype=dtype)
    return t


def same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    assert a is not None and b is not None
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))
    )


def activations_frame(dtype: torch.dtype = torch.float32, *, epoch: int = 7, batch_id: int = 2**40 + 3) -> Frame:
    spans = [SeqSpan(11, 0, 3), SeqSpan(2**63 + 5, 100, 1), SeqSpan(4, 9, 2)]
    return Frame.activations(sample_tensor(dtype, (6, HIDDEN)), spans, epoch=epoch, batch_id=batch_id)


def kv_frame(dtype: torch.dtype = torch.float32) -> Frame:
    meta = KVBlocksMeta(seq_id=2**50 + 1, layer=17, block_indices=(5, 0, 3), versions=(1, 2**60, 0))
    return Frame.kv_blocks(sample_tensor(dtype, (3, *KV_BLOCK_SHAPE), seed=1), meta, epoch=4, batch_id=9)


def assert_same_frame(got: Frame, sent: Frame) -> None:
    assert (got.kind, got.epoch, got.batch_id, got.spans, got.meta) == (
        sent.kind, sent.epoch, sent.batch_id, sent.spans, sent.meta,
    )  # fmt: skip
    assert same_bits(got.tensor, sent.tensor)


Handler = Callable[[Frame, Peer], Awaitable[Frame | None]]


async def echo(frame: Frame, peer: Peer) -> Frame:
    return frame


# --- the wire format ------------------------------------------------------------------------------


def test_encoding_matches_the_documented_byte_layout() -> None:
    frame = activations_frame(torch.float16)
    spans = b"".join(WIRE_SPAN.pack(s.seq_id, s.start, s.n) for s in frame.spans)
    assert frame.tensor is not None
    expected = (
        wire_header(dtype=4, shape=(6, HIDDEN), epoch=7, batch_id=2**40 + 3, n_spans=3)
        + spans
        + frame.tensor.numpy().tobytes()
    )
    assert encode_frame(frame) == expected


def test_kv_block_records_match_the_documented_layout() -> None:
    frame = kv_frame()
    expected_meta = struct.pack("<QII", 2**50 + 1, 17, 3) + struct.pack("<3I", 5, 0, 3) + struct.pack(
        "<3Q", 1, 2**60, 0
    )
    assert frame.meta == expected_meta
    got = decode_frame(encode_frame(frame), KV_LIMITS)
    assert got.kv_meta() == KVBlocksMeta(2**50 + 1, 17, (5, 0, 3), (1, 2**60, 0))


@settings(max_examples=60, deadline=None)
@given(
    seq_id=st.integers(0, 2**64 - 1),
    layer=st.integers(0, 2**32 - 1),
    blocks=st.lists(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)),
        min_size=1,
        max_size=20,
        unique_by=lambda b: b[0],
    ),
)
def test_kv_block_records_round_trip(seq_id: int, layer: int, blocks: list[tuple[int, int]]) -> None:
    meta = KVBlocksMeta(seq_id, layer, tuple(b[0] for b in blocks), tuple(b[1] for b in blocks))
    assert KVBlocksMeta.decode(meta.encode()) == meta


def test_received_tensor_is_writable_and_owns_its_buffer() -> None:
    data = encode_frame(activations_frame())
    frame = decode_frame(data, ACTIVATION_LIMITS)
    assert frame.tensor is not None
    frame.tensor.fill_(1.0)
    assert torch.equal(frame.tensor, torch.ones(6, HIDDEN))
    assert decode_frame(data, ACTIVATION_LIMITS).tensor is not None


def test_non_contiguous_tensor_is_sent_as_its_logical_values() -> None:
    base = sample_tensor(torch.float32, (HIDDEN, 6))
    frame = Frame.activations(base.t(), [SeqSpan(0, 0, 6)])
    assert same_bits(decode_frame(encode_frame(frame), ACTIVATION_LIMITS).tensor, base.t().contiguous())


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (Frame.activations(torch.zeros(3, HIDDEN), [SeqSpan(0, 0, 2)]), "spans cover 2 tokens"),
        (Frame.activations(torch.zeros(3, HIDDEN), [SeqSpan(0, 0, 2), SeqSpan(0, 5, 1)]), "appears twice"),
        (Frame.activations(torch.zeros(3, HIDDEN), []), "lists 0 spans"),
        (Frame.activations(torch.zeros(3, HIDDEN, dtype=torch.bool), [SeqSpan(0, 0, 3)]), "cannot be sent"),
        (Frame.activations(torch.zeros(0, HIDDEN), [SeqSpan(0, 0, 1)]), "each 1.."),
        (Frame.activations(torch.zeros(1, 1, 1, 1, 1, 1, 1), [SeqSpan(0, 0, 1)]), "at most 6"),
        (Frame(Kind.KV_BLOCKS, tensor=torch.zeros(2, 4), meta=KVBlocksMeta(1, 0, (0,), (0,)).encode()), "meta"),
    ],
)
def test_malformed_frames_are_refused_before_sending(frame: Frame, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        encode_frame(frame)


# --- hostile input, byte level ----------------------------------------------------------------------


def activations_bytes(shape: tuple[int, int] = (3, HIDDEN), **header: int) -> bytes:
    return wire_header(shape=shape, **header) + WIRE_SPAN.pack(1, 0, shape[0]) + bytes(4 * math.prod(shape))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"XXXX" + activations_bytes()[4:], "bad magic"),
        (wire_header(version=9), "version 9"),
        (wire_header(kind=42), "unknown frame kind 42"),
        (wire_header(dtype=77), "unknown dtype code 77"),
        (wire_header(dims=(3, HIDDEN, 5, 0, 0, 0)), "dims beyond ndim"),
        (wire_header(shape=(1_000_000, 1_000_000), n_spans=1), "above the limit"),
        (wire_header(shape=(64, HIDDEN), payload_len=64 * HIDDEN * 4 + 1), "does not match shape"),
        (wire_header(n_spans=2**32 - 1), "need 1..3"),
        (wire_header(shape=(60, HIDDEN), n_spans=9), "9 spans exceed the limit of 8"),
        (wire_header(shape=(3, HIDDEN + 1)), "does not end in the expected"),
        (wire_header(meta_len=16), "have no meta"),
        (wire_header(kind=KIND_CODES["KV_BLOCKS"], shape=(1, *KV_BLOCK_SHAPE), n_spans=0), "not accepted here"),
        (wire_header(shape=(3, HIDDEN), dtype=1)[:30], "truncated header"),
        (activations_bytes()[:-1], "truncated payload"),
        (activations_bytes()[: WIRE_HEADER.size + 5], "truncated span table"),
        (activations_bytes() + b"\0", "1 bytes follow"),
        (wire_header() + WIRE_SPAN.pack(1, 0, 2) + bytes(96), "spans cover 2 tokens"),
        (wire_header(n_spans=2) + WIRE_SPAN.pack(1, 0, 3) + WIRE_SPAN.pack(2, 0, 0) + bytes(96), "n=0"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_hostile_frames_raise_frame_error_with_the_reason(data: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        decode_frame(data, ACTIVATION_LIMITS)


MESSAGES = FrameLimits.messages(Kind.HANDSHAKE, Kind.CONTROL)


def test_message_frames_carry_no_tensor_and_little_json() -> None:
    with pytest.raises(FrameError, match="carry no tensor"):
        decode_frame(wire_header(kind=KIND_CODES["HANDSHAKE"]), MESSAGES)
    with pytest.raises(FrameError, match="4096-byte cap"):
        decode_frame(wire_header(kind=KIND_CODES["CONTROL"], shape=(), dtype=0, n_spans=0, meta_len=5000), MESSAGES)


def test_each_kind_is_checked_against_its_own_limits() -> None:
    both = (ACTIVATION_LIMITS, KV_LIMITS)
    assert decode_frame(encode_frame(kv_frame()), both).kind is Kind.KV_BLOCKS
    assert decode_frame(encode_frame(activations_frame()), both).kind is Kind.ACTIVATIONS
    hidden_shaped_kv = Frame.kv_blocks(torch.zeros(1, HIDDEN), KVBlocksMeta(0, 0, (0,), (0,)))
    with pytest.raises(FrameError, match="does not end in the expected"):
        decode_frame(encode_frame(hidden_shaped_kv), both)
    with pytest.raises(ValueError, match="ACTIVATIONS appears in two"):
        decode_frame(encode_frame(activations_frame()), (ACTIVATION_LIMITS, ACTIVATION_LIMITS))


def test_kv_frame_with_mismatched_block_records_is_refused() -> None:
    good = encode_frame(kv_frame())
    meta_at = WIRE_HEADER.size
    forged_count = good[: meta_at + 12] + struct.pack("<I", 2) + good[meta_at + 16 :]
    with pytest.raises(FrameError, match="claims 2 blocks"):
        decode_frame(forged_count, KV_LIMITS)
    duplicate = good[: meta_at + 16] + struct.pack("<3I", 5, 5, 3) + good[meta_at + 28 :]
    with pytest.raises(FrameError, match="duplicate logical block index"):
        decode_frame(duplicate, KV_LIMITS)


@pytest.mark.parametrize(
    "meta", [b"\xff\xfe", b"[1, 2]", b"{" * 3000, b"[" * 4000 + b"]" * 90]
)
def test_malformed_json_meta_is_a_frame_error(meta: bytes) -> None:
    data = wire_header(kind=KIND_CODES["HANDSHAKE"], shape=(), dtype=0, n_spans=0, meta_len=len(meta)) + meta
    with pytest.raises(FrameError, match="JSON"):
        decode_frame(data, MESSAGES)


def test_claim_of_a_trillion_elements_is_refused_without_reading_or_allocating() -> None:
    claim = wire_header(shape=(1_000_000, 1_000_000), n_spans=1)
    lenient = FrameLimits(kinds=frozenset({Kind.ACTIVATIONS}))

    async def read_header_only() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(claim)  # no body and no EOF: reading any further would hang
        await asyncio.wait_for(read_frame(reader, lenient), timeout=5)

    tracemalloc.start()
    try:
        with pytest.raises(FrameError, match="elements"):
            asyncio.run(read_header_only())
        with pytest.raises(FrameError, match="elements"):
            decode_frame(claim, lenient)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


FIELDS = {  # name -> (offset, struct code) in the documented header
    "magic": (0, "4s"), "version": (4, "B"), "kind": (5, "B"), "dtype": (6, "B"), "ndim": (7, "B"),
    "epoch": (8, "I"), "batch_id": (12, "Q"), "n_spans": (20, "I"), "dim0": (24, "I"), "dim1": (28, "I"),
    "dim2": (32, "I"), "meta_len": (48, "I"), "payload_len": (52, "Q"),
}  # fmt: skip


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    data = bytearray(encode_frame(activations_frame(draw(st.sampled_from(list(DTYPE_CODES))))))
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(FIELDS)))
        offset, code = FIELDS[name]
        if code == "4s":
            value: object = draw(st.binary(min_size=4, max_size=4))
        else:
            bits = 8 * struct.calcsize(code)
            value = draw(st.one_of(st.integers(0, 2**bits - 1), st.integers(0, 16)))
        struct.pack_into(f"<{code}", data, offset, value)
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data) - 1))
        data[at] ^= draw(st.integers(1, 255))
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    return bytes(data[:cut])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated_frames())
def test_mutated_frames_either_fail_cleanly_or_decode_to_exactly_what_was_sent(data: bytes) -> None:
    try:
        frame = decode_frame(data, ACTIVATION_LIMITS)
    except (FrameError, PeerClosed):
        return
    assert encode_frame(frame) == data
    assert frame.tensor is not None and frame.tensor.numel() <= ACTIVATION_LIMITS.max_elements


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(st.binary(max_size=400), st.binary(max_size=400).map(lambda b: b"PSF1\x01" + b)))
def test_random_bytes_never_crash_the_parser(data: bytes) -> None:
    for limits in (ACTIVATION_LIMITS, KV_LIMITS, MESSAGES):
        try:
            frame = decode_frame(data, limits)
        except (FrameError, PeerClosed):
            continue
        assert encode_frame(frame) == data


# --- over real loopback sockets -------------------------------------------------------------------------


def run_with_server(
    body: Callable[[FrameServer], Awaitable[None]],
    handler: Handler = echo,
    limits: FrameLimits = DATA_LIMITS,
    token: str | None = None,
    **server_args: float,
) -> None:
    async def main() -> None:
        async with FrameServer(handler, limits, token=token, **server_args) as server:
            await asyncio.wait_for(body(server), timeout=30)

    asyncio.run(main())


@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
@pytest.mark.parametrize("make", [activations_frame, kv_frame], ids=["activations", "kv_blocks"])
def test_frames_round_trip_bit_identically_through_a_server(
    make: Callable[[torch.dtype], Frame], dtype: torch.dtype
) -> None:
    sent = make(dtype)
    seen: list[tuple[Frame, Peer]] = []

    async def record_and_echo(frame: Frame, peer: Peer) -> Frame:
        seen.append((frame, peer))
        return frame

    async def body(server: FrameServer) -> None:
        async with await FrameClient.connect(
            "127.0.0.1", server.port, role="stage", stage_id=3, replies=DATA_LIMITS
        ) as client:
            await client.send(sent)
            assert_same_frame(await client.recv(), sent)

    run_with_server(body, record_and_echo)
    [(received, peer)] = seen
    assert_same_frame(received, sent)
    assert (peer.role, peer.stage_id) == ("stage", 3)


def test_asyncio_streams_round_trip_every_dtype() -> None:
    sent = [make(dtype) for dtype in DTYPE_CODES for make in (activations_frame, kv_frame)]

    async def main() -> list[Frame]:
        received: list[Frame] = []

        async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for _ in sent:
                received.append(await read_frame(reader, DATA_LIMITS))
            writer.close()

        server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
            for frame in sent:
                await write_frame(writer, frame)
            writer.close()
            await writer.wait_closed()
            while len(received) < len(sent):
                await asyncio.sleep(0.01)
        return received

    received = asyncio.run(asyncio.wait_for(main(), timeout=30))
    for got, frame in zip(received, sent, strict=True):
        assert_same_frame(got, frame)


def test_blocking_client_streams_kv_blocks_from_a_thread() -> None:
    sent = [kv_frame(torch.bfloat16), kv_frame(torch.float32)]

    def migrate(port: int) -> list[Frame]:
        with BlockingFrameClient("127.0.0.1", port, role="migration", stage_id=1, replies=DATA_LIMITS) as client:
            replies = []
            for frame in sent:
                client.send(frame)
                replies.append(client.recv())
            return replies

    async def body(server: FrameServer) -> None:
        for got, frame in zip(await asyncio.to_thread(migrate, server.port), sent, strict=True):
            assert_same_frame(got, frame)

    run_with_server(body)


async def raw_connection(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A peer that writes arbitrary bytes, as an attacker or a broken client would."""
    return await asyncio.open_connection("127.0.0.1", port)


async def say_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str | None = None) -> None:
    body = {"role": "stage", "stage_id": 0} | ({"token": token} if token else {})
    await write_frame(writer, Frame.message(Kind.HANDSHAKE, body))
    assert (await read_frame(reader, FrameLimits.messages(Kind.ACK))).kind is Kind.ACK


async def closed_with_reason(reader: asyncio.StreamReader) -> str:
    close = await read_frame(reader, FrameLimits.messages(Kind.CLOSE))
    assert await reader.read() == b""  # and then the server hangs up
    return str(close.body()["reason"])


async def echo_works(port: int, token: str | None = None) -> None:
    sent = activations_frame()
    async with await FrameClient.connect(
        "127.0.0.1", port, role="stage", stage_id=1, token=token, replies=DATA_LIMITS
    ) as client:
        await client.send(sent)
        assert_same_frame(await client.recv(), sent)


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(60), "bad magic"),
        (wire_header(shape=(1_000_000, 1_000_000)), "above the limit"),
        (activations_bytes(shape=(4, HIDDEN))[:-10], "truncated payload"),
        (wire_header(kind=KIND_CODES["HANDSHAKE"], shape=(), dtype=0, n_spans=0), "not accepted here"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_bad_frame_closes_only_that_connection_and_the_server_keeps_serving(
    garbage: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(server: FrameServer) -> None:
        bystander = await FrameClient.connect("127.0.0.1", server.port, role="stage", stage_id=2,
                                              replies=DATA_LIMITS)  # fmt: skip
        reader, writer = await raw_connection(server.port)
        await say_hello(reader, writer)
        writer.write(garbage)
        if reason == "truncated payload":
            writer.write_eof()
        assert reason in await closed_with_reason(reader)
        writer.close()
        await echo_works(server.port)
        sent = activations_frame()
        await bystander.send(sent)
        assert_same_frame(await bystander.recv(), sent)
        await bystander.close()

    with caplog.at_level(logging.WARNING):
        run_with_server(body)
    assert any(reason in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_garbage_instead_of_a_handshake_is_refused() -> None:
    async def body(server: FrameServer) -> None:
        reader, writer = await raw_connection(server.port)
        await write_frame(writer, activations_frame())
        assert "not accepted here" in await closed_with_reason(reader)
        await echo_works(server.port)

    run_with_server(body)


def test_silent_peer_is_dropped_after_the_handshake_timeout() -> None:
    async def body(server: FrameServer) -> None:
        reader, _ = await raw_connection(server.port)
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""
        await echo_works(server.port)

    run_with_server(body, handshake_timeout_s=0.2)


def test_failing_handler_closes_its_connection_but_not_the_server(caplog: pytest.LogCaptureFixture) -> None:
    async def fragile(frame: Frame, peer: Peer) -> Frame:
        if frame.epoch == 666:
            raise RuntimeError("handler bug")
        return frame

    async def body(server: FrameServer) -> None:
        async with await FrameClient.connect("127.0.0.1", server.port, role="stage", stage_id=1) as client:
            await client.send(activations_frame(epoch=666))
            with pytest.raises(PeerClosed, match="failed to handle a frame"):
                await client.recv()
        await echo_works(server.port)

    with caplog.at_level(logging.ERROR):
        run_with_server(body, fragile)
    assert any("handler failed" in r.getMessage() for r in caplog.records)


# --- the token ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("presented", "reason"), [(None, "required"), ("wrong", "wrong control token")])
def test_configured_token_refuses_peers_without_it(presented: str | None, reason: str) -> None:
    async def body(server: FrameServer) -> None:
        with pytest.raises(HandshakeRefused, match=reason):
            await FrameClient.connect("127.0.0.1", server.port, role="stage", stage_id=0, token=presented)
        await echo_works(server.port, token="right")

    run_with_server(body, token="right")


def test_blocking_client_with_the_wrong_token_is_refused() -> None:
    def connect(port: int) -> None:
        BlockingFrameClient("127.0.0.1", port, role="migration", stage_id=0, token="wrong")

    async def body(server: FrameServer) -> None:
        with pytest.raises(HandshakeRefused, match="wrong control token"):
            await asyncio.to_thread(connect, server.port)

    run_with_server(body, token="right")


def test_server_and_client_take_the_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "from-env")

    async def body(server: FrameServer) -> None:
        await echo_works(server.port)  # the client reads the same variable
        reader, writer = await raw_connection(server.port)
        await write_frame(writer, Frame.message(Kind.HANDSHAKE, {"role": "stage", "stage_id": 0}))
        assert "token is required" in await closed_with_reason(reader)

    run_with_server(body)


def test_without_a_token_configured_the_server_is_open() -> None:
    async def body(server: FrameServer) -> None:
        await echo_works(server.port)
        await echo_works(server.port, token="ignored")

    run_with_server(body)


@pytest.mark.parametrize(
    "hello",
    [
        {"role": "stage"},
        {"role": "", "stage_id": 0},
        {"role": "stage", "stage_id": True},
        {"role": "stage", "stage_id": -1},
        {"role": "stage", "stage_id": 0, "token": 5},
        {"role": "stage", "stage_id": 0, "extra": 1},
    ],
)
def test_malformed_hello_is_refused(hello: dict[str, object]) -> None:
    async def body(server: FrameServer) -> None:
        reader, writer = await raw_connection(server.port)
        await write_frame(writer, Frame.message(Kind.HANDSHAKE, hello))
        assert "hello" in await closed_with_reason(reader)

    run_with_server(body)


def test_server_binds_the_requested_port() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def body(server: FrameServer) -> None:
        assert server.port == port
        await echo_works(port)

    run_with_server(body, port=port)

