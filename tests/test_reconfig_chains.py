"""Chains of live changes under load, drawn by a seeded RNG: from a random start layout of 8 layers, three
successive changes — one boundary shift, one added stage and one removed stage, in a random order with random
positions, each by a random strategy (live or live-no-resize over the epoch or the drain switch, or stop-copy)
— while requests stream across every switch. Then: nothing lost, no (position, layer) computed twice (the
agents' counters), every token equal to the in-process float64 engine's, `kv_bytes_moved` at least the live KV
of the moved layers, and every agent holding exactly its layers after each change.

Fixed seeds keep CI deterministic; the chain a seed draws is printed, so a failure names what to replay.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from _streaming import (
    Streamed,
    assert_exact,
    assert_holds_exactly,
    live_kv_lower_bound,
    oracle,
    recomputed,
    spanning,
    streaming,
    under_load,
)

from pipeshift.api import Layout, plan_moves
from pipeshift.control import ReconfigReport
from pipeshift.local.live import LivePipeline
from pipeshift.local.processes import http_json, start_agents
from pipeshift.runtime.frontend.background import BackgroundFrontend
from pipeshift.runtime.frontend.config import FrontendConfig
from pipeshift.runtime.model.make_model import make_model

LAYERS = 8
VOCAB = 300
KV_BYTES = 4 << 20
MAX_STAGES = 4
KINDS = ("shift", "add", "remove")
# (strategy, switch): the live strategies over either switch; stop-copy always holds.
STRATEGIES = (("live", "epoch"), ("live", "drain"), ("live-no-resize", "epoch"), ("live-no-resize", "drain"),
              ("stop-copy", "drain"))


def mutate(rng: random.Random, sizes: list[int], kind: str) -> list[int] | None:
    """One change of `kind` at a random place, or None if `sizes` allows none."""
    if kind == "shift" and len(sizes) > 1:
        i = rng.randrange(len(sizes) - 1)  # the boundary between stage i and i + 1
        steps = [d for d in (-2, -1, 1, 2) if sizes[i] + d >= 1 and sizes[i + 1] - d >= 1]
        if steps:
            d = rng.choice(steps)
            return [*sizes[:i], sizes[i] + d, sizes[i + 1] - d, *sizes[i + 2:]]
    if kind == "add" and len(sizes) < MAX_STAGES:
        splittable = [i for i, n in enumerate(sizes) if n >= 2]
        if splittable:
            i = rng.choice(splittable)
            cut = rng.randint(1, sizes[i] - 1)
            return [*sizes[:i], cut, sizes[i] - cut, *sizes[i + 1:]]
    if kind == "remove" and len(sizes) > 1:
        i = rng.randrange(len(sizes) - 1)
        return [*sizes[:i], sizes[i] + sizes[i + 1], *sizes[i + 2:]]
    return None


def draw_chain(seed: int) -> tuple[str, list[tuple[str, str, tuple[str, str]]]]:
    """A start layout and three (kind, layout, (strategy, switch)) changes, one of each kind, in a random order."""
    rng = random.Random(seed)
    while True:
        cut = sorted(rng.sample(range(1, LAYERS), rng.randint(1, 2)))
        sizes = [b - a for a, b in zip([0, *cut], [*cut, LAYERS], strict=True)]
        start, chain = sizes, []
        for kind in rng.sample(KINDS, len(KINDS)):
            nxt = mutate(rng, sizes, kind)
            if nxt is None:
                break
            chain.append((kind, ",".join(map(str, nxt)), rng.choice(STRATEGIES)))
            sizes = nxt
        else:
            return ",".join(map(str, start)), chain


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("chains") / "tiny", layers=LAYERS, hidden=32, heads=4, kv_heads=2,
                      intermediate=64, vocab=VOCAB, seed=11, tie_embeddings=True)


class Serving:
    def __init__(self, model_dir: Path, layout: str) -> None:
        agents = start_agents(model_dir, layout, dtype="float64", kv_bytes=KV_BYTES, threads=1)
        self.live = LivePipeline(model_dir, agents, Layout.parse(layout), dtype="float64", kv_bytes=KV_BYTES)
        self.frontend = BackgroundFrontend(FrontendConfig(
            model_dir=model_dir, port=0, stages=tuple(a.control_url.removeprefix("http://") for a in agents.agents)))

    def close(self) -> None:
        self.frontend.stop()
        self.live.stop()


@pytest.fixture
def serving(request: pytest.FixtureRequest, model_dir: Path) -> Iterator[tuple[Serving, int]]:
    """The start layout of the chain seed `request.param` draws, serving; and that seed."""
    running = Serving(model_dir, draw_chain(request.param)[0])
    try:
        yield running, request.param
    finally:
        running.close()


SEEDS = [9, 21]  # with 4 stages; and down to one stage and back


def test_the_draws_cover_every_kind_of_change() -> None:
    for seed in SEEDS:
        start, chain = draw_chain(seed)
        assert sorted(kind for kind, _, _ in chain) == sorted(KINDS)
        layouts = [Layout.parse(start)] + [Layout.parse(to) for _, to, _ in chain]
        assert all(not plan_moves(a, b).is_noop for a, b in itertools.pairwise(layouts))


@pytest.mark.parametrize("serving", SEEDS, indirect=True, ids=[f"seed{s}" for s in SEEDS])
def test_a_random_chain_of_changes_under_load_loses_nothing_recomputes_nothing_and_matches(
        serving: tuple[Serving, int], model_dir: Path) -> None:
    pipeline, seed = serving
    start, chain = draw_chain(seed)
    print(f"chain from {start}: " + " → ".join(f"{to} ({kind}, {' '.join(how)})" for kind, to, how in chain))
    url = pipeline.frontend.url
    info = http_json(next(iter(pipeline.live.urls.values())) + "/info")[1]
    reports: list[ReconfigReport] = []
    plans = []

    def run_chain(requests: list[Streamed]) -> None:
        for _, to, (strategy, switch) in chain:
            plans.append(plan_moves(pipeline.live.layout, Layout.parse(to)))
            reports.append(pipeline.live.change(url, to, strategy, switch=switch,
                                                before_hold=streaming(requests, at_least=2)))
            assert reports[-1].outcome == "committed", (to, strategy, switch, reports[-1].error)
            assert_holds_exactly(pipeline.live.urls, plans[-1].new)

    _, requests = under_load(url, run_chain, random.Random(seed), VOCAB)
    assert pipeline.live.describe() == chain[-1][1]
    assert [r.epoch for r in reports] == [1, 2, 3]
    assert_exact(requests, oracle(model_dir))
    for plan, report in zip(plans, reports, strict=True):
        assert spanning(requests, report) >= 2, report
        live_kv = live_kv_lower_bound(requests, report, len(plan.moves), info["block_size"], info["kv"]["block_bytes"])
        assert report.kv_bytes_moved >= live_kv > 0, (plan, report)
    assert recomputed(list(pipeline.live.urls.values()), reports, requests, LAYERS) == 0
    state = http_json(url + "/control/state")[1]
    assert state["reserved_blocks"] == [0] * len(chain[-1][1].split(",")) and state["epoch"] == 3
