"""A device-memory budget per stage (`--memory-bytes`): the KV pool is the memory less the weights the stage holds,
so a live change with resize turns the weight memory of layers a stage gives away into KV blocks, and a stage
that takes layers must first give up free blocks for their weights.

The figures are computed here from the model's shapes, independently of the code under test: a layer of the
test model is 209,024 float64 parameters (1,672,192 bytes, about 3.2 slabs of 64 blocks of 8 KiB), and every
stage gets the memory of 4 layers, the head and an 8-slab pool.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _admission import assert_admits_exactly
from _streaming import Streamed, assert_exact, oracle, streaming, under_load

from pipeshift.api import Layout
from pipeshift.errors import UserError
from pipeshift.local.live import LivePipeline
from pipeshift.local.processes import LocalAgents, http_json, start_agents
from pipeshift.runtime.agent.config import DEFAULT_KV_BYTES, add_arguments, resolve
from pipeshift.runtime.agent.epoch import resize_for
from pipeshift.runtime.frontend.background import BackgroundFrontend
from pipeshift.runtime.frontend.config import FrontendConfig
from pipeshift.runtime.kv import KVCapacityError, MemoryBudget
from pipeshift.runtime.model.make_model import make_model
from pipeshift.runtime.stage import Stage

VOCAB, HIDDEN, KV_DIM, INTERMEDIATE, LAYERS = 300, 64, 2 * 16, 1024, 8
BLOCK_SIZE, SLAB_BLOCKS, CONTEXT = 16, 64, 8192
BLOCK_BYTES = 2 * BLOCK_SIZE * KV_DIM * 8  # K and V, 2 KV heads of dim 16, float64
SLAB_BYTES = SLAB_BLOCKS * BLOCK_BYTES
LAYER_BYTES = (2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_DIM + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN) * 8
EMBED_BYTES = VOCAB * HIDDEN * 8
HEAD_BYTES = EMBED_BYTES + HIDDEN * 8  # the LM head and the final norm
MEMORY = 4 * LAYER_BYTES + HEAD_BYTES + 8 * SLAB_BYTES


def weights(start: int, end: int) -> int:
    """Bytes of the weights a stage holding layers `[start, end)` of the (untied) test model loads."""
    return (end - start) * LAYER_BYTES + EMBED_BYTES * (start == 0) + HEAD_BYTES * (end == LAYERS)


def pool(start: int, end: int, memory: int = MEMORY) -> int:
    """The rule: the whole slabs that fit beside those weights."""
    return (memory - weights(start, end)) // SLAB_BYTES * SLAB_BLOCKS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test model, with a context long enough that the largest request a grown pool admits is not refused
    for its length first (the admission checks below probe the pools' exact capacity)."""
    made = make_model(tmp_path_factory.mktemp("memory") / "tiny", layers=LAYERS, hidden=HIDDEN, heads=4, kv_heads=2,
                      intermediate=INTERMEDIATE, vocab=VOCAB, seed=11)
    config = json.loads((made / "config.json").read_text())
    (made / "config.json").write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
    return made


# ---- the sizing rule, in process ----------------------------------------------------------------------------


def test_the_figures_of_this_file_are_what_they_claim() -> None:
    assert LAYER_BYTES == 1_672_192 and BLOCK_BYTES == 8192
    assert {r: pool(*r) for r in ((0, 4), (4, 8), (0, 3), (6, 8), (3, 6), (3, 8))} == {
        (0, 4): 512, (4, 8): 512, (0, 3): 704, (6, 8): 896, (3, 6): 704, (3, 8): 256}


def test_budget_gives_the_pool_whole_slabs_of_what_the_weights_leave() -> None:
    budget = MemoryBudget(10 * 4096 + 100, 64, 64)  # slabs of 4096 bytes
    assert budget.pool_blocks(0) == 640
    assert budget.pool_blocks(4096 + 100) == 576  # exactly 9 slabs left
    assert budget.pool_blocks(4096 + 101) == 512  # a byte less than 9 slabs: 8
    assert budget.pool_blocks(10 * 4096 + 100) == 0 and budget.pool_blocks(10**9) == 0
    assert budget.fits(100, 640) and not budget.fits(101, 640)
    assert "memory 41060 bytes - weights 4197 bytes leaves 36863 bytes, room for 512 KV blocks" in budget.describe(4197)
    with pytest.raises(ValueError, match=r"MemoryBudget\.memory_bytes must be a positive int, got 0"):
        MemoryBudget(0, 64, 64)


