"""The planner's entry point: a request (model, pools, workload, SLOs, mode, current layout) to a placement.

The search is exact for its objective; a current layout adds two more candidates (keep it, or
re-split its stages in place), and every candidate's objective is surcharged by the time its move
takes as a fraction of `migration_horizon_seconds`, so a marginal gain never buys a large move.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pipeshift.api import Layout, StagePlan, plan_moves
from pipeshift.errors import UserError
from pipeshift.placement.calibration import Calibration
from pipeshift.placement.cost_model import COMPUTE_EFFICIENCY, MID_INTRA, USABLE_MEMORY_FRACTION, CostModel
from pipeshift.placement.estimate import MODES, Mode, PlanEstimate, estimate
from pipeshift.placement.pools import Pool, describe
from pipeshift.placement.profile import ModelProfile
from pipeshift.placement.search import Search, Solution
from pipeshift.placement.workload import Slo, Workload

logger = logging.getLogger(__name__)

GB = 1e9


class Infeasible(UserError):
    """No placement fits; the message says which resource falls short and by how much."""


@dataclass(frozen=True)
class PlacementRequest:
    model: ModelProfile
    pools: tuple[Pool, ...]
    workload: Workload
    slo: Slo
    mode: Mode = "latency"
    current: Layout | None = None
    migration_horizon_seconds: float = 3600.0
    min_stages: int = 1
    max_stages: int | None = None
    calibration: Calibration = field(default_factory=Calibration)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if not self.pools:
            raise UserError("no pools given; the planner needs at least one pool to place stages on")
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise UserError(f"pool names must be unique, got {', '.join(names)}")
        if not self.migration_horizon_seconds > 0:
            raise UserError(f"migration_horizon_seconds {self.migration_horizon_seconds}: must be positive")
        if self.min_stages < 1 or (self.max_stages is not None and self.max_stages < self.min_stages):
            raise UserError(f"stage bounds min {self.min_stages}, max {self.max_stages}: need 1 <= min <= max")
        if self.current is not None and self.current.num_layers != self.model.num_layers:
            raise UserError(f"the current layout covers {self.current.num_layers} layers; "
                            f"model {self.model.name} has {self.model.num_layers}")

    def cost_model(self) -> CostModel:
        return CostModel(self.model, self.pools, self.workload, self.slo, self.calibration)

    def stage_range(self) -> range:
        devices = sum(p.usable for p in self.pools)
        upper = min(devices, self.model.num_layers, self.max_stages or devices)
        return range(self.min_stages, upper + 1)

    def pool_indices(self, layout: Layout) -> list[int]:
        index = {p.name: i for i, p in enumerate(self.pools)}
        for s in layout:
            if s.pool not in index:
                raise UserError(f"layout stage {s.stage_id} is on pool {s.pool!r}; known pools: {', '.join(index)}")
        return [index[s.pool] for s in layout]


@dataclass(frozen=True)
class Placement:
    layout: Layout
    estimate: PlanEstimate
    mode: Mode
    slo: Slo
    bytes_moved: float = 0.0
    move_seconds: float = 0.0

    def predicted(self) -> dict[str, object]:
        e = self.estimate
        return {
            "mode": self.mode, "slo_met": e.slo_met,
            "ttft_p95_s": e.ttft_p95_s, "tpot_p95_s": e.tpot_p95_s,
            "targets": {"ttft_p95_s": self.slo.ttft_p95_s, "tpot_p95_s": self.slo.tpot_p95_s},
            "bottleneck_s": e.bottleneck_s, "throughput_tokens_per_s": e.throughput_tokens_per_s,
            "concurrency": e.concurrency, "micro_batches": e.micro_batches, "cost_per_hour": e.cost_per_hour,
            "bytes_moved": self.bytes_moved, "move_seconds": self.move_seconds,
            "stages": [{"pool": s.pool, "layers": [s.start, s.end], "step_s": s.step_seconds,
                        "memory_bytes": {"weights": s.memory.weights, "kv": s.memory.kv,
                                         "activations": s.memory.activations, "total": s.memory.total,
                                         "capacity": s.memory.capacity}}
                       for s in e.stages],
        }

    def to_json(self) -> dict[str, object]:
        """The `pipeshift plan --json` contract; `--current` reads the same shape back."""
        return {"stages": [{"pool": s.pool, "layers": [s.start, s.end]} for s in self.layout],
                "predicted": self.predicted()}


def layout_of(request: PlacementRequest, pools: list[int], sizes: list[int]) -> Layout:
    stages, start = [], 0
    for i, (p, k) in enumerate(zip(pools, sizes, strict=True)):
        stages.append(StagePlan(i, request.pools[p].name, start, start + k))
        start += k
    return Layout(tuple(stages))


def estimate_layout(request: PlacementRequest, layout: Layout) -> PlanEstimate:
    """Predictions for a given layout (the running one, a pinned one) under this request's inputs."""
    if layout.num_layers != request.model.num_layers:
        raise UserError(f"layout covers {layout.num_layers} layers; model {request.model.name} has "
                        f"{request.model.num_layers}")
    return estimate(request.cost_model(), request.pool_indices(layout), layout.sizes)


