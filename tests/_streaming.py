"""Test helpers for changes under load: greedy requests streamed over real HTTP while a change runs in a thread,
their progress visible to a `before_hold` hook, and the checks every live-change test makes afterwards.

Requests ignore EOS, so each streams exactly `max_tokens` tokens and the in-process float64 engine (no stop
ids) is the oracle for every one of them.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import torch

from pipeshift.api import Layout, StagePlan
from pipeshift.control import ReconfigReport, tokens_recomputed
from pipeshift.local.processes import LocalAgents, http_json, start_agents
from pipeshift.runtime.frontend.background import BackgroundFrontend
from pipeshift.runtime.frontend.config import FrontendConfig
from pipeshift.runtime.frontend.served_model import ServedModel
from pipeshift.runtime.model.checkpoint import ModelDir
from pipeshift.runtime.pipeline import Pipeline

T = TypeVar("T")
HOOK_TIMEOUT_S = 60.0
# The tokens, the finish reason and the arrival time of each token of one greedy request.
Result = tuple[list[int], str | None, list[float]]
Requests = list[tuple[list[int], int]]


@dataclass
class Streamed:
    """One request and what its client has seen so far (updated while it streams)."""

    prompt: list[int]
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # time.time() of each token's arrival
    finish: str | None = None
    error: str | None = None

    @property
    def remaining(self) -> int:
        return self.max_tokens - len(self.tokens)


async def stream(session: aiohttp.ClientSession, url: str, request: Streamed, token: str | None = None) -> None:
    body = {"prompt": request.prompt, "max_tokens": request.max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    try:
        async with session.post(url + "/v1/completions", json=body) as response:
            if response.status != 200:
                request.error = f"HTTP {response.status}: {await response.text()}"
                return
            async for raw in response.content:
                if not raw.startswith(b"data: {"):
                    continue
                event = json.loads(raw[len(b"data: "):])
                if "error" in event:
                    request.error = str(event["error"])
                    return
                choice = event["choices"][0]
                got = choice.get("token_ids") or []
                request.tokens += got
                request.times += [time.time()] * len(got)
                request.finish = choice.get("finish_reason") or request.finish
    except aiohttp.ClientError as error:
        request.error = str(error)


def under_load(url: str, change: Callable[[list[Streamed]], T], rng: random.Random, vocab: int, *,
               long: int = 4, long_tokens: tuple[int, int] = (150, 250), short_tokens: tuple[int, int] = (30, 80),
               every_s: float = 0.1) -> tuple[T, list[Streamed]]:
    """Starts `long` long requests, runs `change(requests)` in a thread once tokens flow, and starts a short
    request every `every_s` while it runs (so requests arrive before, during and after each phase); returns
    its result and every request, all finished."""

    def draw(tokens: tuple[int, int]) -> Streamed:
        return Streamed([rng.randrange(2, vocab) for _ in range(rng.randint(3, 24))], rng.randint(*tokens))

    requests = [draw(long_tokens) for _ in range(long)]

    async def scenario() -> T:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            tasks = [asyncio.create_task(stream(session, url, r)) for r in requests]
            while sum(len(r.tokens) for r in requests) < 2 * long:
                await asyncio.sleep(0.01)
            changing = asyncio.create_task(asyncio.to_thread(change, requests))
            while not changing.done():
                await asyncio.sleep(every_s)
                requests.append(draw(short_tokens))
                tasks.append(asyncio.create_task(stream(session, url, requests[-1])))
            result = await changing
            await asyncio.gather(*tasks)
            return result

    return asyncio.run(scenario()), requests


def streaming(requests: list[Streamed], at_least: int, min_remaining: int = 4) -> Callable[[], None]:
    """A `before_hold` hook: wait until `at_least` requests have streamed a token and still have `min_remaining`
    to go, so they stream across the switch (nothing is generated while serving is held)."""

    def wait() -> None:
        deadline = time.monotonic() + HOOK_TIMEOUT_S
        while sum(1 for r in list(requests) if r.tokens and r.remaining >= min_remaining) < at_least:
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than {at_least} requests were streaming within {HOOK_TIMEOUT_S}s")
            time.sleep(0.002)

    return wait


def spanning(requests: list[Streamed], report: ReconfigReport) -> int:
    """Requests that streamed a token before serving was held and another after it resumed."""
    assert report.held_unix is not None and report.resumed_unix is not None, report
    return sum(1 for r in requests if r.times and r.times[0] < report.held_unix and r.times[-1] > report.resumed_unix)


def live_kv_lower_bound(requests: list[Streamed], report: ReconfigReport, moved_layers: int, block_size: int,
                        block_bytes: int) -> int:
    """From the client side alone: a request streaming across the switch held KV for at least its prompt and all
    but the last token it had seen before the hold, in every moved layer."""
    assert report.held_unix is not None and report.resumed_unix is not None
    total = 0
    for r in requests:
        before = sum(1 for t in r.times if t < report.held_unix)
        if before and r.times[-1] > report.resumed_unix:
            total += math.ceil((len(r.prompt) + before - 1) / block_size) * block_bytes * moved_layers
    return total


class Oracle:
    """Greedy tokens of the in-process engine in float64, all layers in one process, EOS ignored."""

    def __init__(self, model_dir: Path) -> None:
        model = ModelDir(model_dir)
        self.engine = Pipeline(model, Layout.parse(str(model.config.num_layers)), dtype=torch.float64)

    def __call__(self, prompt: list[int], max_tokens: int) -> list[int]:
        return self.engine.generate([prompt], max_tokens)[0]

    def many(self, requests: list[Streamed]) -> list[list[int]]:
        """All at once (without stop ids a shorter request's tokens are a prefix of a longer run's)."""
        longest = max(r.max_tokens for r in requests)
        outputs = self.engine.generate([r.prompt for r in requests], longest)
        return [out[: r.max_tokens] for r, out in zip(requests, outputs, strict=True)]


def oracle(model_dir: Path) -> Oracle:
    return Oracle(model_dir)


def assert_exact(requests: list[Streamed], expected: Oracle) -> None:
    """Nothing lost (every request ends with `length`) and every token equal to the oracle's."""
    for r in requests:
        assert r.error is None and r.finish == "length", (r.error, r.finish, len(r.tokens), r.max_tokens)
    for r, tokens in zip(requests, expected.many(requests), strict=True):
        assert r.tokens == tokens, (r.prompt, r.max_tokens)


