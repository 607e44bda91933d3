"""A stage that stalls or dies mid-request: requests end with a clear error instead of hanging, /health
and `pipeshift_stage_up` name the stage, and a stage that answers again is served through again.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pipeshift.local.processes import LocalAgents, http_json, start_agents
from pipeshift.runtime.frontend.background import BackgroundFrontend
from pipeshift.runtime.frontend.config import FrontendConfig

STEP_TIMEOUT_S = 1.5
LONG = {"prompt": "Once upon", "max_tokens": 1800, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def model_dir(model_factory: Callable[..., Path]) -> Path:
    return model_factory(layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=300, seed=8)


@pytest.fixture(scope="module")
def agents(model_dir: Path) -> Iterator[LocalAgents]:
    with start_agents(model_dir, "1,1", kv_bytes=1 << 20, threads=1) as running:
        yield running


@pytest.fixture(scope="module")
def server(model_dir: Path, agents: LocalAgents) -> Iterator[BackgroundFrontend]:
    # Health checks are rare here, so it is the step timeout that notices a stage stopped answering.
    config = FrontendConfig(
        model_dir=model_dir,
        port=0,
        step_timeout_s=STEP_TIMEOUT_S,
        health_interval_s=60.0,
        stages=tuple(f"{a.host}:{a.control_port}" for a in agents.agents),
    )
    with BackgroundFrontend(config) as running:
        yield running


async def stream_and_plain_during(
    server: BackgroundFrontend, fault: Any
) -> tuple[list[Any], int, Any, float]:
    """A streaming and a plain request in flight when `fault()` strikes; what each got, and how fast."""
    async with aiohttp.ClientSession() as session:
        plain = asyncio.create_task(session.post(server.url + "/v1/completions", json=LONG))
        async with session.post(server.url + "/v1/completions", json=LONG | {"stream": True}) as resp:
            events = [json.loads((await resp.content.readline()).removeprefix(b"data: "))]
            fault()
            struck = time.monotonic()
            async for line in resp.content:
                if line.startswith(b"data: "):
                    data = line.removeprefix(b"data: ").strip()
                    events.append(data.decode() if data == b"[DONE]" else json.loads(data))
        answer = await asyncio.wait_for(plain, 30)
        return events, answer.status, await answer.json(), time.monotonic() - struck


async def fetch(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if resp.content_type == "application/json" else text


def assert_failed_clearly(events: list[Any], status: int, answer: Any, elapsed: float) -> None:
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1, events[-3:]
    message = errors[0]["error"]["message"]
    assert "stage pipeline failed" in message and f"did not return within {STEP_TIMEOUT_S}s" in message
    assert "stage 1 not answering" in message
    assert events[-1] == "[DONE]"
    assert status == 503 and "stage 1" in answer["error"]["message"]
    assert elapsed < 10, f"the failure took {elapsed:.1f}s to reach the clients"


def test_a_stalled_stage_fails_its_requests_and_serving_resumes_when_it_answers(
    server: BackgroundFrontend, agents: LocalAgents
) -> None:
    stage1 = agents.process(1)
    try:
        result = asyncio.run(stream_and_plain_during(server, lambda: stage1.send_signal(signal.SIGSTOP)))
        assert_failed_clearly(*result)
        status, health = asyncio.run(fetch(server.url + "/health"))
        assert status == 503 and [s["up"] for s in health["stages"]] == [True, False]
    finally:
        stage1.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 20
    while asyncio.run(fetch(server.url + "/health"))[0] != 200:
        assert time.monotonic() < deadline, "the frontend did not resume after the stage answered again"
        time.sleep(0.1)

    async def short() -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session:
            body = {"prompt": "Hi", "max_tokens": 5, "ignore_eos": True, "temperature": 0}
            async with session.post(server.url + "/v1/completions", json=body) as resp:
                return resp.status, await resp.json()

    status, answer = asyncio.run(short())
    assert status == 200 and answer["usage"]["completion_tokens"] == 5

    # The failed requests' reservations were released in band once batches flowed again.
    def reserved() -> list[int]:
        return [http_json(a.control_url + "/info")[1]["kv"]["reserved_blocks"] for a in agents.agents]

    deadline = time.monotonic() + 10
    while reserved() != [0, 0]:
        assert time.monotonic() < deadline, f"blocks still reserved: {reserved()}"
        time.sleep(0.05)


def test_a_killed_stage_fails_its_requests_and_is_reported_down(
    server: BackgroundFrontend, agents: LocalAgents
) -> None:
    result = asyncio.run(stream_and_plain_during(server, agents.process(1).kill))
    assert_failed_clearly(*result)
    status, health = asyncio.run(fetch(server.url + "/health"))
    assert status == 503 and health["status"] == "degraded"
    assert [s["up"] for s in health["stages"]] == [True, False]
    _, metrics = asyncio.run(fetch(server.url + "/metrics"))
    assert 'pipeshift_stage_up{stage="0"} 1.0' in metrics and 'pipeshift_stage_up{stage="1"} 0.0' in metrics

    async def refused() -> tuple[int, Any, float]:
        started = time.monotonic()
        async with (
            aiohttp.ClientSession() as session,
            session.post(server.url + "/v1/completions", json={"prompt": "Hi"}) as resp,
        ):
            return resp.status, await resp.json(), time.monotonic() - started

    status, answer, elapsed = asyncio.run(refused())
    assert status == 503 and "stage 1" in answer["error"]["message"] and elapsed < 2