@pytest.mark.parametrize("layers", [(0, 4), (4, 8), (3, 6), (0, 5)])
def test_a_stage_with_a_memory_budget_starts_with_the_pool_its_weights_leave(model_dir: Path,
                                                                             layers: tuple[int, int]) -> None:
    stage = Stage(model_dir, *layers, dtype=torch.float64, memory_bytes=MEMORY)
    assert stage.weight_bytes() == weights(*layers) == stage.planned_weight_bytes(*layers)
    assert stage.cache.total_blocks == pool(*layers) > 0


def test_a_stage_whose_weights_leave_no_slab_refuses_naming_the_figures(model_dir: Path) -> None:
    with pytest.raises(KVCapacityError) as refused:
        Stage(model_dir, 0, 8, dtype=torch.float64, memory_bytes=MEMORY)
    left = MEMORY - weights(0, 8)
    assert (f"layers [0, 8) leave no room for a KV pool: memory {MEMORY} bytes - weights {weights(0, 8)} bytes "
            f"leaves {left} bytes, room for 0 KV blocks") in str(refused.value)
    with pytest.raises(ValueError, match="give one of kv_blocks, kv_bytes or memory_bytes"):
        Stage(model_dir, 0, 2, kv_bytes=2**20, memory_bytes=MEMORY)


def test_planned_weights_equal_the_loaded_ones_also_with_tied_embeddings(tmp_path: Path) -> None:
    tied = make_model(tmp_path / "tied", layers=4, hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=260,
                      tie_embeddings=True)
    for layers in ((0, 1), (1, 3), (3, 4), (0, 4)):
        stage = Stage(tied, *layers, dtype=torch.float32, kv_blocks=64)
        assert stage.planned_weight_bytes(*layers) == stage.weight_bytes(), layers


def test_resize_after_giving_layers_away_turns_their_weight_memory_into_blocks(model_dir: Path) -> None:
    stage = Stage(model_dir, 0, 4, dtype=torch.float64, memory_bytes=MEMORY)
    stage.reserve(1, 300)  # 19 blocks per layer stay reserved
    stage.activate(0, 3)
    resize_for(stage, per_layer=1.0)  # blocks per layer play no part with a memory budget
    assert stage.cache.total_blocks == pool(0, 3) == 704
    assert (pool(0, 3) - pool(0, 4)) * BLOCK_BYTES <= LAYER_BYTES < (pool(0, 3) - pool(0, 4) + 64) * BLOCK_BYTES
    assert stage.cache.reserved_for(1) == 3 * 19


# ---- flags --------------------------------------------------------------------------------------------------


def parse(argv: list[str], env: dict[str, str]) -> object:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return resolve(parser.parse_args(["--model", "/m", "--layers", "0:2", *argv]), env)


def test_memory_bytes_comes_from_the_flag_or_the_environment() -> None:
    assert parse(["--memory-bytes", "5000000"], {}).memory_bytes == 5_000_000  # type: ignore[attr-defined]
    from_env = parse([], {"PIPESHIFT_MEMORY_BYTES": "6000000"})
    assert (from_env.memory_bytes, from_env.kv_bytes) == (6_000_000, DEFAULT_KV_BYTES)  # type: ignore[attr-defined]
    assert parse([], {}).memory_bytes is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(("argv", "env", "sources"), [
    (["--memory-bytes", "5000000", "--kv-bytes", "1048576"], {}, ("--memory-bytes", "--kv-bytes")),
    (["--kv-bytes", "1048576"], {"PIPESHIFT_MEMORY_BYTES": "5000000"}, ("PIPESHIFT_MEMORY_BYTES", "--kv-bytes")),
    (["--memory-bytes", "5000000"], {"PIPESHIFT_KV_BYTES": "1048576"}, ("--memory-bytes", "PIPESHIFT_KV_BYTES")),
])
def test_memory_bytes_and_an_explicit_kv_bytes_exclude_each_other(argv: list[str], env: dict[str, str],
                                                                   sources: tuple[str, str]) -> None:
    with pytest.raises(UserError) as refused:
        parse(argv, env)
    message = str(refused.value)
    assert message.startswith(f"--memory-bytes (given as {sources[0]}) and --kv-bytes (given as {sources[1]}) "
                              "exclude each other"), message


def test_a_bad_memory_bytes_is_named() -> None:
    with pytest.raises(UserError, match=r"--memory-bytes='0': 0 must be at least 1"):
        parse(["--memory-bytes", "0"], {})
    with pytest.raises(UserError, match=r"PIPESHIFT_MEMORY_BYTES='lots': invalid literal"):
        parse([], {"PIPESHIFT_MEMORY_BYTES": "lots"})


