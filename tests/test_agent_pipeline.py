"""Stage agents as real processes over real sockets compute exactly what the in-process engine computes.

Three agents started by the local launcher are chained into a return server of the test's own; the
oracle is one in-process stage holding every layer, fed the same micro-batches (float64, 1 thread).
"""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pipeshift.local.processes import LocalAgents, start_agents
from pipeshift.runtime.kv.span import SeqSpan
from pipeshift.runtime.microbatch import (
    MicroBatch,
    MicroBatchReader,
    data_limits,
    empty_data,
    send_microbatch,
)
from pipeshift.runtime.model.make_model import make_model
from pipeshift.runtime.stage import Stage
from pipeshift.runtime.transport import DType, Frame, FrameClient, FrameServer, Kind, Peer, encode_frame
from pipeshift.runtime.transport.codec import HEADER, MAGIC, PROTOCOL_VERSION
from pipeshift.runtime.transport.handshake import hello

LAYERS, VOCAB, BLOCK = 4, 300, 16
KV_BYTES = 4 * 2**20
STEP_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_model(
        tmp_path_factory.mktemp("agents") / "tiny",
        layers=LAYERS,
        hidden=32,
        heads=4,
        kv_heads=2,
        intermediate=64,
        vocab=VOCAB,
        seed=7,
        dtype=torch.float64,
    )


@pytest.fixture(scope="module")
def agents(model_dir: Path) -> Iterator[LocalAgents]:
    with start_agents(model_dir, "2,1,1", dtype="float64", threads=1, kv_bytes=KV_BYTES) as running:
        yield running


class ReturnServer:
    """Plays the frontend's return server: collects every micro-batch the last stage sends."""

    def __init__(self, port: int = 0) -> None:
        self.batches: asyncio.Queue[MicroBatch] = asyncio.Queue()
        self._readers: dict[str, MicroBatchReader] = {}
        limits = data_limits(width=VOCAB, dtypes=[torch.float64], max_tokens=256, max_seqs=64)
        self.server = FrameServer(self._on_frame, limits, port=port)

    async def _on_frame(self, frame: Frame, peer: Peer) -> None:
        mb = self._readers.setdefault(peer.address, MicroBatchReader()).feed(frame)
        if mb is not None:
            self.batches.put_nowait(mb)

    async def next(self) -> MicroBatch:
        return await asyncio.wait_for(self.batches.get(), STEP_TIMEOUT_S)


class Oracle:
    """The in-process engine: one stage holding every layer, fed the same batches in the same order."""

    def __init__(self, model_dir: Path) -> None:
        self.stage = Stage(model_dir, 0, LAYERS, dtype=torch.float64, kv_bytes=KV_BYTES, block_size=BLOCK)

    def run(self, mb: MicroBatch) -> torch.Tensor:
        for seq_id in mb.release:
            self.stage.release(seq_id)
        for span, tokens in zip(mb.spans, mb.reserve, strict=True):
            if tokens:
                self.stage.reserve(span.seq_id, tokens)
        return self.stage.forward(mb.spans, mb.data)


def batch(
    batch_id: int,
    spans: list[tuple[int, int, list[int]]],
    reserve: dict[int, int] | None = None,
    release: tuple[int, ...] = (),
) -> MicroBatch:
    """`spans` as (seq_id, start, token ids); `reserve` maps seq ids to the tokens they reserve."""
    reserve = reserve or {}
    ids = [t for _, _, tokens in spans for t in tokens]
    return MicroBatch(
        batch_id,
        0,
        tuple(SeqSpan(s, start, len(tokens)) for s, start, tokens in spans),
        tuple(reserve.get(s, 0) for s, _, _ in spans),
        release,
        torch.tensor(ids, dtype=torch.int64) if ids else empty_data(),
    )


def reserved_blocks(agents: LocalAgents) -> list[int]:
    return [agents.control(a, "GET", "/info")["kv"]["reserved_blocks"] for a in agents.agents]


async def connect(agents: LocalAgents) -> FrameClient:
    first = agents.agents[0]
    return await FrameClient.connect(first.host, first.data_port, role="frontend", stage_id=0)


def test_prefill_then_decode_through_three_processes_equals_the_in_process_engine(
    agents: LocalAgents, model_dir: Path
) -> None:
    oracle = Oracle(model_dir)

    async def scenario() -> None:
        ret = ReturnServer()
        async with ret.server:
            await asyncio.to_thread(agents.route, f"127.0.0.1:{ret.server.port}")
            client = await connect(agents)
            prompts = {1: [5, 17, 42, 99, 3, 250, 7], 2: [11, 12], 3: list(range(20, 40))}
            first = batch(1, [(1, 0, prompts[1]), (2, 0, prompts[2])], reserve={1: 7 + 6, 2: 2 + 6})
            await send_microbatch(client, first)
            got = await ret.next()
            expected = oracle.run(first)
            assert got.error == "" and got.batch_id == 1
            assert [s.seq_id for s in got.spans] == [1, 2]
            assert torch.equal(got.data, expected), "prefill logits differ from the in-process engine"
            assert max(reserved_blocks(agents)) > 0

            # Decode, with a prefill joining mid-way and two batches in flight at once.
            lengths = {1: 7, 2: 2}
            nxt = {s: int(expected[i].argmax()) for i, s in enumerate((1, 2))}
            for step in range(4):
                decode = batch(10 + step, [(s, lengths[s], [nxt[s]]) for s in sorted(lengths)])
                in_flight = [decode]
                if step == 1:
                    in_flight.append(batch(20, [(3, 0, prompts[3])], reserve={3: 20 + 4}))
                for mb in in_flight:
                    await send_microbatch(client, mb)
                for mb in in_flight:
                    got = await ret.next()
                    assert got.batch_id == mb.batch_id and got.error == ""
                    expected = oracle.run(mb)
                    assert torch.equal(got.data, expected), f"batch {mb.batch_id} differs from the engine"
                    for i, span in enumerate(mb.spans):
                        lengths[span.seq_id] = span.end
                        nxt[span.seq_id] = int(expected[i].argmax())

            # A batch of nothing but releases frees every stage's blocks.
            await send_microbatch(client, batch(99, [], release=(1, 2, 3)))
            got = await ret.next()
            assert got.release == (1, 2, 3) and not got.spans
            assert reserved_blocks(agents) == [0, 0, 0]
            await client.close()

    asyncio.run(scenario())


