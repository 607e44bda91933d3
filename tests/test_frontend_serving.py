"""Serving through three stage processes: concurrent greedy requests equal the in-process engine
(float64), the waiting queue's bound answers 429, and a client that disconnects frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch

from pipeshift.api import Layout
from pipeshift.local.processes import LocalAgents, http_json, start_agents
from pipeshift.runtime.frontend.background import BackgroundFrontend
from pipeshift.runtime.frontend.config import FrontendConfig
from pipeshift.runtime.frontend.served_model import ServedModel
from pipeshift.runtime.model.checkpoint import ModelDir
from pipeshift.runtime.pipeline import Pipeline

LAYOUT = "2,1,2"
VOCAB = 400
QUEUE = 16


@pytest.fixture(scope="module")
def model_dir(model_factory: Callable[..., Path]) -> Path:
    return model_factory(layers=5, hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=VOCAB, seed=21,
                         tie_embeddings=True)


@pytest.fixture(scope="module")
def agents(model_dir: Path) -> Iterator[LocalAgents]:
    with start_agents(model_dir, LAYOUT, dtype="float64", kv_bytes=1 << 20, threads=1) as running:
        yield running


@pytest.fixture(scope="module")
def server(model_dir: Path, agents: LocalAgents) -> Iterator[BackgroundFrontend]:
    config = FrontendConfig(
        model_dir=model_dir,
        port=0,
        max_queue=QUEUE,
        stages=tuple(f"{a.host}:{a.control_port}" for a in agents.agents),
    )
    with BackgroundFrontend(config) as running:
        yield running


def reserved_blocks(agents: LocalAgents) -> list[int]:
    return [http_json(a.control_url + "/info")[1]["kv"]["reserved_blocks"] for a in agents.agents]


def wait_for(condition: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


async def complete(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, Any, str | None]:
    async with session.post(url + "/v1/completions", json=body) as resp:
        return resp.status, await resp.json(), resp.headers.get("Retry-After")


def test_concurrent_greedy_requests_of_different_lengths_equal_the_engine(
    server: BackgroundFrontend, model_dir: Path
) -> None:
    rng = random.Random(4)
    requests = [
        ([rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 60))], rng.randint(1, 24))
        for _ in range(QUEUE)
    ]

    async def run_all() -> list[tuple[int, Any, str | None]]:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(
                *(
                    complete(
                        session,
                        server.url,
                        {"prompt": p, "max_tokens": n, "temperature": 0, "return_token_ids": True},
                    )
                    for p, n in requests
                )
            )

    results = asyncio.run(run_all())
    served = ServedModel.load(model_dir)
    engine = Pipeline(ModelDir(model_dir), Layout.parse(LAYOUT), dtype=torch.float64)
    eos = served.config.eos_token_ids
    for (prompt, max_tokens), (status, body, _) in zip(requests, results, strict=True):
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == engine.generate([prompt], max_tokens, stop_ids=eos)[0]


def test_beyond_the_queue_bound_requests_get_429_and_disconnects_free_every_block(
    server: BackgroundFrontend, agents: LocalAgents
) -> None:
    """Each request reserves a third of stage 0's pool, so three run, QUEUE wait and the rest are refused;
    then every client goes away, and the agents must end with nothing reserved."""
    stage0 = server.frontend.scheduler.mirror.stages[0]
    tokens = stage0.total_blocks // 3 // stage0.num_layers * stage0.block_size
    body = {"prompt": [7] * 8, "max_tokens": tokens - 8, "temperature": 0, "ignore_eos": True}
    flood = QUEUE + 12

    async def run() -> list[tuple[int, Any, str | None]]:
        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(complete(session, server.url, body)) for _ in range(flood)]
            done: list[tuple[int, Any, str | None]] = []
            while len(done) < flood - 3 - QUEUE:
                finished, _ = await asyncio.wait(
                    [t for t in tasks if not t.done()] or tasks,
                    timeout=30,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                assert finished, "no answer within 30 s"
                done = [t.result() for t in tasks if t.done()]
            assert reserved_blocks(agents)[0] > 0
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return done

    refused = asyncio.run(run())
    assert len(refused) == flood - 3 - QUEUE
    for status, answer, retry_after in refused:
        assert status == 429 and retry_after is not None and int(retry_after) >= 1
        assert "queue is full" in answer["error"]["message"]
    assert wait_for(lambda: reserved_blocks(agents) == [0, 0, 0]), reserved_blocks(agents)


def test_a_streaming_client_that_disconnects_frees_its_blocks(
    server: BackgroundFrontend, agents: LocalAgents
) -> None:
    async def read_one_token_then_leave() -> dict[str, Any]:
        async with aiohttp.ClientSession() as session:
            body = {
                "prompt": "Once",
                "max_tokens": 1500,
                "stream": True,
                "ignore_eos": True,
                "temperature": 0,
            }
            async with session.post(server.url + "/v1/completions", json=body) as resp:
                line = b""
                while not line.startswith(b"data: "):
                    line = await resp.content.readline()
                return json.loads(line.removeprefix(b"data: "))

    first = asyncio.run(read_one_token_then_leave())
    assert first["choices"][0]["finish_reason"] is None
    assert wait_for(lambda: reserved_blocks(agents) == [0, 0, 0]), reserved_blocks(agents)
    state = server.frontend.control_state()
    assert state["running"] == 0 and state["waiting"] == 0
