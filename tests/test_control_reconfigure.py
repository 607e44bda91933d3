"""Live layout changes of a running pipeline (stage processes + frontend) while greedy requests stream:
every request finishes with the tokens of the in-process engine (float64), each agent ends up holding
exactly its new layers, and a change that fails before its commit leaves the old layout serving.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch

from pipeshift.api import Layout, StagePlan, plan_moves
from pipeshift.control import ReconfigReport, SwitchBudget, reconfigure
from pipeshift.local.processes import LocalAgents, http_json, start_agents
from pipeshift.runtime.frontend.background import BackgroundFrontend
from pipeshift.runtime.frontend.config import FrontendConfig
from pipeshift.runtime.frontend.served_model import ServedModel
from pipeshift.runtime.model.checkpoint import ModelDir
from pipeshift.runtime.model.make_model import make_model
from pipeshift.runtime.pipeline import Pipeline

VOCAB = 300
KV_BYTES = 8 << 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_model(tmp_path_factory.mktemp("reconfig") / "tiny", layers=8, hidden=32, heads=4, kv_heads=2,
                      intermediate=64, vocab=VOCAB, seed=13, tie_embeddings=True)


@pytest.fixture(scope="module")
def oracle(model_dir: Path) -> Callable[[list[int], int], list[int]]:
    engine = Pipeline(ModelDir(model_dir), Layout.parse("8"), dtype=torch.float64)
    eos = ServedModel.load(model_dir).config.eos_token_ids
    return lambda prompt, max_tokens: engine.generate([prompt], max_tokens, stop_ids=eos)[0]


class Pipeline4x4:
    """A `4,4` pipeline of agent processes behind a frontend, plus the agents a change starts."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.base = start_agents(model_dir, "4,4", dtype="float64", kv_bytes=KV_BYTES, threads=1)
        self.extra: dict[int, LocalAgents] = {}
        config = FrontendConfig(model_dir=model_dir, port=0,
                                stages=tuple(f"{a.host}:{a.control_port}" for a in self.base.agents))
        self.frontend = BackgroundFrontend(config)
        self.urls = {a.stage_id: a.control_url for a in self.base.agents}

    def start_stage(self, stage: StagePlan, kv_bytes: int = KV_BYTES) -> str:
        started = start_agents(self.model_dir, [stage], dtype="float64", kv_bytes=kv_bytes, threads=1)
        self.extra[stage.stage_id] = started
        self.urls[stage.stage_id] = started.agents[0].control_url
        return started.agents[0].control_url

    def stop_stage(self, stage_id: int) -> None:
        if stage_id in self.extra:
            self.extra.pop(stage_id).stop()
        else:
            self.base.process(stage_id).terminate()

    def stats(self, stage_id: int) -> dict[str, Any]:
        return http_json(self.urls[stage_id] + "/stats")[1]

    def info(self, stage_id: int) -> dict[str, Any]:
        return http_json(self.urls[stage_id] + "/info")[1]

    def close(self) -> None:
        self.frontend.stop()
        for agents in self.extra.values():
            agents.stop()
        self.base.stop()


@pytest.fixture
def pipeline(model_dir: Path) -> Iterator[Pipeline4x4]:
    running = Pipeline4x4(model_dir)
    try:
        yield running
    finally:
        running.close()


async def stream(session: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int,
                 seen: list[int]) -> tuple[list[int], str | None]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "return_token_ids": True}
    tokens: list[int] = []
    finish = None
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                event = json.loads(line[len("data: "):])
                assert "error" not in event, event
                choice = event["choices"][0]
                tokens += choice.get("token_ids") or []
                seen.append(len(choice.get("token_ids") or []))
                finish = choice.get("finish_reason") or finish
    return tokens, finish


