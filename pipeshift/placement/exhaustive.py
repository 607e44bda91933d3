"""The reference solver: every ordered device choice and every layer split, evaluated one by one.

Exponential, for small instances only: tests and the benchmark measure the search against it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

from pipeshift.placement.cost_model import CostModel, roles_of
from pipeshift.placement.estimate import Mode, objective


@dataclass(frozen=True)
class ExhaustiveResult:
    pools: tuple[int, ...]
    sizes: tuple[int, ...]
    objective: tuple[float, ...]
    slo_met: bool
    plans_evaluated: int


def _splits(layers: int, n: int) -> Iterator[tuple[int, ...]]:
    for cuts in itertools.combinations(range(1, layers), n - 1):
        bounds = (0, *cuts, layers)
        yield tuple(b - a for a, b in itertools.pairwise(bounds))


def exhaustive(cm: CostModel, mode: Mode, stages: range) -> ExhaustiveResult | None:
    """The best plan by `mode` among SLO-meeting plans, else the least-bottleneck plan (by cost on ties)."""
    layers = cm.model.num_layers
    limits = [p.usable for p in cm.pools]
    best_met: tuple[tuple[float, ...], tuple[int, ...], tuple[int, ...]] | None = None
    best_any = best_met
    evaluated = 0
    for n in stages:
        for seq in itertools.product(range(len(cm.pools)), repeat=n):
            if any(seq.count(p) > limit for p, limit in enumerate(limits)):
                continue
            models = [cm.role(p, n, r) for p, r in zip(seq, roles_of(seq), strict=True)]
            cost = math.fsum(cm.pools[p].cost_per_hour for p in seq)
            for sizes in _splits(layers, n):
                evaluated += 1
                if any(k > rm.max_layers for rm, k in zip(models, sizes, strict=True)):
                    continue
                bottleneck = max(rm.time(k) for rm, k in zip(models, sizes, strict=True))
                ttft = 2 * bottleneck + sum(rm.prefill(k) for rm, k in zip(models, sizes, strict=True))
                if ttft <= cm.slo.ttft_p95_s and bottleneck <= cm.slo.tpot_p95_s:
                    key = objective(mode, bottleneck, cost)
                    if best_met is None or key < best_met[0]:
                        best_met = (key, seq, sizes)
                key = objective("latency", bottleneck, cost)
                if best_any is None or key < best_any[0]:
                    best_any = (key, seq, sizes)
    chosen = best_met or best_any
    if chosen is None:
        return None
    return ExhaustiveResult(chosen[1], chosen[2], chosen[0], best_met is not None, evaluated)