def migration(request: PlacementRequest, cm: CostModel, new: Layout) -> tuple[float, float]:
    """Bytes moved (weights and resident KV of every layer that changes stage) and the seconds it takes."""
    if request.current is None:
        return 0.0, 0.0
    moves = plan_moves(request.current, new)
    by_name = {p.name: p for p in request.pools}
    m = request.model
    per_layer = m.layer_weight_bytes + cm.concurrency * cm.context * m.kv_bytes_per_token_per_layer
    seconds = 0.0
    for mv in moves.moves:
        src = by_name.get(request.current.stage(mv.src_stage).pool)
        dst = by_name[moves.new.stage(mv.dst_stage).pool]
        if src is None:
            link = dst.interconnect_gbps
        elif src is dst:
            link = src.link_gbps
        else:
            link = src.interconnect_gbps
        seconds += per_layer / (link * GB)
    return per_layer * len(moves.moves), seconds


def _rank(request: PlacementRequest, p: Placement) -> tuple[float, ...]:
    """SLO-meeting plans first; the primary objective surcharged by the amortised move."""
    e = p.estimate
    surcharge = 1.0 + p.move_seconds / request.migration_horizon_seconds
    if not e.slo_met:
        return (1.0, e.bottleneck_s * surcharge, e.cost_per_hour, p.bytes_moved)
    if request.mode == "latency":
        return (0.0, e.bottleneck_s * surcharge, e.cost_per_hour, p.bytes_moved)
    return (0.0, e.cost_per_hour * surcharge, e.bottleneck_s, p.bytes_moved)


def plan(request: PlacementRequest) -> Placement:
    """The best placement for the request; raises `Infeasible` with the reason when nothing fits."""
    cm = request.cost_model()
    stages = request.stage_range()
    if not stages:
        devices = sum(p.usable for p in request.pools)
        raise Infeasible(f"no stage count fits the bounds: min_stages {request.min_stages}, max_stages "
                         f"{request.max_stages}, {devices} usable devices, {request.model.num_layers} layers")
    shortfall = memory_shortfall(request, cm)
    if shortfall is not None:
        raise Infeasible(shortfall)
    search = Search(cm, stages)
    solution = search.best(request.mode, slo=True) or search.best("latency", slo=False)
    if solution is None:
        raise Infeasible(diagnose(request, cm))
    candidates = [_placement(request, cm, search, solution)]
    current = request.current
    if current is not None and len(current) in stages and all(s.pool in {p.name for p in request.pools}
                                                                for s in current):
        pools = request.pool_indices(current)
        kept = estimate(cm, pools, current.sizes)
        if kept.fits:
            candidates.append(Placement(current, kept, request.mode, request.slo))
        resplit = search.for_pools(pools, slo=True) or search.for_pools(pools, slo=False)
        if resplit is not None:
            candidates.append(_placement(request, cm, search, resplit))
    chosen = min(candidates, key=lambda p: _rank(request, p))
    logger.debug("chose %s of %d candidates", chosen.layout.short(), len(candidates))
    return chosen


def _placement(request: PlacementRequest, cm: CostModel, search: Search, sol: Solution) -> Placement:
    pools = [p for p, _ in sol.arrangement.order]
    sizes = search.split(sol)
    layout = layout_of(request, pools, sizes)
    moved, seconds = migration(request, cm, layout)
    return Placement(layout, estimate(cm, pools, sizes), request.mode, request.slo, moved, seconds)


def memory_shortfall(request: PlacementRequest, cm: CostModel) -> str | None:
    """Whether all devices together lack the memory for the weights, or for weights and KV cache."""
    m = request.model
    offered = sum(p.usable * p.memory_gb for p in request.pools) * GB
    weights = m.total_weight_bytes
    if weights > offered:
        params = weights / m.dtype_bytes / 1e9
        return (f"{m.name} ({params:.1f}B parameters) in {m.dtype} needs {weights / GB:.0f} GB of weights; "
                f"pools offer {offered / GB:.0f} GB ({describe(request.pools)})")
    kv = cm.concurrency * cm.kv_tokens * m.kv_bytes_per_token_per_layer * m.num_layers
    usable = offered * USABLE_MEMORY_FRACTION
    if weights + kv > usable:
        return (f"{m.name} needs {weights / GB:.0f} GB of weights + {kv / GB:.0f} GB of KV cache for "
                f"{cm.concurrency:.0f} concurrent requests of {cm.kv_tokens:.0f} tokens; pools offer "
                f"{usable / GB:.0f} GB usable ({USABLE_MEMORY_FRACTION:.0%} of {offered / GB:.0f} GB)")
    return None


def diagnose(request: PlacementRequest, cm: CostModel) -> str:
    """Why the search found nothing, naming the first resource that falls short."""
    m, w = request.model, request.workload
    need = w.rate * m.num_layers * m.prefill_flops_per_layer(w.prompt.mean)
    compute = sum(p.usable * p.tflops for p in request.pools) * 1e12 * COMPUTE_EFFICIENCY
    if need >= compute:
        return (f"{w.rate:g} req/s of {w.prompt.mean:.0f}-token prompts needs {need / 1e12:.0f} TFLOP/s of "
                f"prefill; pools offer {compute / 1e12:.0f} TFLOP/s at {COMPUTE_EFFICIENCY:.0%} efficiency")
    n = request.stage_range().stop - 1
    holds = ", ".join(f"{p.name}: {cm.role(i, n, MID_INTRA).max_layers}" for i, p in enumerate(request.pools)
                      if p.usable)
    return (f"no split of {m.num_layers} layers over at most {n} stages fits: layers a middle stage can hold "
            f"per device ({holds}); the first and last stages also hold the embedding and LM head "
            f"({m.embedding_bytes / GB:.1f} GB each)")