def stats(url: str, token: str | None = None) -> dict[str, Any]:
    status, answer = http_json(url + "/stats", token=token)
    assert status == 200, answer
    return answer


def assert_holds_exactly(urls: dict[int, str], layout: Layout, token: str | None = None) -> None:
    """Each stage of `layout` holds the weights of exactly its layers, KV of no other layer, and no change."""
    assert set(urls) == {s.stage_id for s in layout}, (urls, layout)
    for stage in layout:
        held = stats(urls[stage.stage_id], token)
        assert held["loaded_layers"] == list(stage.layers()), (stage, held["loaded_layers"])
        assert set(held["kv_layers"]) <= set(stage.layers()), (stage, held["kv_layers"])
        info = http_json(urls[stage.stage_id] + "/info", token=token)[1]
        assert info["layers"] == [stage.start, stage.end] and info["reconfig"] is None, info


def recomputed(urls: list[str], reports: list[ReconfigReport], requests: list[Streamed], num_layers: int,
               token: str | None = None) -> int:
    """The agents' (position, layer) counters (removed stages' read before they stopped) minus what the
    requests needed."""
    counted = [int(stats(url, token)["layer_tokens_computed"]) for url in urls]
    counted += [int(s["layer_tokens_computed"]) for report in reports for s in report.departed_stats.values()]
    return tokens_recomputed(counted, [(len(r.prompt), len(r.tokens)) for r in requests], num_layers)


