"""The placement search: the best device choice, stage order and layer split for one objective.

Why it is exact: a stage's time depends only on its pool, its role (first/middle/last, and whether
the next stage is on the same pool) and its layer count, and it grows with the count. So under a
bottleneck threshold T each role has a capacity (most layers within T and within memory), and an
ordered device choice is feasible at T exactly when its capacities cover every layer. The split is
the classic min-max partition, solved by raising T through the stage times in increasing order
until the capacities cover the layers: the least feasible T, to the bit.

Orders matter only through roles, and a few canonical orders dominate all others: each pool's
stages kept together, the first stage's pool opening and the last stage's closing. Every other
order has at least as many stages sending across pools (a link inside a pool is never slower than
one out of it) and no better first or last stage. When one pool both opens and closes, its first
stage alone opens: the first stage's time equals a middle stage's (the embedding is a lookup) and
only its memory is tighter, so giving it the slower outgoing link costs least. Device multisets are
pruned against the incumbent with one capacity sum each; capacities are cached per threshold.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pipeshift.placement.cost_model import (
    FIRST_INTER,
    FIRST_INTRA,
    LAST,
    MID_INTER,
    MID_INTRA,
    ONLY,
    CostModel,
    Role,
    RoleModel,
    roles_of,
)
from pipeshift.placement.estimate import Mode, objective

Stage = tuple[int, Role]  # (pool index, role)
Group = tuple[int, Role, int]  # (pool index, role, how many stages)


@dataclass(frozen=True)
class Arrangement:
    """An ordered device choice: each stage's pool and role, and the distinct (pool, role) groups."""

    order: tuple[Stage, ...]
    groups: tuple[Group, ...]

    @classmethod
    def of(cls, order: Sequence[Stage]) -> Arrangement:
        counts: dict[Stage, int] = {}
        for stage in order:
            counts[stage] = counts.get(stage, 0) + 1
        return cls(tuple(order), tuple((p, r, m) for (p, r), m in counts.items()))

    @property
    def n(self) -> int:
        return len(self.order)


@dataclass(frozen=True)
class Solution:
    bottleneck: float
    cost: float
    arrangement: Arrangement
    caps: tuple[int, ...]  # per group: most layers per stage within `bottleneck`


class _Incumbent(NamedTuple):
    bottleneck: float
    cost: float
    u: tuple[int, ...]
    recipe: tuple[int, int]  # (first pool, last pool) of the canonical order
    groups: tuple[Group, ...]
    caps: tuple[int, ...]


def canonical_order(u: Sequence[int], first: int, last: int) -> tuple[Stage, ...]:
    """Each pool's stages together: `first`'s block opens, `last`'s closes, the others in pool order.

    When one pool both opens and closes, its first stage alone opens and the rest close.
    """
    n = sum(u)
    if n == 1:
        return ((first, ONLY),)
    used = [p for p, c in enumerate(u) if c]
    if len(used) == 1:
        return ((first, FIRST_INTRA),) + ((first, MID_INTRA),) * (n - 2) + ((first, LAST),)
    middle = tuple(s for q in used if q not in (first, last)
                   for s in ((q, MID_INTRA),) * (u[q] - 1) + ((q, MID_INTER),))
    if first == last:
        return ((first, FIRST_INTER),) + middle + ((first, MID_INTRA),) * (u[first] - 2) + ((first, LAST),)
    if u[first] == 1:
        front: tuple[Stage, ...] = ((first, FIRST_INTER),)
    else:
        front = ((first, FIRST_INTRA),) + ((first, MID_INTRA),) * (u[first] - 2) + ((first, MID_INTER),)
    return front + middle + ((last, MID_INTRA),) * (u[last] - 1) + ((last, LAST),)


