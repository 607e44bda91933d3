"""The frontend's switch barrier on a live chain of stage processes: a hold stops every stream with
nothing in flight, requests arriving meanwhile wait, and a resume (old chain, or the same stages
re-wired at a new epoch) finishes every request with the tokens of the in-process engine (float64).
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch

from pipeshift.api import Layout
from pipeshift.local.processes import LocalAgents, start_agents
from pipeshift.runtime.frontend.background import BackgroundFrontend
from pipeshift.runtime.frontend.config import FrontendConfig
from pipeshift.runtime.frontend.served_model import ServedModel
from pipeshift.runtime.model.checkpoint import ModelDir
from pipeshift.runtime.model.make_model import make_model
from pipeshift.runtime.pipeline import Pipeline

LAYOUT = "2,2"
VOCAB = 300


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_model(tmp_path_factory.mktemp("barrier") / "tiny", layers=4, hidden=32, heads=4, kv_heads=2,
                      intermediate=64, vocab=VOCAB, seed=5, tie_embeddings=True)


@pytest.fixture(scope="module")
def agents(model_dir: Path) -> Iterator[LocalAgents]:
    with start_agents(model_dir, LAYOUT, dtype="float64", kv_bytes=1 << 20, threads=1) as running:
        yield running


@pytest.fixture(scope="module")
def server(model_dir: Path, agents: LocalAgents) -> Iterator[BackgroundFrontend]:
    config = FrontendConfig(model_dir=model_dir, port=0,
                            stages=tuple(f"{a.host}:{a.control_port}" for a in agents.agents))
    with BackgroundFrontend(config) as running:
        yield running


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Pipeline:
    return Pipeline(ModelDir(model_dir), Layout.parse(LAYOUT), dtype=torch.float64)


def greedy(reference: Pipeline, model_dir: Path, prompt: list[int], max_tokens: int) -> list[int]:
    eos = ServedModel.load(model_dir).config.eos_token_ids
    return reference.generate([prompt], max_tokens, stop_ids=eos)[0]


async def stream(session: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int,
                 arrivals: list[float]) -> tuple[list[int], str | None]:
    """The streamed token ids and finish reason; `arrivals` gets the loop time of each token."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "return_token_ids": True}
    tokens: list[int] = []
    finish = None
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            assert "error" not in event, event
            choice = event["choices"][0]
            tokens += choice.get("token_ids") or []
            arrivals.extend([asyncio.get_running_loop().time()] * len(choice.get("token_ids") or []))
            finish = choice.get("finish_reason") or finish
    return tokens, finish


async def control(session: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with session.post(url + path, json=body) as resp:
        return resp.status, await resp.json()


def requests(seed: int, n: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(2, VOCAB) for _ in range(rng.randint(2, 20))], rng.randint(24, 40)) for _ in range(n)]


def run_with_hold(server: BackgroundFrontend, resume_body: dict[str, Any], seed: int) -> dict[str, Any]:
    """Streams requests, holds once tokens flow, submits more while held, then resumes with `resume_body`."""
    early, late = requests(seed, 4), requests(seed + 1, 2)

    async def scenario() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as session:
            arrivals: list[list[float]] = [[] for _ in range(len(early) + len(late))]
            first = [asyncio.create_task(stream(session, server.url, p, n, arrivals[i]))
                     for i, (p, n) in enumerate(early)]
            while sum(map(len, arrivals)) < 8:
                await asyncio.sleep(0.01)
            status, held = await control(session, server.url, "/control/hold", {"request_id": "hold-" + str(seed)})
            held_at = loop.time()
            again = await control(session, server.url, "/control/hold", {"request_id": "hold-" + str(seed)})
            async with session.get(server.url + "/control/state") as resp:
                state = await resp.json()
            second = [asyncio.create_task(stream(session, server.url, p, n, arrivals[len(early) + i]))
                      for i, (p, n) in enumerate(late)]
            await asyncio.sleep(0.4)
            resumed_at = loop.time()
            resumed = await control(session, server.url, "/control/resume", resume_body)
            results = await asyncio.gather(*first, *second)
            return {"hold": (status, held), "hold_again": again, "state": state, "resume": resumed,
                    "results": results, "requests": early + late, "arrivals": arrivals,
                    "held_at": held_at, "resumed_at": resumed_at}

    return asyncio.run(scenario())


def check_outputs(outcome: dict[str, Any], reference: Pipeline, model_dir: Path) -> None:
    for (prompt, max_tokens), (tokens, finish) in zip(outcome["requests"], outcome["results"], strict=True):
        assert finish in ("stop", "length")
        assert tokens == greedy(reference, model_dir, prompt, max_tokens)


def test_a_hold_stops_every_stream_and_a_resume_on_the_old_chain_loses_nothing(
    server: BackgroundFrontend, reference: Pipeline, model_dir: Path
) -> None:
    outcome = run_with_hold(server, {"request_id": "resume-old"}, seed=1)
    status, held = outcome["hold"]
    assert status == 200, held
    assert held["held"] is True and held["in_flight"] == 0
    assert outcome["hold_again"] == (200, held)
    state = outcome["state"]
    assert state["gate"] == "held" and state["in_flight"] == []
    live = {str(seq) for seq in held["sequences"]}
    assert live and set(state["sequences"]) == live == set(held["reserve_tokens"])
    # Nothing may be computed between the hold's answer and the resume (tokens sampled before the answer
    # may still be on their way to the client for a moment).
    quiet_from = outcome["held_at"] + 0.1
    gap = [t for a in outcome["arrivals"] for t in a if quiet_from < t < outcome["resumed_at"]]
    assert gap == []
    assert outcome["resume"][0] == 200, outcome["resume"]
    check_outputs(outcome, reference, model_dir)


def test_a_resume_re_wires_the_given_stages_at_the_new_epoch(
    server: BackgroundFrontend, agents: LocalAgents, reference: Pipeline, model_dir: Path
) -> None:
    before = server.frontend.scheduler.epoch
    stages = [f"{a.host}:{a.control_port}" for a in agents.agents]
    outcome = run_with_hold(server, {"request_id": "resume-new", "stages": stages, "epoch": before + 1}, seed=7)
    status, answer = outcome["resume"]
    assert status == 200, answer
    assert answer["epoch"] == before + 1 and answer["stages"] == stages
    check_outputs(outcome, reference, model_dir)
    assert server.frontend.scheduler.mirror.reserved_blocks == [0, 0]


def test_switch_calls_are_refused_with_the_field_or_state_named(
    server: BackgroundFrontend, agents: LocalAgents
) -> None:
    stages = [f"{a.host}:{a.control_port}" for a in agents.agents]

    async def calls() -> list[tuple[int, Any]]:
        async with aiohttp.ClientSession() as session:
            return [
                await control(session, server.url, "/control/resume",
                              {"request_id": uuid.uuid4().hex, "stages": stages, "epoch": 9}),
                await control(session, server.url, "/control/resume", {"request_id": uuid.uuid4().hex, "epoch": -1}),
                await control(session, server.url, "/control/hold", {"timeout_s": 1}),
            ]

    not_held, bad_epoch, no_id = asyncio.run(calls())
    assert not_held[0] == 409 and "hold" in not_held[1]["error"]
    assert bad_epoch[0] == 400 and "epoch" in bad_epoch[1]["error"]
    assert no_id[0] == 400 and "request_id" in no_id[1]["error"]
    assert server.frontend.scheduler.epoch != 9