def test_launchers_refuse_both_budgets(model_dir: Path) -> None:
    with pytest.raises(UserError, match=r"give kv_bytes \(--kv-bytes\) or memory_bytes \(--memory-bytes\), not both"):
        start_agents(model_dir, "4,4", kv_bytes=2**20, memory_bytes=MEMORY)
    with pytest.raises(UserError, match="not both"):
        LivePipeline(model_dir, None, Layout.parse("4,4"), kv_bytes=2**20, memory_bytes=MEMORY)  # type: ignore[arg-type]


def test_an_agent_whose_weights_fill_its_memory_refuses_to_start(model_dir: Path) -> None:
    small = weights(0, 4) + SLAB_BYTES - 1
    with pytest.raises(UserError) as refused:
        start_agents(model_dir, "4,4", memory_bytes=small, dtype="float64", threads=1)
    message = str(refused.value)
    assert "exited with code" in message, message
    assert (f"--memory-bytes {small}: layers [0, 4) leave no room for a KV pool: memory {small} bytes - weights "
            f"{weights(0, 4)} bytes leaves {SLAB_BYTES - 1} bytes, room for 0 KV blocks") in message, message


# ---- live changes on agent processes ------------------------------------------------------------------------


class BudgetedPipeline:
    """`4,4` agents started with `--memory-bytes MEMORY` behind a frontend; stages a change adds get it too."""

    def __init__(self, model_dir: Path) -> None:
        agents: LocalAgents = start_agents(model_dir, "4,4", dtype="float64", memory_bytes=MEMORY, threads=1)
        self.live = LivePipeline(model_dir, agents, Layout.parse("4,4"), dtype="float64", memory_bytes=MEMORY)
        self.frontend = BackgroundFrontend(FrontendConfig(
            model_dir=model_dir, port=0, max_batch_tokens=4096,  # the largest request probed is a 3744-token prompt
            stages=tuple(u.removeprefix("http://") for u in self.live.urls.values())))

    @property
    def url(self) -> str:
        return self.frontend.url

    def info(self) -> dict[int, dict]:
        return {sid: http_json(u + "/info")[1] for sid, u in sorted(self.live.urls.items())}

    def pools(self) -> dict[int, int]:
        return {sid: int(i["kv"]["total_blocks"]) for sid, i in self.info().items()}

    def close(self) -> None:
        self.frontend.stop()
        self.live.stop()


@pytest.fixture
def pipeline(model_dir: Path) -> Iterator[BudgetedPipeline]:
    running = BudgetedPipeline(model_dir)
    try:
        yield running
    finally:
        running.close()


def test_info_reports_the_memory_the_weights_and_the_pool(pipeline: BudgetedPipeline) -> None:
    for sid, info in pipeline.info().items():
        start, end = info["layers"]
        assert (info["memory_bytes"], info["weight_bytes"]) == (MEMORY, weights(start, end)), sid
        assert info["kv"]["total_blocks"] == pool(start, end) == 512
        assert info["weight_bytes"] + info["kv"]["total_blocks"] * info["kv"]["block_bytes"] <= MEMORY


@pytest.mark.parametrize(("strategy", "switch"), [("live", "epoch"), ("live", "drain"), ("live-no-resize", "epoch")])
def test_giving_layers_away_grows_the_pool_by_their_weights_only_with_resize(
        pipeline: BudgetedPipeline, model_dir: Path, strategy: str, switch: str) -> None:
    assert pipeline.pools() == {0: 512, 1: 512}

    def change(requests: list[Streamed]) -> object:
        return pipeline.live.change(pipeline.url, "3,3,2", strategy, switch=switch,
                                    before_hold=streaming(requests, at_least=1))

    report, requests = under_load(pipeline.url, change, random.Random(5), VOCAB, long=2, long_tokens=(60, 100),
                                  short_tokens=(20, 40), every_s=0.2)
    assert report.outcome == "committed", report.error  # type: ignore[attr-defined]
    assert_exact(requests, oracle(model_dir))
    layout = pipeline.live.layout  # stage ids as `plan_moves` kept them: the new middle stage is 2
    ranges = {s.stage_id: (s.start, s.end) for s in layout}
    assert ranges == {0: (0, 3), 2: (3, 6), 1: (6, 8)}
    # Stage 0 gave away one layer and stage 1 two: with resize their weights' memory is KV now (3 and 6 slabs of
    # the 3.2 and 6.4 the weights freed); without, the pools keep their size. The added stage starts with the rule.
    expected = {0: 704, 1: 896, 2: 704} if strategy == "live" else {0: 512, 1: 512, 2: 704}
    assert {sid: pool(*r) for sid, r in ranges.items()} == {0: 704, 1: 896, 2: 704}
    assert pipeline.pools() == expected
    for sid, info in pipeline.info().items():
        assert tuple(info["layers"]) == ranges[sid] and info["weight_bytes"] == weights(*ranges[sid])
        assert info["weight_bytes"] + info["kv"]["total_blocks"] * BLOCK_BYTES <= MEMORY
    assert http_json(pipeline.url + "/control/state")[1]["reserved_blocks"] == [0, 0, 0]
    assert_admits_exactly(pipeline.url, expected, layout, block_size=BLOCK_SIZE, vocab=VOCAB)


