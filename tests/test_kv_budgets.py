"""Stages with different KV memory budgets (`--kv-bytes` per agent) through a live `4,4 → 3,5` under load: each
pool ends at the capacity its budget and the resize rule give, the agents report it (`/info`, the
`pipeshift_kv_blocks_capacity` metric), and the frontend admits by it — a request of exactly the largest size
that fits every stage now is served, one block more is refused naming the stage and its new pool size.

The rule: with `live` a pool keeps its blocks per layer (a stage that gives a layer away shrinks, one that takes
one grows; pools move in whole slabs of 64 blocks); with `live-no-resize` every pool keeps its size, so the
layers that stay share the blocks the departing ones freed, and a stage that takes a layer has less per layer.
"""

from __future__ import annotations

import math
import random
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from _admission import assert_admits_exactly, largest_request
from _streaming import Streamed, assert_exact, oracle, spanning, streaming, under_load

from pipeshift.api import Layout, StagePlan, plan_moves
from pipeshift.control import reconfigure
from pipeshift.local.processes import LocalAgents, http_json, start_agents
from pipeshift.policy.exposition import parse
from pipeshift.runtime.frontend.background import BackgroundFrontend
from pipeshift.runtime.frontend.config import FrontendConfig
from pipeshift.runtime.model.make_model import make_model

VOCAB = 300
BLOCK_SIZE = 16
SLAB_BLOCKS = 64  # the agents' pool granularity (Stage's default)
BLOCK_BYTES = 2 * BLOCK_SIZE * 2 * 8 * 8  # K and V, 2 KV heads of dim 8, float64
BUDGET_BLOCKS = {0: 512, 1: 256}  # unequal: stage 0 has twice stage 1's KV memory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("budgets") / "tiny", layers=8, hidden=32, heads=4, kv_heads=2,
                      intermediate=64, vocab=VOCAB, seed=5)


class UnequalPools:
    """`4,4` whose agents were given different `--kv-bytes`, behind a frontend."""

    def __init__(self, model_dir: Path) -> None:
        self.groups: list[LocalAgents] = [
            start_agents(model_dir, [StagePlan(sid, "local", 4 * sid, 4 * sid + 4)], dtype="float64",
                         kv_bytes=blocks * BLOCK_BYTES, block_size=BLOCK_SIZE, threads=1)
            for sid, blocks in BUDGET_BLOCKS.items()
        ]
        self.urls = {g.agents[0].stage_id: g.agents[0].control_url for g in self.groups}
        self.frontend = BackgroundFrontend(FrontendConfig(
            model_dir=model_dir, port=0, stages=tuple(u.removeprefix("http://") for u in self.urls.values())))

    def close(self) -> None:
        self.frontend.stop()
        for group in self.groups:
            group.stop()


@pytest.fixture
def pipeline(model_dir: Path) -> Iterator[UnequalPools]:
    running = UnequalPools(model_dir)
    try:
        yield running
    finally:
        running.close()


def resized(total: int, old_layers: int, new_layers: int) -> int:
    """The pool after a resizing commit: the same blocks per layer for the new layer count, in whole slabs."""
    want = math.ceil(total / old_layers * new_layers)
    if want >= total:
        return total + math.ceil((want - total) / SLAB_BLOCKS) * SLAB_BLOCKS
    return total - (total - want) // SLAB_BLOCKS * SLAB_BLOCKS


def capacity_metric(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        samples = parse(response.read().decode())
    return {s.labels["stage"]: s.value for s in samples if s.name == "pipeshift_kv_blocks_capacity"}


@pytest.mark.parametrize("strategy", ["live", "live-no-resize"])
def test_unequal_kv_budgets_end_at_their_computed_capacity_and_admission_uses_it(
        pipeline: UnequalPools, model_dir: Path, strategy: str) -> None:
    plan = plan_moves(Layout.parse("4,4"), Layout.parse("3,5"))
    url = pipeline.frontend.url
    before = {sid: int(http_json(u + "/info")[1]["kv"]["total_blocks"]) for sid, u in pipeline.urls.items()}
    assert before == BUDGET_BLOCKS
    assert_admits_exactly(url, before, plan.old, block_size=BLOCK_SIZE, vocab=VOCAB)

    def change(requests: list[Streamed]) -> object:
        return reconfigure(url, dict(pipeline.urls), plan, strategy=strategy,
                           before_hold=streaming(requests, at_least=1))

    # A light load, so that the live sequences' reservations stay below every pool's target size.
    report, requests = under_load(url, change, random.Random(3), VOCAB, long=2, long_tokens=(60, 100),
                                  short_tokens=(20, 40), every_s=0.2)
    assert report.outcome == "committed", report.error
    assert spanning(requests, report) >= 1
    assert_exact(requests, oracle(model_dir))

    old_layers = {s.stage_id: s.num_layers for s in plan.old}
    if strategy == "live":
        expected = {s.stage_id: resized(before[s.stage_id], old_layers[s.stage_id], s.num_layers) for s in plan.new}
        assert expected == {0: 384, 1: 320}  # 128 and 64 blocks per layer, as before the change
    else:
        expected = before
    for sid, u in pipeline.urls.items():
        assert http_json(u + "/info")[1]["kv"]["total_blocks"] == expected[sid]
        assert capacity_metric(u) == {str(sid): float(expected[sid])}
    assert http_json(url + "/control/state")[1]["reserved_blocks"] == [0, 0]
    assert_admits_exactly(url, expected, plan.new, block_size=BLOCK_SIZE, vocab=VOCAB)
    if strategy == "live-no-resize":
        # Stage 1 now spreads its 256 blocks over 5 layers: the largest request shrank from 1024 to 816 tokens.
        assert largest_request(expected, plan.new, BLOCK_SIZE) == 816
        assert largest_request(before, plan.old, BLOCK_SIZE) == 1024
