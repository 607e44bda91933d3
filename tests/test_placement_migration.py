"""A current layout makes the planner weigh the move: bytes moved over the link, amortised over a horizon."""

from __future__ import annotations

import math

from pipeshift.api import Layout
from pipeshift.placement import LengthDist, ModelProfile, PlacementRequest, Slo, Workload, make_pool, plan

MODEL = ModelProfile("m", 32, 4096, 32, 8, 128, 14336, 128256)
WORKLOAD = Workload(1.0, LengthDist.fixed(512), LengthDist.fixed(128))
SLO = Slo(2.0, 0.1)
ON_A = Layout.from_json({"stages": [{"pool": "a", "layers": [0, 16]}, {"pool": "a", "layers": [16, 32]}]})


def pools(speedup: float) -> tuple:
    """Pool b is pool a made `speedup` times faster, at the same price, over a slow network."""
    return (make_pool("a", "l40s", 2, interconnect_gbps=0.5),
            make_pool("b", "l40s", 2, tflops=362 * speedup, bandwidth_gbps=864 * speedup, interconnect_gbps=0.5))


def request(speedup: float, current: Layout | None, horizon: float = 600.0) -> PlacementRequest:
    return PlacementRequest(MODEL, pools(speedup), WORKLOAD, SLO, current=current, migration_horizon_seconds=horizon)


def test_without_a_current_layout_the_faster_pool_wins_and_nothing_moves() -> None:
    placement = plan(request(1.02, None))
    assert {s.pool for s in placement.layout} == {"b"}
    assert placement.bytes_moved == 0 and placement.move_seconds == 0


def test_a_marginal_gain_does_not_buy_a_large_move() -> None:
    placement = plan(request(1.02, ON_A))
    assert {s.pool for s in placement.layout} == {"a"}
    assert placement.bytes_moved < 2 * (MODEL.layer_weight_bytes + 1e9)  # at most a boundary layer


def test_a_large_gain_is_worth_the_move_and_the_bytes_are_every_layer() -> None:
    placement = plan(request(2.0, ON_A))
    assert {s.pool for s in placement.layout} == {"b"}
    # Every layer changes pool: its weights and the KV of the resident requests travel.
    concurrency = WORKLOAD.rate * (SLO.ttft_p95_s + 128 * SLO.tpot_p95_s)
    kv_per_layer = concurrency * (512 + 128 / 2) * 2 * 8 * 128 * 2
    assert math.isclose(placement.bytes_moved, MODEL.num_layers * (MODEL.layer_weight_bytes + kv_per_layer))
    assert math.isclose(placement.move_seconds, placement.bytes_moved / 0.5e9)


def test_a_long_horizon_amortises_the_same_move_into_a_marginal_gain() -> None:
    assert {s.pool for s in plan(request(1.02, ON_A, horizon=30 * 24 * 3600.0)).layout} == {"b"}


def test_the_optimal_current_layout_is_kept_as_is() -> None:
    best = plan(request(2.0, None)).layout
    again = plan(request(2.0, best))
    assert [(s.pool, s.start, s.end) for s in again.layout] == [(s.pool, s.start, s.end) for s in best]
    assert again.bytes_moved == 0