def test_taking_a_layer_shrinks_the_pool_first_with_resize(pipeline: BudgetedPipeline, model_dir: Path) -> None:
    def change(requests: list[Streamed]) -> object:
        return pipeline.live.change(pipeline.url, "3,5", "live", before_hold=streaming(requests, at_least=1))

    report, requests = under_load(pipeline.url, change, random.Random(6), VOCAB, long=2, long_tokens=(60, 100),
                                  short_tokens=(20, 40), every_s=0.2)
    assert report.outcome == "committed", report.error  # type: ignore[attr-defined]
    assert_exact(requests, oracle(model_dir))
    # Stage 1 now holds the weights of 5 layers and the head: 4 slabs are left of its memory (it had 8).
    assert pipeline.pools() == {0: pool(0, 3), 1: pool(3, 8)} == {0: 704, 1: 256}
    assert_admits_exactly(pipeline.url, {0: 704, 1: 256}, pipeline.live.layout, block_size=BLOCK_SIZE,
                          vocab=VOCAB)


def assert_old_layout_serves(pipeline: BudgetedPipeline, model_dir: Path, requests: list[Streamed]) -> None:
    assert_exact(requests, oracle(model_dir))
    assert {sid: tuple(i["layers"]) for sid, i in pipeline.info().items()} == {0: (0, 4), 1: (4, 8)}
    assert {sid: i["loaded_layers"] for sid, i in pipeline.info().items()} == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
    assert pipeline.pools() == {0: 512, 1: 512}
    assert_admits_exactly(pipeline.url, {0: 512, 1: 512}, Layout.parse("4,4"), block_size=BLOCK_SIZE, vocab=VOCAB)


def test_a_gain_that_does_not_fit_beside_an_unchanged_pool_is_refused_and_aborted(
        pipeline: BudgetedPipeline, model_dir: Path) -> None:
    def change(requests: list[Streamed]) -> object:
        return pipeline.live.change(pipeline.url, "3,5", "live-no-resize")

    report, requests = under_load(pipeline.url, change, random.Random(7), VOCAB, long=2, long_tokens=(60, 100),
                                  short_tokens=(20, 40), every_s=0.2)
    assert report.outcome == "aborted", report  # type: ignore[attr-defined]
    error = report.error or ""  # type: ignore[attr-defined]
    assert (f"stage 1 holding layers [3, 8) after loading [3, 8) does not fit in memory without resizing the pool: "
            f"weights {weights(3, 8)} bytes + the pool's 512 blocks of {BLOCK_BYTES} bytes exceed memory {MEMORY} "
            "bytes") in error, error
    assert pipeline.live.describe() == "4,4"
    assert_old_layout_serves(pipeline, model_dir, requests)


def test_a_gain_whose_weights_need_reserved_blocks_is_refused_and_aborted(
        pipeline: BudgetedPipeline, model_dir: Path) -> None:
    """Two requests reserve 500 positions each (32 blocks per layer): over 5 layers that is 320 blocks, more than
    the 256 that stage 1's memory leaves beside the weights of 5 layers, so it cannot make room."""
    def change(requests: list[Streamed]) -> object:
        return pipeline.live.change(pipeline.url, "3,5", "live")

    report, requests = under_load(pipeline.url, change, random.Random(8), VOCAB, long=2, long_tokens=(480, 480),
                                  short_tokens=(4, 8), every_s=1.0)
    assert report.outcome == "aborted", report  # type: ignore[attr-defined]
    error = report.error or ""  # type: ignore[attr-defined]
    assert (f"stage 1 holding layers [3, 8) after loading [3, 8) cannot shrink its KV pool to make room for the "
            f"weights: memory {MEMORY} bytes - weights {weights(3, 8)} bytes leaves "
            f"{MEMORY - weights(3, 8)} bytes, room for 256 KV blocks") in error, error
    figures = re.search(r"but (\d+) blocks are reserved and live sequences need (\d+) more", error)
    assert figures is not None, error
    reserved, need = int(figures[1]), int(figures[2])
    assert reserved >= 2 * 4 * 31 and need >= 2 * 31 and reserved + need > 256, error  # the two long requests
    assert_old_layout_serves(pipeline, model_dir, requests)
