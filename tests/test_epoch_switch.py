"""The drain-free epoch switch on real agent processes, a real frontend and real sockets, float64, while greedy
requests stream across it: every request ends with the in-process engine's tokens, none is lost, no
(position, layer) is computed twice, sources keep no moved weights or KV, the KV moved covers what was live,
and the frontend never stopped starting micro-batches. Also: E+1 batches really wait at the fence when the
final delta is late (and the output stays exact), a refused arm aborts back to the old layout, and the drain
switch still works.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import torch
from _streaming import AgentsBehindFrontend, Requests, Result, assert_all_match, eos_oracle, stream_tokens

from pipeshift.api import Layout, plan_moves
from pipeshift.control import ReconfigReport, reconfigure
from pipeshift.local.processes import http_json
from pipeshift.runtime.agent.pusher import DELAY_ENV
from pipeshift.runtime.model.make_model import make_model

VOCAB = 300
LAYERS = 8
KV_BYTES = 8 << 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_model(tmp_path_factory.mktemp("epoch") / "tiny", layers=LAYERS, hidden=32, heads=4, kv_heads=2,
                      intermediate=64, vocab=VOCAB, seed=21, tie_embeddings=True)


@pytest.fixture(scope="module")
def oracle(model_dir: Path) -> Callable[[list[int], int], list[int]]:
    return eos_oracle(model_dir)


class Running(AgentsBehindFrontend):
    """Agent processes for `layout` behind a frontend, plus the agents a change starts."""

    def __init__(self, model_dir: Path, layout: str) -> None:
        super().__init__(model_dir, layout, KV_BYTES)

    def change(self, to: str, switch: str = "epoch") -> Callable[[], ReconfigReport]:
        current = Layout.parse(",".join(str(a.end - a.start) for a in self.base.agents))
        plan = plan_moves(current, Layout.parse(to))
        return lambda: reconfigure(self.frontend.url, dict(self.urls), plan, start_stage=self.start_stage,
                                   stop_stage=self.stop_stage, switch=switch)


@pytest.fixture
def running(model_dir: Path, request: pytest.FixtureRequest) -> Iterator[Running]:
    pipeline = Running(model_dir, request.param)
    try:
        yield pipeline
    finally:
        pipeline.close()


def under_load(url: str, change: Callable[[], ReconfigReport], seed: int) -> tuple[ReconfigReport, Requests,
                                                                                    list[Result]]:
    """Six long requests stream; once tokens flow the change runs, and short requests keep arriving while it
    does (so some are admitted before arming, some after, some in flight at the arm)."""
    rng = random.Random(seed)

    def draw(shortest: int, longest: int) -> tuple[list[int], int]:
        return [rng.randrange(2, VOCAB) for _ in range(rng.randint(3, 24))], rng.randint(shortest, longest)

    requests = [draw(250, 350) for _ in range(6)]

    async def scenario() -> tuple[ReconfigReport, list[Result]]:
        seen: list[int] = []
        async with aiohttp.ClientSession() as session:
            streams = [asyncio.create_task(stream_tokens(session, url, p, n, seen)) for p, n in requests]
            while sum(seen) < 12:
                await asyncio.sleep(0.01)
            changing = asyncio.create_task(asyncio.to_thread(change))
            while not changing.done():
                await asyncio.sleep(0.03)
                requests.append(draw(20, 60))
                streams.append(asyncio.create_task(stream_tokens(session, url, *requests[-1], seen)))
            report = await changing
            return report, list(await asyncio.gather(*streams))

    report, results = asyncio.run(scenario())
    return report, requests, results


def check_holds_exactly(running: Running, layout: Layout) -> None:
    """Sources keep no moved weights (loaded layers) and no moved KV (layers with blocks)."""
    for stage in layout:
        stats = running.get(stage.stage_id, "/stats")
        assert stats["loaded_layers"] == list(stage.layers()), (stage, stats["loaded_layers"])
        assert set(stats["kv_layers"]) <= set(stage.layers()), (stage, stats["kv_layers"])
        info = running.get(stage.stage_id, "/info")
        assert info["layers"] == [stage.start, stage.end] and info["reconfig"] is None and info["armed"] is None


def check_nothing_reserved(running: Running, layout: Layout) -> None:
    """Once every request ended, its release reaches every stage (within a step or two): no KV reservation
    stays behind on any stage, and the frontend's admission mirror agrees."""
    deadline = time.monotonic() + 10
    while True:
        held = {s.stage_id: running.get(s.stage_id, "/info")["kv"]["reservations"] for s in layout}
        mirror = http_json(running.frontend.url + "/control/state")[1]["reserved_blocks"]
        if (not any(held.values()) and mirror == [0] * len(layout)) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not any(held.values()), held
    assert mirror == [0] * len(layout)


def recomputed(running: Running, report: ReconfigReport, requests: Requests, results: list[Result],
               layout: Layout) -> int:
    return running.recomputed(report, requests, results, [s.stage_id for s in layout], LAYERS)


def live_moved_kv(running: Running, report: ReconfigReport, requests: Requests, results: list[Result],
                  moved_layers: int) -> tuple[int, int]:
    """(requests that streamed before the switch and after it, a lower bound of their KV in the moved layers
    then), from the client side alone: each held its prompt and all but its last seen token."""
    assert report.held_unix is not None and report.resumed_unix is not None
    info = running.get(0, "/info")
    block_size, block_bytes = info["block_size"], info["kv"]["block_bytes"]
    spanning, total = 0, 0
    for (prompt, _), (_, _, arrived) in zip(requests, results, strict=True):
        before = sum(1 for t in arrived if t < report.held_unix)
        if before and arrived[-1] > report.resumed_unix:
            spanning += 1
            total += math.ceil((len(prompt) + before - 1) / block_size) * block_bytes * moved_layers
    return spanning, total


