"""Live reconfiguration between real agent processes moves KV exactly: after prepare, pre-copy rounds and
commit, decoding through the new layout is bit-identical to one in-process stage holding every layer.

Agents are driven directly (no frontend): the test plays frontend and return server, and the drain is
implicit because it waits for each micro-batch to come back before the next control call.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeshift.errors import UserError
from pipeshift.local.processes import AgentHandle, LocalAgents, start_agents
from pipeshift.runtime.kv.span import SeqSpan
from pipeshift.runtime.microbatch import MicroBatch, MicroBatchReader, data_limits, empty_data, send_microbatch
from pipeshift.runtime.stage import Stage
from pipeshift.runtime.transport import Frame, FrameClient, FrameServer, Peer

LAYERS, VOCAB, BLOCK = 8, 300, 4
KV_BYTES = 2**20
STEP_TIMEOUT_S = 30.0
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def model(model_factory: Callable[..., Path]) -> Path:
    return model_factory(layers=LAYERS, hidden=32, heads=4, kv_heads=2, intermediate=48, seed=11,
                         dtype=torch.float64)  # fmt: skip


def launch(model: Path, layout: str, warm: bool = False) -> LocalAgents:
    return start_agents(model, layout, dtype="float64", threads=1, kv_bytes=KV_BYTES, block_size=BLOCK, warm=warm)


def call(agents: LocalAgents, agent: AgentHandle, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    if body is None:
        return agents.control(agent, "GET", path)
    return agents.control(agent, "POST", path, {"request_id": uuid.uuid4().hex, **body})


class Chain:
    """Plays the frontend: sends micro-batches to the first agent, checks each result against the oracle."""

    def __init__(self, model: Path) -> None:
        self.oracle = Stage(model, 0, LAYERS, dtype=torch.float64, kv_bytes=KV_BYTES, block_size=BLOCK)
        self.lengths: dict[int, int] = {}
        self.next: dict[int, int] = {}
        self.reserve: dict[int, int] = {}
        self._batch = 0
        self._returned: asyncio.Queue[MicroBatch] = asyncio.Queue()
        self._readers: dict[str, MicroBatchReader] = {}
        limits = data_limits(width=VOCAB, dtypes=[torch.float64], max_tokens=256, max_seqs=64)
        self.server = FrameServer(self._on_frame, limits)
        self.client: FrameClient | None = None

    async def _on_frame(self, frame: Frame, peer: Peer) -> None:
        mb = self._readers.setdefault(peer.address, MicroBatchReader()).feed(frame)
        if mb is not None:
            self._returned.put_nowait(mb)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def connect(self, first: AgentHandle) -> None:
        if self.client is not None:
            await self.client.close()
        self.client = await FrameClient.connect(first.host, first.data_port, role="frontend", stage_id=0)

    async def run(self, spans: list[tuple[int, list[int]]], release: tuple[int, ...] = ()) -> None:
        """One micro-batch: (seq, new token ids) per span; new sequences reserve prompt + NEW_TOKENS."""
        self._batch += 1
        reserve = []
        for seq, tokens in spans:
            fresh = seq not in self.lengths
            if fresh:
                self.reserve[seq] = len(tokens) + NEW_TOKENS
            reserve.append(self.reserve[seq] if fresh else 0)
        ids = [t for _, tokens in spans for t in tokens]
        data = torch.tensor(ids, dtype=torch.int64) if ids else empty_data()
        span_list = tuple(SeqSpan(s, self.lengths.get(s, 0), len(t)) for s, t in spans)
        mb = MicroBatch(self._batch, 0, span_list, tuple(reserve), release, data)
        assert self.client is not None
        await send_microbatch(self.client, mb)
        got = await asyncio.wait_for(self._returned.get(), STEP_TIMEOUT_S)
        assert got.error == "" and got.batch_id == mb.batch_id, got.error
        for seq in release:
            self.oracle.release(seq)
            for table in (self.lengths, self.next, self.reserve):
                table.pop(seq, None)
        if not spans:
            return
        for span, tokens in zip(mb.spans, mb.reserve, strict=True):
            if tokens:
                self.oracle.reserve(span.seq_id, tokens)
        expected = self.oracle.forward(mb.spans, mb.data)
        assert torch.equal(got.data, expected), f"batch {mb.batch_id}: logits differ from the in-process stage"
        for i, span in enumerate(mb.spans):
            self.lengths[span.seq_id] = span.end
            self.next[span.seq_id] = int(expected[i].argmax())

    async def decode(self, steps: int) -> None:
        for _ in range(steps):
            await self.run([(seq, [tok]) for seq, tok in sorted(self.next.items())])


def blocks(tokens: int) -> int:
    return math.ceil(tokens / BLOCK)


def scenario(model: Path, body: Callable[[Chain], Coroutine[Any, Any, None]]) -> None:
    async def main() -> None:
        chain = Chain(model)
        async with chain.server:
            await body(chain)
            if chain.client is not None:
                await chain.client.close()

    asyncio.run(main())


async def start_serving(chain: Chain, agents: LocalAgents) -> None:
    await asyncio.to_thread(agents.route, chain.address)
    await chain.connect(agents.agents[0])
    await chain.run([(1, [5, 17, 42, 99, 3, 250, 7, 8, 9]), (2, [11, 12, 13, 14, 15])])
    await chain.run([(3, list(range(20, 33)))])
    await chain.decode(2)


def test_boundary_shift_4_4_to_3_5_moves_kv_exactly_and_frees_the_source(model: Path) -> None:
    with launch(model, "4,4") as agents:
        a0, a1 = agents.agents
        grab = lambda agent, path="/info", body=None: asyncio.to_thread(call, agents, agent, path, body)  # noqa: E731

        async def body(chain: Chain) -> None:
            await start_serving(chain, agents)
            rid = "shift-1"
            seqs = {str(s): r for s, r in chain.reserve.items()}
            prepared = await grab(a1, "/reconfig/prepare", {"reconfig_id": rid, "epoch": 1, "layers": [3, 8],
                                                             "sequences": seqs})  # fmt: skip
            assert prepared["loaded"] == [3]
            info = await grab(a1)
            assert info["layers"] == [4, 8] and info["loaded_layers"] == [3, 4, 5, 6, 7]
            assert info["reconfig"] == {"id": rid, "phase": "prepared", "epoch": 1}
            # Reservations now cover five layers for every live sequence.
            assert info["kv"]["reserved_blocks"] == sum(5 * blocks(r) for r in chain.reserve.values())

            precopy = {"reconfig_id": rid, "target": a1.data_address, "layers": [3]}
            first = await grab(a0, "/reconfig/precopy", precopy)
            assert first["blocks"] == sum(blocks(n) for n in chain.lengths.values())
            assert first["dirty_blocks_remaining"] == 0
            before = dict(chain.lengths)

            # Serving goes on: blocks get dirty, a sequence finishes, a new one arrives.
            await chain.decode(3)
            await chain.run([], release=(2,))
            await chain.run([(4, [7, 8, 9, 10, 11, 12])])
            await chain.decode(1)
            per_seq = [blocks(chain.lengths[s]) - before[s] // BLOCK for s in (1, 3)] + [blocks(chain.lengths[4])]
            dirty, block_bytes = sum(per_seq), (await grab(a0))["kv"]["block_bytes"]
            # Capped so the round's bytes take a second: each sequence's chunk waits for the time the ones
            # before it were given, so the last one starts no sooner than the others' bytes allow.
            rate = dirty * block_bytes / 1.0
            second = await grab(a0, "/reconfig/precopy", {**precopy, "max_bytes_per_s": rate})
            assert second["blocks"] == dirty < first["blocks"] + blocks(chain.lengths[4])
            assert second["bytes"] == dirty * block_bytes
            assert second["seconds"] >= (dirty - max(per_seq)) * block_bytes / rate

            await chain.decode(1)  # the last step before the drain dirties each sequence's tail block
            final = await grab(a0, "/reconfig/precopy", precopy)
            assert final["blocks"] == len(chain.lengths) and final["dirty_blocks_remaining"] == 0

            live = sorted(chain.lengths)
            commit = {"reconfig_id": rid, "epoch": 1, "sequences": live}
            c0 = await grab(a0, "/reconfig/commit", {**commit, "layers": [0, 3], "downstream": a1.data_address})
            c1 = await grab(a1, "/reconfig/commit", {**commit, "layers": [3, 8], "downstream": chain.address})
            assert (c0["layers"], c0["loaded_layers"], c0["kv_layers"], c0["epoch"]) == ([0, 3], [0, 1, 2],
                                                                                           [0, 1, 2], 1)  # fmt: skip
            assert (c1["layers"], c1["loaded_layers"], c1["kv_layers"]) == ([3, 8], [3, 4, 5, 6, 7], [3, 4, 5, 6, 7])
            held = sum(blocks(n) for n in chain.lengths.values())
            assert c0["kv"]["used_blocks"] == 3 * held and c1["kv"]["used_blocks"] == 5 * held
            assert c0["reconfig"] is None and c1["reconfig"] is None
            stats = await grab(a0, "/stats")
            assert stats["loaded_layers"] == [0, 1, 2] and stats["kv_layers"] == [0, 1, 2]

            await chain.decode(4)
            await chain.run([(5, [1, 2, 3])])
            await chain.decode(2)
            await chain.run([], release=tuple(sorted(chain.lengths)))
            assert [(await grab(a))["kv"]["reserved_blocks"] for a in (a0, a1)] == [0, 0]

        scenario(model, body)


def test_adding_a_stage_4_4_to_3_3_2_with_a_new_process_decodes_exactly(model: Path) -> None:
    with launch(model, "4,4") as agents, launch(model, "6,2") as extra:
        a0, a1 = agents.agents
        a2 = extra.agents[1]
        extra.process(0).terminate()
        grab = lambda agent, path="/info", body=None: asyncio.to_thread(  # noqa: E731
            call, extra if agent is a2 else agents, agent, path, body
        )

        async def body(chain: Chain) -> None:
            await start_serving(chain, agents)
            rid = "add-1"
            seqs = {str(s): r for s, r in chain.reserve.items()}
            prep = {"reconfig_id": rid, "epoch": 1, "sequences": seqs}
            assert (await grab(a1, "/reconfig/prepare", {**prep, "layers": [3, 6]}))["loaded"] == [3]
            assert (await grab(a2, "/reconfig/prepare", {**prep, "layers": [6, 8]}))["loaded"] == []
            # It never served: prepare touched read workspaces for a gather of every sequence, which its first
            # steps then reuse (two workspaces, each K and V of that many blocks).
            kv = (await grab(a2))["kv"]
            assert kv["workspace_bytes"] == 2 * len(seqs) * max(map(blocks, seqs.values())) * kv["block_bytes"]
            to_a1 = {"reconfig_id": rid, "target": a1.data_address, "layers": [3]}
            to_a2 = {"reconfig_id": rid, "target": a2.data_address, "layers": [6, 7]}
            for _ in range(2):
                await grab(a0, "/reconfig/precopy", to_a1)
                await grab(a1, "/reconfig/precopy", to_a2)
                await chain.decode(2)
            await chain.run([], release=(1,))
            for request in ((a0, to_a1), (a1, to_a2)):
                assert (await grab(request[0], "/reconfig/precopy", request[1]))["dirty_blocks_remaining"] == 0

            commit = {"reconfig_id": rid, "epoch": 1, "sequences": sorted(chain.lengths)}
            await grab(a0, "/reconfig/commit", {**commit, "layers": [0, 3], "downstream": a1.data_address})
            c1 = await grab(a1, "/reconfig/commit", {**commit, "layers": [3, 6], "downstream": a2.data_address})
            c2 = await grab(a2, "/reconfig/commit", {**commit, "layers": [6, 8], "downstream": chain.address})
            held = sum(blocks(n) for n in chain.lengths.values())
            assert (c1["loaded_layers"], c1["kv_layers"], c1["kv"]["used_blocks"]) == ([3, 4, 5], [3, 4, 5], 3 * held)
            # Sequence 1 finished before the switch: the new stage dropped what it had imported of it.
            assert (c2["loaded_layers"], c2["kv_layers"], c2["kv"]["used_blocks"]) == ([6, 7], [6, 7], 2 * held)

            await chain.decode(3)
            await chain.run([(6, [40, 41, 42, 43])])
            await chain.decode(2)

        scenario(model, body)


def test_abort_after_precopy_leaves_the_old_layout_serving_untouched(model: Path) -> None:
    with launch(model, "4,4") as agents:
        a0, a1 = agents.agents
        grab = lambda agent, path="/info", body=None: asyncio.to_thread(call, agents, agent, path, body)  # noqa: E731

        async def body(chain: Chain) -> None:
            await start_serving(chain, agents)
            old = [await grab(a) for a in (a0, a1)]
            rid = "undo-1"
            seqs = {str(s): r for s, r in chain.reserve.items()}
            await grab(a1, "/reconfig/prepare", {"reconfig_id": rid, "epoch": 1, "layers": [3, 8], "sequences": seqs})
            sent = await grab(a0, "/reconfig/precopy", {"reconfig_id": rid, "target": a1.data_address, "layers": [3]})
            assert sent["blocks"] > 0
            assert (await grab(a1))["kv"]["used_blocks"] > old[1]["kv"]["used_blocks"]
            await chain.decode(1)
            assert (await grab(a1, "/reconfig/abort", {"reconfig_id": rid}))["dropped_layers"] == [3]
            await grab(a0, "/reconfig/abort", {"reconfig_id": rid})
            new = [await grab(a) for a in (a0, a1)]
            held = sum(blocks(n) for n in chain.lengths.values())
            for before, after, layers in zip(old, new, (4, 4), strict=True):
                assert after["layers"] == before["layers"] and after["epoch"] == 0 and after["reconfig"] is None
                assert after["loaded_layers"] == list(range(*before["layers"]))
                assert after["kv"]["used_blocks"] == layers * held
                assert after["kv"]["reserved_blocks"] == before["kv"]["reserved_blocks"]
                assert after["kv"]["total_blocks"] == before["kv"]["total_blocks"]
            # The aborted id cannot commit; serving continues exactly on the old chain.
            with pytest.raises(UserError, match=r"HTTP 409: .*already aborted"):
                await grab(a1, "/reconfig/commit", {"reconfig_id": rid, "epoch": 1, "layers": [3, 8],
                                                    "downstream": chain.address, "sequences": []})  # fmt: skip
            await chain.decode(3)

        scenario(model, body)


def test_commit_refuses_a_target_missing_the_final_delta(model: Path) -> None:
    with launch(model, "4,4") as agents:
        a0, a1 = agents.agents
        grab = lambda agent, path="/info", body=None: asyncio.to_thread(call, agents, agent, path, body)  # noqa: E731

        async def body(chain: Chain) -> None:
            await start_serving(chain, agents)
            rid = "stale-1"
            seqs = {str(s): r for s, r in chain.reserve.items()}
            await grab(a1, "/reconfig/prepare", {"reconfig_id": rid, "epoch": 1, "layers": [3, 8], "sequences": seqs})
            await grab(a0, "/reconfig/precopy", {"reconfig_id": rid, "target": a1.data_address, "layers": [3]})
            await chain.decode(1)
            with pytest.raises(UserError, match=r"HTTP 409: KV is incomplete"):
                await grab(a1, "/reconfig/commit", {"reconfig_id": rid, "epoch": 1, "layers": [3, 8],
                                                    "downstream": chain.address, "sequences": sorted(chain.lengths)})
            assert (await grab(a1))["layers"] == [4, 8]
            await chain.decode(1)

        scenario(model, body)


def test_a_joining_stage_prefaults_at_most_one_layers_share_of_its_pool(model: Path) -> None:
    """One sequence reserving almost a layer's share of the pool beside many short ones: padding every sequence
    to the widest would ask for workspaces many times the pool; prepare prefaults one layer's share instead."""
    with launch(model, "6,2") as extra:
        extra.process(0).terminate()
        joining = extra.agents[1]
        total = call(extra, joining, "/info")["kv"]["total_blocks"]
        share = total // 2  # layers 6 and 7
        short = {str(seq): BLOCK for seq in range(2, 21)}  # one block per layer each
        wide = (share - len(short) - 1) * BLOCK
        call(extra, joining, "/reconfig/prepare", {"reconfig_id": "wide-1", "epoch": 1, "layers": [6, 8],
                                                   "sequences": {"1": wide, **short}})  # fmt: skip
        kv = call(extra, joining, "/info")["kv"]
        assert (len(short) + 1) * blocks(wide) > 4 * share, "the cap must be what bites here"
        assert kv["workspace_bytes"] == 2 * share * kv["block_bytes"]


def test_a_warm_stage_touches_one_layers_share_at_start_and_prepare_keeps_it(model: Path) -> None:
    """`--warm` (how the local runner starts a stage a change adds): the read workspaces are sized and touched
    at start for one layer's share of the pool, the most a gather reads, so prepare has nothing left to touch."""
    with launch(model, "6,2", warm=True) as extra:
        joining = extra.agents[1]
        kv = call(extra, joining, "/info")["kv"]
        warmed = 2 * (kv["total_blocks"] // 2) * kv["block_bytes"]  # two workspaces; layers 6 and 7
        assert kv["workspace_bytes"] == warmed
        assert call(extra, extra.agents[0], "/info")["kv"]["workspace_bytes"] < warmed, "only warm stages touch"
        call(extra, joining, "/reconfig/prepare", {"reconfig_id": "warm-1", "epoch": 1, "layers": [6, 8],
                                                   "sequences": {"1": 3 * BLOCK, "2": 5 * BLOCK}})  # fmt: skip
        assert call(extra, joining, "/info")["kv"]["workspace_bytes"] == warmed
