"""Predictions for one concrete plan (pool and layer count per stage), and the objectives that rank plans.

Every solver ranks plans through these functions, so the search and the exhaustive reference agree
on what a plan is worth to the last bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pipeshift.placement.cost_model import CostModel, StageMemory, roles_of

Mode = Literal["latency", "cost"]
MODES: tuple[Mode, ...] = ("latency", "cost")


@dataclass(frozen=True)
class StageEstimate:
    pool: str
    start: int
    end: int
    step_seconds: float
    memory: StageMemory


@dataclass(frozen=True)
class PlanEstimate:
    stages: tuple[StageEstimate, ...]
    fits: bool  # every stage within memory, prefill load below saturation
    bottleneck_s: float
    ttft_p95_s: float
    tpot_p95_s: float
    throughput_tokens_per_s: float
    concurrency: float
    micro_batches: int
    cost_per_hour: float
    slo_met: bool


def estimate(cm: CostModel, pools: Sequence[int], sizes: Sequence[int]) -> PlanEstimate:
    """Predict a plan whose stage i holds `sizes[i]` layers on pool index `pools[i]`."""
    n = len(pools)
    stages, start, fits, bottleneck, prefill = [], 0, True, 0.0, 0.0
    for p, role, k in zip(pools, roles_of(pools), sizes, strict=True):
        rm = cm.role(p, n, role)
        fits = fits and 1 <= k <= rm.max_layers
        step = rm.time(k) if fits else float("inf")
        bottleneck = max(bottleneck, step)
        prefill += rm.prefill(k)
        stages.append(StageEstimate(cm.pools[p].name, start, start + k, step, rm.memory(k)))
        start += k
    ttft, tpot = 2 * bottleneck + prefill, bottleneck
    return PlanEstimate(
        stages=tuple(stages), fits=fits, bottleneck_s=bottleneck, ttft_p95_s=ttft, tpot_p95_s=tpot,
        throughput_tokens_per_s=cm.concurrency / bottleneck if fits else 0.0, concurrency=cm.concurrency,
        micro_batches=cm.micro_batches(n), cost_per_hour=math.fsum(cm.pools[p].cost_per_hour for p in pools),
        slo_met=fits and ttft <= cm.slo.ttft_p95_s and tpot <= cm.slo.tpot_p95_s)


def objective(mode: Mode, bottleneck: float, cost: float, bytes_moved: float = 0.0) -> tuple[float, ...]:
    """Lexicographic: `latency` is (bottleneck, cost, bytes moved); `cost` is (cost, bottleneck, bytes)."""
    if mode == "latency":
        return (bottleneck, cost, bytes_moved)
    return (cost, bottleneck, bytes_moved)
