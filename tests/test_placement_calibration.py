"""Measured per-layer step times replace datasheet estimates, and a time scale stretches every prediction."""

from __future__ import annotations

import math

import pytest

from pipeshift.api import Layout
from pipeshift.placement import (
    Calibration,
    LengthDist,
    ModelProfile,
    PlacementRequest,
    Slo,
    Workload,
    estimate_layout,
    make_pool,
    plan,
)

MODEL = ModelProfile("m", 16, 4096, 32, 8, 128, 11008, 32000)
IDLE = Workload(0.0, LengthDist.fixed(256), LengthDist.fixed(64))  # no prefill load: step times are pure decode
POOLS = (make_pool("a", "l40s", 2), make_pool("b", "l40s", 2))


def first_stage_step(calibration: Calibration, first: int) -> float:
    request = PlacementRequest(MODEL, POOLS, IDLE, Slo(2, 0.1), calibration=calibration)
    layout = Layout.from_json({"stages": [{"pool": "a", "layers": [0, first]}, {"pool": "a", "layers": [first, 16]}]})
    return estimate_layout(request, layout).stages[0].step_seconds


@pytest.mark.parametrize("measured", [1e-4, 3e-3])
def test_each_layer_adds_the_measured_step_time_per_micro_batch(measured: float) -> None:
    calibration = Calibration(step_seconds_per_layer={"a": measured})
    added = first_stage_step(calibration, 5) - first_stage_step(calibration, 4)
    micro_batches = 2  # two stages: the runtime keeps max(2, stages) micro-batches in flight
    assert math.isclose(added, micro_batches * measured, rel_tol=1e-9)


def test_a_time_scale_stretches_predictions_proportionally() -> None:
    assert math.isclose(first_stage_step(Calibration(time_scale=1.7), 6),
                        1.7 * first_stage_step(Calibration(), 6), rel_tol=1e-12)


def test_a_pool_measured_slow_gets_fewer_layers() -> None:
    base = PlacementRequest(MODEL, POOLS, IDLE, Slo(2, 0.1), min_stages=2, max_stages=2)
    layers = {name: 0 for name in ("a", "b")}
    slow_a = plan(PlacementRequest(MODEL, POOLS, IDLE, Slo(2, 0.1), min_stages=2, max_stages=2,
                                   calibration=Calibration(step_seconds_per_layer={"a": 1e-2, "b": 1e-3})))
    for s in slow_a.layout:
        layers[s.pool] += s.num_layers
    assert layers["b"] > layers["a"]
    assert plan(base).estimate.bottleneck_s < slow_a.estimate.bottleneck_s