def canonical_groups(u: Sequence[int]) -> list[tuple[tuple[Group, ...], tuple[int, int]]]:
    """The groups of every canonical order of `u`, computed without building the order, with (first, last)."""
    used = [p for p, c in enumerate(u) if c]
    n = sum(u)
    if n == 1:
        return [(((used[0], ONLY, 1),), (used[0], used[0]))]
    if len(used) == 1:
        p = used[0]
        groups = ((p, FIRST_INTRA, 1), (p, MID_INTRA, n - 2), (p, LAST, 1)) if n > 2 else (
            (p, FIRST_INTRA, 1), (p, LAST, 1))
        return [(groups, (p, p))]
    out = []
    for f in used:
        for last in used:
            if f == last and u[f] < 2:
                continue
            groups: list[Group] = []
            for q in used:
                if q != f and q != last:
                    groups.append((q, MID_INTER, 1))
                    if u[q] > 1:
                        groups.append((q, MID_INTRA, u[q] - 1))
            if f == last:
                groups += [(f, FIRST_INTER, 1), (f, LAST, 1)]
                if u[f] > 2:
                    groups.append((f, MID_INTRA, u[f] - 2))
            else:
                if u[f] == 1:
                    groups.append((f, FIRST_INTER, 1))
                else:
                    groups += [(f, FIRST_INTRA, 1), (f, MID_INTER, 1)]
                    if u[f] > 2:
                        groups.append((f, MID_INTRA, u[f] - 2))
                groups.append((last, LAST, 1))
                if u[last] > 1:
                    groups.append((last, MID_INTRA, u[last] - 1))
            out.append((tuple(groups), (f, last)))
    return out