def change_under_load(pipeline: Pipeline4x4, change: Callable[[], ReconfigReport], seed: int,
                      ) -> tuple[ReconfigReport, list[tuple[list[int], int]], list[tuple[list[int], str | None]]]:
    """Streams requests, runs `change` once tokens flow, streams more during it; waits for all. The first
    requests are long enough to outlive starting an added stage's process, so they span the switch."""
    rng = random.Random(seed)
    early = [([rng.randrange(2, VOCAB) for _ in range(rng.randint(3, 24))], rng.randint(250, 350)) for _ in range(6)]
    late = [([rng.randrange(2, VOCAB) for _ in range(rng.randint(3, 24))], rng.randint(60, 120)) for _ in range(4)]

    async def scenario() -> tuple[ReconfigReport, list[tuple[list[int], str | None]]]:
        url = pipeline.frontend.url
        seen: list[int] = []
        async with aiohttp.ClientSession() as session:
            first = [asyncio.create_task(stream(session, url, p, n, seen)) for p, n in early]
            while sum(seen) < 12:
                await asyncio.sleep(0.01)
            changing = asyncio.create_task(asyncio.to_thread(change))
            await asyncio.sleep(0.05)
            second = [asyncio.create_task(stream(session, url, p, n, seen)) for p, n in late]
            report = await changing
            return report, list(await asyncio.gather(*first, *second))

    report, results = asyncio.run(scenario())
    return report, early + late, results


def assert_all_match(requests: list[tuple[list[int], int]], results: list[tuple[list[int], str | None]],
                     oracle: Callable[[list[int], int], list[int]]) -> None:
    for (prompt, max_tokens), (tokens, finish) in zip(requests, results, strict=True):
        assert finish in ("stop", "length")
        assert tokens == oracle(prompt, max_tokens)


def assert_holds_exactly(pipeline: Pipeline4x4, layout: Layout) -> None:
    for stage in layout:
        stats = pipeline.stats(stage.stage_id)
        assert stats["loaded_layers"] == list(stage.layers()), (stage, stats["loaded_layers"])
        assert set(stats["kv_layers"]) <= set(stage.layers()), (stage, stats["kv_layers"])
        info = pipeline.info(stage.stage_id)
        assert info["layers"] == [stage.start, stage.end] and info["reconfig"] is None


@pytest.mark.parametrize("target", ["3,5", "3,3,2"])
def test_a_live_change_under_streaming_load_loses_nothing_and_changes_no_token(
    pipeline: Pipeline4x4, oracle: Callable[[list[int], int], list[int]], target: str
) -> None:
    plan = plan_moves(Layout.parse("4,4"), Layout.parse(target))
    report, requests, results = change_under_load(
        pipeline,
        lambda: reconfigure(pipeline.frontend.url, dict(pipeline.urls), plan,
                            start_stage=pipeline.start_stage, stop_stage=pipeline.stop_stage),
        seed=len(target),
    )
    assert report.outcome == "committed", report.error
    assert_all_match(requests, results, oracle)
    assert report.epoch == 1 and pipeline.frontend.frontend.scheduler.epoch == 1
    assert report.precopy_rounds >= 1 and report.kv_bytes_moved > 0
    assert 0 < report.pause_ms < report.switch_duration_ms
    assert_holds_exactly(pipeline, plan.new)
    state = http_json(pipeline.frontend.url + "/control/state")[1]
    assert state["reserved_blocks"] == [0] * len(plan.new) and state["gate"] == "open"


def test_a_change_that_fails_before_commit_leaves_the_old_layout_serving(
    pipeline: Pipeline4x4, oracle: Callable[[list[int], int], list[int]]
) -> None:
    """The added stage's pool is too small for the live sequences and may not grow: prepare fails."""
    plan = plan_moves(Layout.parse("4,4"), Layout.parse("3,3,2"))
    added = plan.added[0]
    report, requests, results = change_under_load(
        pipeline,
        lambda: reconfigure(pipeline.frontend.url, dict(pipeline.urls), plan,
                            start_stage=lambda s: pipeline.start_stage(s, kv_bytes=4096),
                            stop_stage=pipeline.stop_stage, budget=SwitchBudget(resize=False)),
        seed=3,
    )
    assert report.outcome == "aborted" and report.error
    assert_all_match(requests, results, oracle)
    assert added not in pipeline.extra
    assert_holds_exactly(pipeline, plan.old)
    assert [pipeline.info(s.stage_id)["epoch"] for s in plan.old] == [0, 0]
