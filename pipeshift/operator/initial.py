"""The first layout of a pipeline without `spec.layout`: planned from its policy before anything serves.

The autoscaling loop (`autoscale.py`) only changes a layout that serves, because it judges signals of a
running pipeline. Before that, the policy still says where the pipeline may run: its allowed pools, its stage
bounds (together with `spec.minStages`/`spec.maxStages`), its mode, targets and assumed request lengths. The
planner chooses for zero load over `spec.pools`, each sized by the allocatable `nvidia.com/gpu` of the Nodes
its `nodeSelector` matches (the same inputs a cold start from zero gets). A policy that pins a layout gets it.

Once chosen, the layout is kept in `status.layout` while it starts, and re-read from there (`kept`), so each
pass does not plan again and a Pending pipeline woken from zero comes back with the layout it released.
Pure: the Node capacity arrives in `Observed.pool_gpus`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from pipeshift.api import Layout, LayoutError, StagePlan
from pipeshift.errors import UserError
from pipeshift.operator.manifests import GPU_RESOURCE
from pipeshift.operator.spec import PipelineSpec
from pipeshift.placement.planner import Placement, PlacementRequest, plan
from pipeshift.placement.pools import Pool, make_pool
from pipeshift.placement.profile import ModelProfile
from pipeshift.placement.workload import LengthDist, Slo, Workload
from pipeshift.policy.schema import AutoscalingPolicy


@dataclass(frozen=True)
class Planned:
    """The first layout and why it was chosen (the `InitialLayout` Event's message)."""

    layout: Layout
    why: str


@dataclass(frozen=True)
class NotPlanned:
    """Why there is no first layout yet: `reason` (a condition reason) and what is missing."""

    reason: str
    message: str


def kept(previous: Mapping[str, Any], spec: PipelineSpec, num_layers: int,
         pool_gpus: Mapping[str, int] | None) -> Layout | None:
    """The layout a previous pass started (`status.layout`), while it still covers the model and each
    pool still has a GPU per stage placed on it; None when there is none to keep (plan afresh)."""
    try:
        stages = (previous.get("layout") or {})["stages"]
        layout = Layout(tuple(StagePlan(int(s["stageId"]), str(s["pool"]), int(s["layers"][0]),
                                        int(s["layers"][1])) for s in stages))
    except (KeyError, TypeError, ValueError, IndexError, LayoutError):
        return None
    names = {p.name for p in spec.pools}
    if layout.num_layers != num_layers or any(s.pool not in names for s in layout):
        return None
    if pool_gpus is not None and any(n > pool_gpus.get(pool, 0) for pool, n in Counter(s.pool for s in layout).items()):
        return None
    return layout


def first_layout(name: str, spec: PipelineSpec, policy_body: Mapping[str, Any] | None,
                 model_config: Mapping[str, Any], pool_gpus: Mapping[str, int] | None) -> Planned | NotPlanned:
    """Plan the first layout of pipeline `name`. `policy_body`: the AutoscalingPolicy's spec (or
    `spec.inlinePolicy`), None when `spec.policy` names one that does not exist; `pool_gpus`: allocatable GPUs
    per pool of `spec.pools`."""
    if policy_body is None:
        where = f"spec.policy: no AutoscalingPolicy {spec.policy!r} in this namespace" if spec.policy \
            else "neither spec.policy nor spec.inlinePolicy is set"
        return NotPlanned("PolicyNotFound", f"{where}; without spec.layout the policy plans the first layout")
    try:
        policy = AutoscalingPolicy.model_validate({"name": spec.policy or name, **policy_body})
    except ValidationError as e:  # validation passed the pipeline, so this is a policy changed since
        return NotPlanned("PolicyNotFound", f"the policy cannot be used to plan: {e.errors()[0]['msg']}")
    if pool_gpus is None:
        return NotPlanned("Unschedulable", "the allocatable GPUs of the Nodes of spec.pools could not be read "
                                           "(the operator's log says why); read again at the next pass")
    if policy.pin is not None:
        return _pinned(policy, pool_gpus)
    pools = _pools(spec, policy, pool_gpus)
    if not pools:
        return NotPlanned("Unschedulable", _no_capacity(spec, policy, pool_gpus))
    low = max(policy.stages.min, spec.min_stages)
    high = min(policy.stages.max or spec.max_stages, spec.max_stages)
    t = policy.targets
    try:
        model = ModelProfile.from_config(dict(model_config), name=name, source="spec.model.config")
        placement = plan(PlacementRequest(
            model=model, pools=pools,
            workload=Workload(rate=0.0, prompt=LengthDist.fixed(policy.workload.prompt_tokens),
                              output=LengthDist.fixed(policy.workload.output_tokens)),
            slo=Slo(t.ttft_p95_seconds, t.tpot_p95_seconds).scaled(t.headroom), mode=policy.mode,
            migration_horizon_seconds=policy.reconfiguration.migration_horizon_seconds,
            min_stages=low, max_stages=high))
    except UserError as e:
        return NotPlanned("Unschedulable", f"policy {policy.name} over {_capacity(pools)}, stages {low}..{high}: {e}")
    return Planned(placement.layout, _why(policy, placement, pools, low, high))


def _pinned(policy: AutoscalingPolicy, pool_gpus: Mapping[str, int]) -> Planned | NotPlanned:
    layout = policy.pin.layout()  # type: ignore[union-attr]
    short = [f"{pool} ({n} stages, {pool_gpus.get(pool, 0)} GPUs)"
             for pool, n in Counter(s.pool for s in layout).items() if n > pool_gpus.get(pool, 0)]
    if short:
        pinned = ",".join(f"{s.pool}:{s.start}-{s.end}" for s in layout)
        return NotPlanned("Unschedulable", f"policy {policy.name} pins {pinned}, but its pools lack "
                                           f"allocatable {GPU_RESOURCE}: {', '.join(short)}")
    return Planned(layout, f"policy {policy.name}, which pins {_stages(len(layout))}")


def _pools(spec: PipelineSpec, policy: AutoscalingPolicy, pool_gpus: Mapping[str, int]) -> tuple[Pool, ...]:
    """The pools the policy allows (all of `spec.pools` when it names none) that have a GPU now, with the
    policy's price where it sets one, else the pipeline's."""
    allowed = {c.name: c.cost_per_hour for c in policy.pools}
    out = []
    for pool in spec.pools:
        count = pool_gpus.get(pool.name, 0)
        if count < 1 or (allowed and pool.name not in allowed):
            continue
        price = allowed.get(pool.name) if allowed.get(pool.name) is not None else pool.cost_per_hour
        out.append(make_pool(pool.name, pool.gpu, count, **({} if price is None else {"cost_per_hour": price})))
    return tuple(out)


def _no_capacity(spec: PipelineSpec, policy: AutoscalingPolicy, pool_gpus: Mapping[str, int]) -> str:
    allowed = {c.name for c in policy.pools} or {p.name for p in spec.pools}
    seen = ", ".join(f"{p.name}: {pool_gpus.get(p.name, 0)}" for p in spec.pools if p.name in allowed)
    return (f"no pool that policy {policy.name} allows has an allocatable {GPU_RESOURCE} on a Node matching its "
            f"nodeSelector ({seen})")


def _capacity(pools: tuple[Pool, ...]) -> str:
    return ", ".join(f"{p.name} ({p.count}x {p.gpu})" for p in pools)


def _why(policy: AutoscalingPolicy, placement: Placement, pools: tuple[Pool, ...], low: int, high: int) -> str:
    e = placement.estimate
    goal = "the fastest layout" if policy.mode == "latency" else "the cheapest layout meeting the targets"
    met = "meets" if e.slo_met else "misses"
    return (f"policy {policy.name} (mode {policy.mode}: {goal}) at zero load over {_capacity(pools)}, "
            f"stages {low}..{high}: {_stages(len(placement.layout))}; predicted TTFT p95 {_seconds(e.ttft_p95_s)}, "
            f"TPOT p95 {_seconds(e.tpot_p95_s)} ({met} the targets x headroom), ${e.cost_per_hour:.2f}/h")


def _stages(n: int) -> str:
    return f"{n} stage" if n == 1 else f"{n} stages"


def _seconds(value: float) -> str:
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"
