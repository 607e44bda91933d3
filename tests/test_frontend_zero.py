"""The frontend with zero stages, over real agent processes: it holds requests (bounded: 429 past the queue,
503 past the wait), shows them in `pipeshift_requests_waiting_for_stages`, and serves them with exact greedy
output once `POST /control/recover` attaches a chain; `POST /control/scale-to-zero` lets a running chain go.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch

from pipeshift.api import Layout
from pipeshift.local.processes import LocalAgents, http_json, start_agents
from pipeshift.runtime.frontend.background import BackgroundFrontend
from pipeshift.runtime.frontend.config import FrontendConfig
from pipeshift.runtime.frontend.main import add_arguments, config_from
from pipeshift.runtime.frontend.served_model import ServedModel
from pipeshift.runtime.model.checkpoint import ModelDir
from pipeshift.runtime.pipeline import Pipeline

PROMPTS = [[5, 17, 42, 7], [9, 3, 250, 11, 12, 80]]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model_dir(model_factory: Callable[..., Path]) -> Path:
    return model_factory(layers=4, hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=300, seed=21)


@pytest.fixture(scope="module")
def oracle(model_dir: Path) -> Callable[[list[int], int], list[int]]:
    engine = Pipeline(ModelDir(model_dir), Layout.parse("4"), dtype=torch.float64)
    eos = ServedModel.load(model_dir).config.eos_token_ids
    return lambda prompt, max_tokens: engine.generate([prompt], max_tokens, stop_ids=eos)[0]


def chain(agents: LocalAgents) -> list[str]:
    return [f"{a.host}:{a.control_port}" for a in agents.agents]


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not exported")


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


async def complete(session: aiohttp.ClientSession, url: str, prompt: list[int], stream: bool) -> tuple[int, Any]:
    """(status, token ids) of a greedy request; (status, {headers, body}) when it was refused."""
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True,
            "stream": stream}
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            return resp.status, {"retry_after": resp.headers.get("Retry-After"), "body": await resp.json()}
        if not stream:
            return 200, (await resp.json())["choices"][0]["token_ids"]
        tokens: list[int] = []
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                event = json.loads(line[len("data: "):])
                assert "error" not in event, event
                tokens += event["choices"][0].get("token_ids") or []
        return 200, tokens


def in_background(coro_factory: Callable[[aiohttp.ClientSession], Any]) -> tuple[asyncio.AbstractEventLoop, Any]:
    """Run a client coroutine on its own loop in a thread; returns (loop, concurrent future)."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def run() -> Any:
        async with aiohttp.ClientSession() as session:
            return await coro_factory(session)

    return loop, asyncio.run_coroutine_threadsafe(run(), loop)


def recover(url: str, stages: list[str], request_id: str) -> dict[str, Any]:
    status, answer = http_json(url + "/control/recover", "POST", {"request_id": request_id, "stages": stages})
    assert status == 200, answer
    return answer


def test_a_frontend_started_at_zero_holds_requests_then_serves_them_exactly_once_stages_attach(
    model_dir: Path, oracle: Callable[[list[int], int], list[int]]
) -> None:
    config = FrontendConfig(model_dir=model_dir, stages=(), port=0, max_queue=2, zero_wait_timeout_s=120.0)
    with BackgroundFrontend(config) as frontend:
        url = frontend.url
        status, health = http_json(url + "/health")
        assert (status, health["status"]) == (200, "zero")
        assert metric(url, "pipeshift_requests_waiting_for_stages") == 0

        loop, held = in_background(lambda s: asyncio.gather(complete(s, url, PROMPTS[0], True),
                                                            complete(s, url, PROMPTS[1], False)))
        wait_until(lambda: metric(url, "pipeshift_requests_waiting_for_stages") == 2, "2 held requests")

        # The queue bound holds at zero too: a third request is refused with Retry-After.
        status, refused = asyncio.run(_one(url, PROMPTS[0], False))
        assert status == 429 and refused["retry_after"] is not None, refused

        with start_agents(model_dir, "2,2", kv_bytes=1 << 20, threads=1) as agents:
            answer = recover(url, chain(agents), "attach-1")
            assert answer["recovered"] is True and answer["stages"] == chain(agents)
            results = held.result(60)
            assert results == [(200, oracle(p, MAX_TOKENS)) for p in PROMPTS]
            assert metric(url, "pipeshift_requests_waiting_for_stages") == 0
            status, health = http_json(url + "/health")
            assert (status, health["status"]) == (200, "ok")

            # Scale to zero and back: the running chain is let go, a request waits, new stages serve it.
            status, answer = http_json(url + "/control/scale-to-zero", "POST", {"request_id": "zero-1"})
            assert status == 200 and answer["scaled_to_zero"] is True, answer
        loop.call_soon_threadsafe(loop.stop)

        assert http_json(url + "/health")[1]["status"] == "zero"
        loop, held = in_background(lambda s: complete(s, url, PROMPTS[1], True))
        wait_until(lambda: metric(url, "pipeshift_requests_waiting_for_stages") == 1, "1 held request")
        with start_agents(model_dir, "1,3", kv_bytes=1 << 20, threads=1) as agents:
            recover(url, chain(agents), "attach-2")
            assert held.result(60) == (200, oracle(PROMPTS[1], MAX_TOKENS))
            # Ordinary serving afterwards, through the new chain.
            assert asyncio.run(_one(url, PROMPTS[0], False)) == (200, oracle(PROMPTS[0], MAX_TOKENS))
        loop.call_soon_threadsafe(loop.stop)


def test_a_request_waiting_longer_than_the_zero_wait_timeout_gets_503_with_retry_after(model_dir: Path) -> None:
    config = FrontendConfig(model_dir=model_dir, stages=(), port=0, zero_wait_timeout_s=0.5)
    with BackgroundFrontend(config) as frontend:
        started = time.monotonic()
        plain, streamed = asyncio.run(_both(frontend.url, PROMPTS[0]))
        for status, refused in (plain, streamed):
            assert status == 503, refused
            assert int(refused["retry_after"]) > 0
            assert "scaled to zero" in refused["body"]["error"]["message"]
        assert time.monotonic() - started >= 0.5
        assert metric(frontend.url, "pipeshift_requests_waiting_for_stages") == 0
        assert metric(frontend.url, 'pipeshift_requests_total{outcome="error"}') == 2


def test_the_frontend_cli_accepts_an_empty_stage_list_as_zero() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from(parser.parse_args(["--model", "m"]), {"PIPESHIFT_FRONTEND_STAGES": "",
                                                               "PIPESHIFT_FRONTEND_ZERO_WAIT_TIMEOUT": "7"})
    assert config.stages == () and config.zero_wait_timeout_s == 7.0
    with pytest.raises(Exception, match="--stages is required"):
        config_from(parser.parse_args(["--model", "m"]), {})
    with pytest.raises(Exception, match="zero_wait_timeout_s must be positive"):
        config_from(parser.parse_args(["--model", "m", "--stages", "", "--zero-wait-timeout", "0"]), {})


async def _one(url: str, prompt: list[int], stream: bool) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        return await complete(session, url, prompt, stream)


async def _both(url: str, prompt: list[int]) -> list[tuple[int, Any]]:
    async with aiohttp.ClientSession() as session:
        return list(await asyncio.gather(complete(session, url, prompt, False), complete(session, url, prompt, True)))