def test_a_refused_reservation_fails_the_batch_in_band_and_the_stage_keeps_serving(
    agents: LocalAgents,
) -> None:
    total = agents.control(agents.agents[0], "GET", "/info")["kv"]["total_blocks"]

    async def scenario() -> None:
        ret = ReturnServer()
        async with ret.server:
            await asyncio.to_thread(agents.route, f"127.0.0.1:{ret.server.port}")
            client = await connect(agents)
            greedy = batch(1, [(7, 0, [1, 2, 3]), (8, 0, [4])], reserve={7: 3, 8: total * BLOCK + 1})
            await send_microbatch(client, greedy)
            got = await ret.next()
            assert "stage 0" in got.error and [s.seq_id for s in got.spans] == [7, 8]
            assert got.data.shape == (2, VOCAB)
            # Nothing stays reserved for a batch that failed, on any stage.
            assert reserved_blocks(agents) == [0, 0, 0]
            ok = batch(2, [(9, 0, [1, 2, 3])], reserve={9: 4})
            await send_microbatch(client, ok)
            assert (await ret.next()).error == ""
            await send_microbatch(client, batch(3, [], release=(9,)))
            await ret.next()
            await client.close()

    asyncio.run(scenario())


def rejected_total(agents: LocalAgents, index: int) -> float:
    with urllib.request.urlopen(agents.agents[index].control_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    line = next(x for x in text.splitlines() if x.startswith("pipeshift_frames_rejected_total{"))
    return float(line.rsplit(" ", 1)[1])


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except ConnectionResetError:
        pass  # closed with our unread bytes still queued: a reset is a close too
    return received


def huge_header() -> bytes:
    """A valid handshake, then an activations header claiming 10^12 float64 values (8 TB)."""
    dims = (10**6, 10**6, 0, 0, 0, 0)
    header = HEADER.pack(
        MAGIC, PROTOCOL_VERSION, Kind.ACTIVATIONS, DType.FLOAT64, 2, 0, 1, 1, *dims, 0, 10**12 * 8
    )
    return encode_frame(hello("stage", 0, None)) + header


@pytest.mark.parametrize(
    "payload", [b"PSF1" + b"\xff" * 200, huge_header()], ids=["garbage-handshake", "10^12-elements"]
)
def test_a_hostile_frame_closes_only_its_connection(agents: LocalAgents, payload: bytes) -> None:
    """Stage 1 rejects the intruder while its connection from stage 0 carries on, never redialled."""
    middle = agents.agents[1]

    async def round_trip(ret: ReturnServer, client: FrameClient, seq_id: int) -> None:
        await send_microbatch(client, batch(1, [(seq_id, 0, [3, 4, 5])], reserve={seq_id: 4}))
        assert (await ret.next()).error == ""
        await send_microbatch(client, batch(2, [], release=(seq_id,)))
        await ret.next()

    async def scenario() -> None:
        ret = ReturnServer()
        async with ret.server:
            await asyncio.to_thread(agents.route, f"127.0.0.1:{ret.server.port}")
            client = await connect(agents)
            await round_trip(ret, client, 40)
            dials = agents.control(agents.agents[0], "GET", "/stats")["downstream_connects"]
            rejected = rejected_total(agents, 1)
            with socket.create_connection((middle.host, middle.data_port), timeout=10) as raw:
                raw.sendall(payload)
                raw.settimeout(10)
                await asyncio.to_thread(read_until_closed, raw)
            assert rejected_total(agents, 1) == rejected + 1
            await round_trip(ret, client, 41)
            assert agents.control(agents.agents[0], "GET", "/stats")["downstream_connects"] == dials
            await client.close()

    asyncio.run(scenario())


def test_the_last_stage_redials_a_return_server_that_restarted(agents: LocalAgents) -> None:
    async def scenario() -> None:
        ret = ReturnServer()
        await ret.server.start()
        port = ret.server.port
        await asyncio.to_thread(agents.route, f"127.0.0.1:{port}")
        client = await connect(agents)
        await send_microbatch(client, batch(1, [], release=(1,)))
        await ret.next()
        await ret.server.close()
        again = ReturnServer(port)
        async with again.server:
            await send_microbatch(client, batch(2, [], release=(2,)))
            got = await again.next()
            assert got.batch_id == 2
        await client.close()

    asyncio.run(scenario())