async def stream_tokens(session: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int,
                        seen: list[int] | None = None, clock: Callable[[], float] = time.time) -> Result:
    """A greedy request that may stop at EOS: its tokens, finish reason and the `clock()` arrival time of each
    token; an error status or event fails the test. Appends each event's token count to `seen` (so a caller
    can wait until tokens flow)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "return_token_ids": True}
    tokens: list[int] = []
    arrived: list[float] = []
    finish = None
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                event = json.loads(line[len("data: "):])
                assert "error" not in event, event
                choice = event["choices"][0]
                got = choice.get("token_ids") or []
                tokens += got
                arrived += [clock()] * len(got)
                if seen is not None:
                    seen.append(len(got))
                finish = choice.get("finish_reason") or finish
    return tokens, finish, arrived


def eos_oracle(model_dir: Path) -> Callable[[list[int], int], list[int]]:
    """Greedy tokens of the in-process engine in float64, all layers in one process, stopping at EOS."""
    model = ModelDir(model_dir)
    engine = Pipeline(model, Layout.parse(str(model.config.num_layers)), dtype=torch.float64)
    eos = ServedModel.load(model_dir).config.eos_token_ids
    return lambda prompt, max_tokens: engine.generate([prompt], max_tokens, stop_ids=eos)[0]


def assert_all_match(requests: Requests, results: list[Result], oracle: Callable[[list[int], int], list[int]]) -> None:
    """Every request ended (`stop` or `length`) with exactly the oracle's tokens."""
    for (prompt, max_tokens), (tokens, finish, _) in zip(requests, results, strict=True):
        assert finish in ("stop", "length")
        assert tokens == oracle(prompt, max_tokens)


class AgentsBehindFrontend:
    """float64 agent processes for `layout` behind an in-process frontend, plus the agents a change starts."""

    def __init__(self, model_dir: Path, layout: str, kv_bytes: int) -> None:
        self.model_dir, self.kv_bytes = model_dir, kv_bytes
        self.base = start_agents(model_dir, layout, dtype="float64", kv_bytes=kv_bytes, threads=1)
        self.extra: dict[int, LocalAgents] = {}
        self.urls = {a.stage_id: a.control_url for a in self.base.agents}
        config = FrontendConfig(model_dir=model_dir, port=0,
                                stages=tuple(f"{a.host}:{a.control_port}" for a in self.base.agents))
        self.frontend = BackgroundFrontend(config)

    def start_stage(self, stage: StagePlan, kv_bytes: int | None = None) -> str:
        """The orchestrator's callback for a stage it adds (with this pipeline's KV budget unless given)."""
        budget = self.kv_bytes if kv_bytes is None else kv_bytes
        started = start_agents(self.model_dir, [stage], dtype="float64", kv_bytes=budget, threads=1)
        self.extra[stage.stage_id] = started
        self.urls[stage.stage_id] = started.agents[0].control_url
        return self.urls[stage.stage_id]

    def stop_stage(self, stage_id: int) -> None:
        if stage_id in self.extra:
            self.extra.pop(stage_id).stop()
        else:
            self.base.process(stage_id).terminate()

    def get(self, stage_id: int, path: str) -> dict[str, Any]:
        return http_json(self.urls[stage_id] + path)[1]

    def stats(self, stage_id: int) -> dict[str, Any]:
        return self.get(stage_id, "/stats")

    def info(self, stage_id: int) -> dict[str, Any]:
        return self.get(stage_id, "/info")

    def recomputed(self, report: ReconfigReport, requests: Requests, results: list[Result], stage_ids: list[int],
                   num_layers: int) -> int:
        """(position, layer) pairs computed more than the requests needed, by the stages `stage_ids` and the
        stages the change removed (their counters read before they stopped)."""
        counted = [self.stats(sid)["layer_tokens_computed"] for sid in stage_ids]
        counted += [stats["layer_tokens_computed"] for stats in report.departed_stats.values()]
        lengths = [(len(prompt), len(tokens)) for (prompt, _), (tokens, _, _) in zip(requests, results, strict=True)]
        return tokens_recomputed(counted, lengths, num_layers)

    def close(self) -> None:
        self.frontend.stop()
        for agents in self.extra.values():
            agents.stop()
        self.base.stop()