@pytest.mark.parametrize(
    ("running", "to"), [("4,4", "3,5"), ("4,4", "3,3,2"), ("3,3,2", "4,4")], indirect=["running"]
)
def test_an_epoch_switch_under_streaming_load_is_exact_loses_nothing_and_never_stops_serving(
    running: Running, oracle: Callable[[list[int], int], list[int]], to: str
) -> None:
    change = running.change(to)
    plan = plan_moves(Layout.parse(",".join(str(a.end - a.start) for a in running.base.agents)), Layout.parse(to))
    report, requests, results = under_load(running.frontend.url, change, seed=len(to) + len(plan.old))
    assert report.outcome == "committed", report.error
    assert report.switch == "epoch" and report.error is None
    assert_all_match(requests, results, oracle)
    assert report.epoch == 1 and running.frontend.frontend.scheduler.epoch == 1
    # Old-epoch batches were still in flight when the new epoch was armed; the frontend paused only for its
    # arm's critical section (no drain: nothing like a pipeline cycle).
    assert report.old_batches_at_arm >= 1
    assert 0 <= report.pause_ms < report.switch_duration_ms
    assert "holding" not in report.phases_ms and "retiring" in report.phases_ms
    check_holds_exactly(running, plan.new)
    assert set(report.departed_stats) == set(plan.removed)
    assert recomputed(running, report, requests, results, plan.new) == 0
    spanning, live_kv = live_moved_kv(running, report, requests, results, len(plan.moves))
    assert spanning >= 1 and live_kv > 0 and report.kv_bytes_moved >= live_kv
    assert report.precopy_rounds >= 1 and report.kv_bytes_pushed > 0
    check_nothing_reserved(running, plan.new)
    state = http_json(running.frontend.url + "/control/state")[1]
    assert state["old_epoch_in_flight"] == 0 and state["gate"] == "open"


def test_a_late_final_delta_holds_the_new_epoch_batch_at_the_fence_and_the_output_stays_exact(
    model_dir: Path, oracle: Callable[[list[int], int], list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every push of a final delta is delayed 0.4 s (the agents' test hook, set before they start), far longer
    than a pipeline step: the first E+1 steps of the sequences live at the arm must wait for it at the new
    middle stage, which receives layer 3 from stage 0 and layers 4-5 from stage 1 on two connections."""
    monkeypatch.setenv(DELAY_ENV, "0.4")
    running = Running(model_dir, "4,4")
    try:
        report, requests, results = under_load(running.frontend.url, running.change("3,3,2"), seed=11)
        assert report.outcome == "committed", report.error
        assert_all_match(requests, results, oracle)
        plan = plan_moves(Layout.parse("4,4"), Layout.parse("3,3,2"))
        stats = running.get(plan.added[0], "/stats")
        assert report.fence_waits >= 1 and stats["fence_waits"] >= 1
        assert report.fence_wait_ms_max >= 200 and stats["fence_wait_ms_max"] >= 200
        assert stats["failed_batches"] == 0
        check_holds_exactly(running, plan.new)
        check_nothing_reserved(running, plan.new)
    finally:
        running.close()


@pytest.mark.parametrize("running", ["4,4"], indirect=True)
def test_an_arm_the_frontend_refuses_aborts_and_the_old_layout_serves_on_untouched(
    running: Running, oracle: Callable[[list[int], int], list[int]]
) -> None:
    """The frontend is held (a drain under way), so it refuses to arm: the agents, already armed, disarm; the
    added stage is stopped and the old stages serve the requests to the end once the hold is lifted."""
    url = running.frontend.url
    change = running.change("3,3,2")

    def refused() -> ReconfigReport:
        held = http_json(url + "/control/hold", "POST", {"request_id": uuid.uuid4().hex, "timeout_s": 30})
        assert held[0] == 200, held
        try:
            return change()
        finally:
            http_json(url + "/control/resume", "POST", {"request_id": uuid.uuid4().hex})

    report, requests, results = under_load(url, refused, seed=5)
    assert report.outcome == "aborted" and "gate is held" in (report.error or ""), report.error
    assert "arming" in report.phases_ms and "committing" not in report.phases_ms
    assert_all_match(requests, results, oracle)
    assert not running.extra
    check_holds_exactly(running, Layout.parse("4,4"))
    assert [running.get(s, "/info")["epoch"] for s in (0, 1)] == [0, 0]
    assert running.frontend.frontend.scheduler.epoch == 0
    check_nothing_reserved(running, Layout.parse("4,4"))


@pytest.mark.parametrize("running", ["4,4"], indirect=True)
def test_the_drain_switch_still_works(running: Running, oracle: Callable[[list[int], int], list[int]]) -> None:
    report, requests, results = under_load(running.frontend.url, running.change("3,3,2", switch="drain"), seed=9)
    assert report.outcome == "committed", report.error
    assert report.switch == "drain" and "holding" in report.phases_ms and report.pause_ms > 0
    assert_all_match(requests, results, oracle)
    plan = plan_moves(Layout.parse("4,4"), Layout.parse("3,3,2"))
    check_holds_exactly(running, plan.new)
    assert recomputed(running, report, requests, results, plan.new) == 0
    check_nothing_reserved(running, plan.new)
