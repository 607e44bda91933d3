"""The planner's search against exhaustive enumeration, and the properties every plan must have."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipeshift.placement import (
    CATALOGUE,
    Infeasible,
    LengthDist,
    ModelProfile,
    PlacementRequest,
    Slo,
    Workload,
    make_pool,
    plan,
)
from pipeshift.placement.estimate import objective
from pipeshift.placement.exhaustive import exhaustive

GPUS = sorted(CATALOGUE)


@st.composite
def requests(draw: st.DrawFn, max_layers: int = 12, max_devices: int = 4, max_pools: int = 3) -> PlacementRequest:
    # Layers of 0.3-0.5 GB against devices of 1-4 GB: most plans need several stages and pools.
    model = ModelProfile("m", draw(st.integers(1, max_layers)), 4096, 32, 8, 128,
                         draw(st.sampled_from([8192, 11008])), 32000)
    pools, total = [], 0
    for i in range(draw(st.integers(1, max_pools))):
        count = min(draw(st.integers(1, 3)), max_devices - total)
        if count < 1:
            break
        total += count
        pools.append(make_pool(
            f"p{i}", draw(st.sampled_from(GPUS)), count, memory_gb=draw(st.floats(1.0, 4.0)),
            interconnect_gbps=draw(st.sampled_from([0.5, 5.0, 50.0])),
            cost_per_hour=draw(st.sampled_from([0.5, 1.0, 2.0, 3.0]))))
    workload = Workload(rate=draw(st.sampled_from([0.0, 0.5, 2.0, 8.0])),
                        prompt=LengthDist(draw(st.sampled_from([64.0, 512.0])), 2048.0),
                        output=LengthDist(64.0, draw(st.sampled_from([64.0, 256.0]))))
    slo = Slo(draw(st.floats(0.01, 1.0)), draw(st.floats(0.001, 0.05)))
    return PlacementRequest(model, tuple(pools), workload, slo, mode=draw(st.sampled_from(["latency", "cost"])))


def planner_objective(request: PlacementRequest) -> tuple[bool, tuple[float, ...]] | None:
    try:
        e = plan(request).estimate
    except Infeasible:
        return None
    return e.slo_met, objective(request.mode if e.slo_met else "latency", e.bottleneck_s, e.cost_per_hour)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_objective_equals_the_exhaustive_optimum(request: PlacementRequest) -> None:
    ref = exhaustive(request.cost_model(), request.mode, request.stage_range())
    got = planner_objective(request)
    event("infeasible" if ref is None else f"{len(ref.pools)} stages on {len(set(ref.pools))} pools, "
          f"SLO {'met' if ref.slo_met else 'missed'}")
    if ref is None:
        assert got is None
        return
    assert got is not None, "exhaustive found a plan the planner did not"
    met, key = got
    assert met == ref.slo_met
    assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(key, ref.objective, strict=True)), (key, ref)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.floats(0.5, 0.999))
def test_with_a_binding_ttft_target_the_objective_still_equals_the_exhaustive_optimum(
        request: PlacementRequest, tighten: float) -> None:
    # Without load the SLOs change nothing but the verdict, so a TTFT just under the fastest plan's binds.
    idle = dataclasses.replace(request, workload=dataclasses.replace(request.workload, rate=0.0),
                               slo=Slo(100.0, 100.0))
    try:
        fastest = plan(idle).estimate
    except Infeasible:
        return
    bound = dataclasses.replace(idle, slo=Slo(tighten * fastest.ttft_p95_s, 100.0))
    ref = exhaustive(bound.cost_model(), bound.mode, bound.stage_range())
    met, key = planner_objective(bound)
    event(f"SLO {'met' if ref.slo_met else 'missed'} on {len(ref.pools)} stages")
    assert met == ref.slo_met
    assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(key, ref.objective, strict=True)), (key, ref)


@settings(max_examples=60, deadline=None)
@given(requests(max_layers=48, max_devices=10, max_pools=4))
def test_every_plan_fits_in_memory_and_covers_each_layer_once_in_order(request: PlacementRequest) -> None:
    try:
        placement = plan(request)
    except Infeasible:
        return
    stages = list(placement.layout)
    covered = [layer for s in stages for layer in range(s.start, s.end)]
    assert covered == list(range(request.model.num_layers))
    assert [s.stage_id for s in stages] == list(range(len(stages)))
    usable = {p.name: p.usable for p in request.pools}
    assert all(sum(s.pool == name for s in stages) <= n for name, n in usable.items())
    m = request.model
    for i, (stage, est) in enumerate(zip(stages, placement.estimate.stages, strict=True)):
        assert (est.pool, est.start, est.end) == (stage.pool, stage.start, stage.end)
        extra = (m.embedding_bytes if i == 0 else 0) + (m.head_bytes if i == len(stages) - 1 and i > 0 else 0)
        assert est.memory.weights >= stage.num_layers * m.layer_weight_bytes + extra
        assert est.memory.total <= est.memory.capacity
        pool = next(p for p in request.pools if p.name == stage.pool)
        assert est.memory.capacity <= pool.memory_gb * 1e9


def test_a_binding_ttft_target_trades_bottleneck_for_a_shorter_prefill_path() -> None:
    model = ModelProfile("m", 7, 4096, 32, 8, 128, 11008, 32000)
    pools = (make_pool("a", "a10g", 2, memory_gb=2.0), make_pool("b", "l4", 2, memory_gb=3.0))
    workload = Workload(0.0, LengthDist(512, 4096), LengthDist.fixed(64))  # no load: SLOs change nothing else
    fastest = plan(PlacementRequest(model, pools, workload, Slo(100, 100))).estimate
    tight = PlacementRequest(model, pools, workload, Slo(0.97 * fastest.ttft_p95_s, 100))
    chosen = plan(tight).estimate
    ref = exhaustive(tight.cost_model(), "latency", tight.stage_range())
    assert chosen.slo_met and ref.slo_met
    assert chosen.bottleneck_s > fastest.bottleneck_s and chosen.ttft_p95_s <= tight.slo.ttft_p95_s
    assert math.isclose(chosen.bottleneck_s, ref.objective[0], rel_tol=1e-12)


def test_stage_bounds_are_respected() -> None:
    model = ModelProfile("m", 24, 4096, 32, 8, 128, 11008, 32000)
    pools = (make_pool("a", "l40s", 8),)
    base = PlacementRequest(model, pools, Workload(1.0, LengthDist.fixed(256), LengthDist.fixed(64)), Slo(2, 0.1))
    free = len(plan(base).layout)
    for low, high in ((free + 2, None), (1, max(1, free - 1)), (3, 3)):
        layout = plan(PlacementRequest(model, pools, base.workload, base.slo, min_stages=low, max_stages=high)).layout
        assert low <= len(layout) <= (high or 8)


def test_an_unreachable_slo_gives_the_fastest_plan_marked_missed() -> None:
    model = ModelProfile("m", 8, 4096, 32, 8, 128, 11008, 32000)
    pools = (make_pool("slow", "l4", 2), make_pool("fast", "h100-80gb", 1, memory_gb=12))
    request = PlacementRequest(model, pools, Workload(1.0, LengthDist.fixed(256), LengthDist.fixed(64)),
                               Slo(1e-4, 1e-5), mode="cost")
    placement = plan(request)
    ref = exhaustive(request.cost_model(), "latency", request.stage_range())
    assert not placement.estimate.slo_met and not ref.slo_met
    assert math.isclose(placement.estimate.bottleneck_s, ref.objective[0], rel_tol=1e-12)


def test_a_model_too_big_for_the_pools_says_how_big() -> None:
    llama70 = ModelProfile("llama-70b", 80, 8192, 64, 8, 128, 28672, 32000, "float16")
    request = PlacementRequest(llama70, (make_pool("l40s", "l40s", 2),),
                               Workload(1.0, LengthDist.fixed(512), LengthDist.fixed(128)), Slo(2, 0.1))
    with pytest.raises(Infeasible, match=r"in float16 needs 138 GB of weights; pools offer 96 GB"):
        plan(request)


def test_kv_for_the_concurrency_counts_against_memory() -> None:
    model = ModelProfile("m", 32, 4096, 32, 8, 128, 14336, 128256)
    pools = (make_pool("a", "l40s", 1),)
    light = Workload(0.1, LengthDist.fixed(512), LengthDist.fixed(128))
    assert plan(PlacementRequest(model, pools, light, Slo(2, 0.1))).estimate.slo_met
    heavy = Workload(0.1, LengthDist.fixed(512), LengthDist.fixed(128), min_concurrency=2000)
    with pytest.raises(Infeasible, match=r"GB of KV cache for 2000 concurrent requests"):
        plan(PlacementRequest(model, pools, heavy, Slo(2, 0.1)))
