"""Live layout changes of a running pipeline (stage processes + frontend) while greedy requests stream:
every request finishes with the tokens of the in-process engine (float64), each agent ends up holding
exactly its new layers, no (position, layer) is computed twice by any strategy, and a change that fails
before its commit leaves the old layout serving.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import torch
from _streaming import AgentsBehindFrontend, Result, assert_all_match, eos_oracle, stream_tokens

from pipeshift.api import Layout, plan_moves
from pipeshift.control import ReconfigReport, SwitchBudget, reconfigure
from pipeshift.errors import UserError
from pipeshift.local.processes import http_json
from pipeshift.runtime.model.make_model import make_model

VOCAB = 300
LAYERS = 8
KV_BYTES = 8 << 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_model(tmp_path_factory.mktemp("reconfig") / "tiny", layers=LAYERS, hidden=32, heads=4, kv_heads=2,
                      intermediate=64, vocab=VOCAB, seed=13, tie_embeddings=True)


@pytest.fixture(scope="module")
def oracle(model_dir: Path) -> Callable[[list[int], int], list[int]]:
    return eos_oracle(model_dir)


class Pipeline4x4(AgentsBehindFrontend):
    """A `4,4` pipeline of agent processes behind a frontend, plus the agents a change starts."""

    def __init__(self, model_dir: Path) -> None:
        super().__init__(model_dir, "4,4", KV_BYTES)


@pytest.fixture
def pipeline(model_dir: Path) -> Iterator[Pipeline4x4]:
    running = Pipeline4x4(model_dir)
    try:
        yield running
    finally:
        running.close()


def change_under_load(pipeline: Pipeline4x4, change: Callable[[], ReconfigReport], seed: int,
                      ) -> tuple[ReconfigReport, list[tuple[list[int], int]], list[Result]]:
    """Streams requests, runs `change` once tokens flow, and keeps starting short ones every few tenths of a
    second while it runs, so that some request spans the switch however long an added stage takes to
    start; waits for all."""
    rng = random.Random(seed)

    def draw(shortest: int, longest: int) -> tuple[list[int], int]:
        return [rng.randrange(2, VOCAB) for _ in range(rng.randint(3, 24))], rng.randint(shortest, longest)

    requests = [draw(250, 350) for _ in range(6)]

    async def scenario() -> tuple[ReconfigReport, list[Result]]:
        url = pipeline.frontend.url
        seen: list[int] = []
        async with aiohttp.ClientSession() as session:
            streams = [asyncio.create_task(stream_tokens(session, url, p, n, seen)) for p, n in requests]
            while sum(seen) < 12:
                await asyncio.sleep(0.01)
            changing = asyncio.create_task(asyncio.to_thread(change))
            while not changing.done():
                await asyncio.sleep(0.05 if len(requests) == 6 else 0.3)
                requests.append(draw(40, 90))
                streams.append(asyncio.create_task(stream_tokens(session, url, *requests[-1], seen)))
            report = await changing
            return report, list(await asyncio.gather(*streams))

    report, results = asyncio.run(scenario())
    return report, requests, results


def assert_holds_exactly(pipeline: Pipeline4x4, layout: Layout) -> None:
    for stage in layout:
        stats = pipeline.stats(stage.stage_id)
        assert stats["loaded_layers"] == list(stage.layers()), (stage, stats["loaded_layers"])
        assert set(stats["kv_layers"]) <= set(stage.layers()), (stage, stats["kv_layers"])
        info = pipeline.info(stage.stage_id)
        assert info["layers"] == [stage.start, stage.end] and info["reconfig"] is None


def recomputed(pipeline: Pipeline4x4, report: ReconfigReport, requests: list[tuple[list[int], int]],
               results: list[Result], stage_ids: list[int]) -> int:
    return pipeline.recomputed(report, requests, results, stage_ids, LAYERS)


def live_kv_bytes_at_switch(pipeline: Pipeline4x4, report: ReconfigReport, requests: list[tuple[list[int], int]],
                            results: list[Result], moved_layers: int) -> int:
    """A lower bound from the client side alone: a request that streamed before the hold and after the resume
    was live across the switch, holding KV for at least its prompt and all but the last token it had seen."""
    assert report.held_unix is not None and report.resumed_unix is not None
    info = pipeline.info(0)
    block_size, block_bytes = info["block_size"], info["kv"]["block_bytes"]
    total = 0
    for (prompt, _), (_, _, arrived) in zip(requests, results, strict=True):
        before = sum(1 for t in arrived if t < report.held_unix)
        if before and arrived[-1] > report.resumed_unix:
            total += math.ceil((len(prompt) + before - 1) / block_size) * block_bytes * moved_layers
    return total


def pool_sizes(pipeline: Pipeline4x4, stage_ids: list[int]) -> list[int]:
    return [pipeline.info(sid)["kv"]["total_blocks"] for sid in stage_ids]


@pytest.mark.parametrize(
    ("target", "strategy"), [("3,5", "live"), ("3,3,2", "live"), ("3,3,2", "stop-copy"), ("3,5", "live-no-resize")]
)
def test_a_change_under_streaming_load_loses_nothing_changes_no_token_and_recomputes_nothing(
    pipeline: Pipeline4x4, oracle: Callable[[list[int], int], list[int]], target: str, strategy: str
) -> None:
    plan = plan_moves(Layout.parse("4,4"), Layout.parse(target))
    old_pools = pool_sizes(pipeline, [s.stage_id for s in plan.old])
    report, requests, results = change_under_load(
        pipeline,
        lambda: reconfigure(pipeline.frontend.url, dict(pipeline.urls), plan, start_stage=pipeline.start_stage,
                            stop_stage=pipeline.stop_stage, strategy=strategy),
        seed=len(target),
    )
    assert report.outcome == "committed", report.error
    assert report.strategy == strategy
    assert_all_match(requests, results, oracle)
    assert report.epoch == 1 and pipeline.frontend.frontend.scheduler.epoch == 1
    assert 0 < report.pause_ms < report.switch_duration_ms
    assert_holds_exactly(pipeline, plan.new)
    state = http_json(pipeline.frontend.url + "/control/state")[1]
    assert state["reserved_blocks"] == [0] * len(plan.new) and state["gate"] == "open"
    assert recomputed(pipeline, report, requests, results, [s.stage_id for s in plan.new]) == 0
    live_kv = live_kv_bytes_at_switch(pipeline, report, requests, results, len(plan.moves))
    assert live_kv > 0 and report.kv_bytes_moved >= live_kv
    if strategy == "stop-copy":
        assert report.precopy_rounds == 0 and len(report.rounds) == 1 and report.rounds[0].dirty_blocks == 0
    else:
        assert report.precopy_rounds >= 1
    if strategy == "live-no-resize":
        assert pool_sizes(pipeline, [s.stage_id for s in plan.old]) == old_pools


@pytest.mark.parametrize("strategy", ["pre-copy", "Live"])
def test_an_unknown_strategy_is_refused_naming_the_valid_ones(strategy: str) -> None:
    plan = plan_moves(Layout.parse("4,4"), Layout.parse("3,5"))
    with pytest.raises(UserError, match=r"live, live-no-resize, stop-copy, restart") as refused:
        reconfigure("http://127.0.0.1:9", {0: "http://127.0.0.1:9", 1: "http://127.0.0.1:9"}, plan,
                    strategy=strategy)
    assert strategy in str(refused.value)


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


def test_a_chain_that_adds_then_removes_a_stage_under_load_loses_nothing_and_recomputes_nothing(
    pipeline: Pipeline4x4, oracle: Callable[[list[int], int], list[int]]
) -> None:
    """`4,4 → 3,3,2 → 4,4` while requests stream: the second change removes the stage the first one added."""
    first = plan_moves(Layout.parse("4,4"), Layout.parse("3,3,2"))
    reports: list[ReconfigReport] = []

    def chain() -> ReconfigReport:
        second = plan_moves(first.new, Layout.parse("4,4"))
        for plan in (first, second):
            reports.append(reconfigure(pipeline.frontend.url, dict(pipeline.urls), plan,
                                       start_stage=pipeline.start_stage, stop_stage=pipeline.stop_stage))
            assert reports[-1].outcome == "committed", reports[-1].error
        return reports[-1]

    report, requests, results = change_under_load(pipeline, chain, seed=5)
    second = plan_moves(first.new, Layout.parse("4,4"))
    assert second.removed == first.added and second.added == ()
    assert [r.epoch for r in reports] == [1, 2] and pipeline.frontend.frontend.scheduler.epoch == 2
    assert_all_match(requests, results, oracle)
    assert_holds_exactly(pipeline, second.new)
    assert set(report.departed_stats) == set(first.added) and not pipeline.extra  # its process was stopped
    assert recomputed(pipeline, report, requests, results, [s.stage_id for s in second.new]) == 0
    state = http_json(pipeline.frontend.url + "/control/state")[1]
    assert state["reserved_blocks"] == [0, 0] and state["gate"] == "open"