class Search:
    def __init__(self, cm: CostModel, stages: range) -> None:
        self.cm = cm
        self.layers = cm.model.num_layers
        self.stages = stages
        self._models: dict[int, list[list[RoleModel | None]]] = {}
        self._caps: dict[tuple[int, float], list[list[int]]] = {}

    def device_sets(self) -> list[tuple[tuple[int, ...], float]]:
        """Every choice of how many devices of each pool to use, with its cost per hour."""
        limits = [p.usable for p in self.cm.pools]
        out: list[tuple[tuple[int, ...], float]] = []

        def walk(prefix: tuple[int, ...], total: int) -> None:
            if len(prefix) == len(limits):
                if total in self.stages:
                    cost = math.fsum(self.cm.pools[p].cost_per_hour for p, c in enumerate(prefix) for _ in range(c))
                    out.append((prefix, cost))
                return
            for c in range(min(limits[len(prefix)], self.stages.stop - 1 - total) + 1):
                walk((*prefix, c), total + c)

        walk((), 0)
        return out

    def _model(self, n: int, pool: int, role: Role) -> RoleModel:
        table = self._models.get(n)
        if table is None:
            table = self._models[n] = [[None] * len(Role) for _ in self.cm.pools]
        rm = table[pool][role]
        if rm is None:
            rm = table[pool][role] = self.cm.role(pool, n, role)
        return rm

    def models(self, n: int, groups: Sequence[Group]) -> list[tuple[RoleModel, int]]:
        return [(self._model(n, p, r), m) for p, r, m in groups]

    def _caps_at(self, n: int, groups: Sequence[Group], models: list[tuple[RoleModel, int]], t: float) -> list[int]:
        """Role capacities at threshold t, cached per (n, t): many device sets share them."""
        table = self._caps.get((n, t))
        if table is None:
            table = self._caps[(n, t)] = [[-1] * len(Role) for _ in self.cm.pools]
        caps = []
        for (p, r, _), (rm, _) in zip(groups, models, strict=True):
            cap = table[p][r]
            if cap < 0:
                cap = table[p][r] = rm.cap(t)
            caps.append(cap)
        return caps

    def _min_prefill(self, models: list[tuple[RoleModel, int]], caps: Sequence[int]) -> float:
        """The least total prefill path (TTFT part) of any split within `caps`: cheapest layers first."""
        total = sum(m * (rm.pi_const + rm.pi_slope) for rm, m in models)
        rest = self.layers - sum(m for _, m in models)
        for (rm, m), cap in sorted(zip(models, caps, strict=True), key=lambda x: x[0][0].pi_slope):
            take = min(rest, m * (cap - 1))
            total += take * rm.pi_slope
            rest -= take
        return total if rest == 0 else math.inf

    def _may_reach(self, n: int, groups: Sequence[Group], models: list[tuple[RoleModel, int]], t: float,
                   slo: bool) -> bool:
        """A necessary condition for a split with bottleneck <= t (meeting the SLOs if `slo`)."""
        caps = self._caps_at(n, groups, models, t)
        if min(caps) < 1 or sum(m * c for (_, m), c in zip(models, caps, strict=True)) < self.layers:
            return False
        if not slo:
            return True
        lowest = max(rm.time(1) for rm, _ in models)
        return 2 * lowest + self._min_prefill(models, caps) <= self.cm.slo.ttft_p95_s

    def least(self, models: list[tuple[RoleModel, int]], slo: bool) -> tuple[float, list[int]] | None:
        """The least bottleneck of any split over these stage groups (meeting the SLOs if `slo`), with caps."""
        if sum(m for _, m in models) > self.layers or any(rm.max_layers < 1 for rm, _ in models):
            return None
        ttft, tpot = self.cm.slo.ttft_p95_s, self.cm.slo.tpot_p95_s
        floor = self._min_prefill(models, [rm.max_layers for rm, _ in models])
        t = max(rm.time(1) for rm, _ in models)
        caps = [rm.cap(t) for rm, _ in models]
        count = sum(m * c for (_, m), c in zip(models, caps, strict=True))
        while True:
            if count >= self.layers and (not slo or 2 * t + self._min_prefill(models, caps) <= ttft):
                return (t, caps) if not slo or t <= tpot else None
            # The next stage time at which some role can take one more layer.
            t = min((rm.time(c + 1) for (rm, _), c in zip(models, caps, strict=True) if c < rm.max_layers),
                    default=math.inf)
            if t == math.inf or (slo and (t > tpot or 2 * t + floor > ttft)):
                return None
            for i, (rm, m) in enumerate(models):
                while caps[i] < rm.max_layers and rm.time(caps[i] + 1) <= t:
                    caps[i] += 1
                    count += m

    def best(self, mode: Mode, slo: bool) -> Solution | None:
        """The best plan by `mode` among those meeting the SLOs (`slo`), or by bottleneck among all."""
        sets = self.device_sets()
        if mode == "cost":
            sets.sort(key=lambda s: (s[1], -sum(s[0])))
        else:
            sets.sort(key=lambda s: (-sum(s[0]), s[1]))
        limit = self.cm.slo.tpot_p95_s if slo else math.inf
        best: _Incumbent | None = None
        for u, cost in sets:
            if mode == "cost" and best is not None and cost > best.cost:
                break
            n = sum(u)
            bound = limit
            if best is not None:
                ties_lose = mode == "cost" or cost >= best.cost
                bound = min(limit, math.nextafter(best.bottleneck, 0.0) if ties_lose else best.bottleneck)
            for groups, recipe in canonical_groups(u):
                models = self.models(n, groups)
                if bound < math.inf and not self._may_reach(n, groups, models, bound, slo):
                    continue
                found = self.least(models, slo)
                if found is None:
                    continue
                t, caps = found
                if best is None or objective(mode, t, cost) < objective(mode, best.bottleneck, best.cost):
                    best = _Incumbent(t, cost, u, recipe, groups, tuple(caps))
                    bound = min(limit, math.nextafter(t, 0.0))  # the same multiset can only tie
        if best is None:
            return None
        arr = Arrangement(canonical_order(best.u, *best.recipe), best.groups)
        return Solution(best.bottleneck, best.cost, arr, best.caps)

    def for_pools(self, pools: Sequence[int], slo: bool) -> Solution | None:
        """The best split for a fixed pool sequence (used to re-split the current layout in place)."""
        arr = Arrangement.of(list(zip(pools, roles_of(pools), strict=True)))
        found = self.least(self.models(arr.n, arr.groups), slo)
        if found is None:
            return None
        cost = math.fsum(self.cm.pools[p].cost_per_hour for p in pools)
        return Solution(found[0], cost, arr, tuple(found[1]))

    def split(self, sol: Solution) -> list[int]:
        """Layers per stage within the caps: first to the pools that prefill fastest (the least TTFT among
        splits with this bottleneck), then balanced within each pool."""
        arr = sol.arrangement
        models = self.models(arr.n, arr.groups)
        per_group = [m for _, m in models]
        rest = self.layers - arr.n
        for i in sorted(range(len(models)), key=lambda i: models[i][0].pi_slope):
            take = min(rest, models[i][1] * (sol.caps[i] - 1))
            per_group[i] += take
            rest -= take
        group_of = {(p, r): i for i, (p, r, _) in enumerate(arr.groups)}
        stage_group = [group_of[s] for s in arr.order]
        sizes = [1] * arr.n
        for pool in {p for p, _ in arr.order}:
            members = [i for i, (p, _) in enumerate(arr.order) if p == pool]
            extra = sum(per_group[g] for g in {stage_group[i] for i in members}) - len(members)
            # Water-fill: each extra layer goes where it raises the stage time least.
            heap = [(models[stage_group[i]][0].time(2), i) for i in members if sol.caps[stage_group[i]] > 1]
            heapq.heapify(heap)
            for _ in range(extra):
                _, i = heapq.heappop(heap)
                sizes[i] += 1
                g = stage_group[i]
                if sizes[i] < sol.caps[g]:
                    heapq.heappush(heap, (models[g][0].time(sizes[i] + 1), i))
        return sizes
