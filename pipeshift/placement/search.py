"""The placement search: the best device choice, stage order and layer split for one objective.

Why it is exact: a stage's time depends only on its pool, its role (first/middle/last, and whether
the next stage is on the same pool) and its layer count, and it grows with the count. So under a
bottleneck threshold T every role has a capacity (the most layers within T and within memory), and
an ordered device choice is feasible at T exactly when its capacities sum to the layer count. The
split is the classic min-max partition, solved by raising T through the stage times in increasing
order until the capacities cover every layer (the least feasible T, to the bit). Orders matter only
through roles: keeping each pool's stages together, entering through the first stage's pool and
leaving through the last stage's, gives every stage a role at least as good as in any other order
(links inside a pool are never slower than out of it), so per device multiset only those canonical
orders are tried. Multisets are pruned against the incumbent with one capacity sum each.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

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


def canonical_order(u: Sequence[int], first: int, last: int, late_exit: bool) -> tuple[Stage, ...]:
    """Each pool's stages together: `first`'s block opens, `last`'s closes, the others in pool order.

    When one pool both opens and closes, its opening run is one stage (`late_exit` false) or two.
    """
    n = sum(u)
    if n == 1:
        return ((first, ONLY),)
    used = [p for p, c in enumerate(u) if c]
    if len(used) == 1:
        return ((first, FIRST_INTRA),) + ((first, MID_INTRA),) * (n - 2) + ((first, LAST),)
    middle = tuple(s for q in used if q not in (first, last)
                   for s in ((q, MID_INTRA),) * (u[q] - 1) + ((q, MID_INTER),))
    if first != last:
        if u[first] == 1:
            front: tuple[Stage, ...] = ((first, FIRST_INTER),)
        else:
            front = ((first, FIRST_INTRA),) + ((first, MID_INTRA),) * (u[first] - 2) + ((first, MID_INTER),)
        return front + middle + ((last, MID_INTRA),) * (u[last] - 1) + ((last, LAST),)
    front = ((first, FIRST_INTRA), (first, MID_INTER)) if late_exit else ((first, FIRST_INTER),)
    return front + middle + ((first, MID_INTRA),) * (u[first] - 1 - len(front)) + ((first, LAST),)


def canonical_groups(u: Sequence[int]) -> list[tuple[tuple[Group, ...], tuple[int, int, bool]]]:
    """The groups of every canonical order of `u` (computed without building the order), with its recipe."""
    used = [p for p, c in enumerate(u) if c]
    n = sum(u)
    if n == 1:
        return [(((used[0], ONLY, 1),), (used[0], used[0], False))]
    if len(used) == 1:
        p = used[0]
        groups = ((p, FIRST_INTRA, 1), (p, MID_INTRA, n - 2), (p, LAST, 1)) if n > 2 else (
            (p, FIRST_INTRA, 1), (p, LAST, 1))
        return [(groups, (p, p, False))]
    out = []
    for f in used:
        for last in used:
            middle: list[Group] = []
            for q in used:
                if q != f and q != last:
                    middle.append((q, MID_INTER, 1))
                    if u[q] > 1:
                        middle.append((q, MID_INTRA, u[q] - 1))
            if f != last:
                if u[f] == 1:
                    front: list[Group] = [(f, FIRST_INTER, 1)]
                else:
                    front = [(f, FIRST_INTRA, 1), (f, MID_INTER, 1)]
                    if u[f] > 2:
                        front.append((f, MID_INTRA, u[f] - 2))
                back: list[Group] = [(last, LAST, 1)]
                if u[last] > 1:
                    back.append((last, MID_INTRA, u[last] - 1))
                out.append((tuple(front + middle + back), (f, last, False)))
            elif u[f] >= 2:
                # The pool both opens and closes the pipeline: it leaves from its first stage, or later.
                tail = [(f, MID_INTRA, u[f] - 2)] if u[f] > 2 else []
                out.append((tuple([(f, FIRST_INTER, 1), *middle, *tail, (f, LAST, 1)]), (f, f, False)))
                if u[f] >= 3:
                    tail = [(f, MID_INTRA, u[f] - 3)] if u[f] > 3 else []
                    out.append((tuple([(f, FIRST_INTRA, 1), (f, MID_INTER, 1), *middle, *tail, (f, LAST, 1)]),
                                (f, f, True)))
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
        best: tuple[float, float, tuple[int, ...], tuple[int, int, bool], tuple[Group, ...], list[int]] | None = None
        for u, cost in sets:
            if mode == "cost" and best is not None and cost > best[1]:
                break
            n = sum(u)
            bound = limit
            if best is not None:
                ties_lose = mode == "cost" or cost >= best[1]
                bound = min(limit, math.nextafter(best[0], 0.0) if ties_lose else best[0])
            for groups, recipe in canonical_groups(u):
                models = self.models(n, groups)
                if bound < math.inf and not self._may_reach(n, groups, models, bound, slo):
                    continue
                found = self.least(models, slo)
                if found is None:
                    continue
                t, caps = found
                if best is None or objective(mode, t, cost) < objective(mode, best[0], best[1]):
                    best = (t, cost, u, recipe, groups, caps)
                    ties_lose = mode == "cost" or cost >= best[1]
                    bound = min(limit, math.nextafter(t, 0.0) if ties_lose else t)
        if best is None:
            return None
        t, cost, u, recipe, groups, caps = best
        order = canonical_order(u, *recipe)
        arr = Arrangement(order, groups)
        return Solution(t, cost, arr, tuple(caps))

    def for_pools(self, pools: Sequence[int], slo: bool) -> Solution | None:
        """The best split for a fixed pool sequence (used to re-split the current layout in place)."""
        arr = Arrangement.of(list(zip(pools, roles_of(pools), strict=True)))
        found = self.least(self.models(arr.n, arr.groups), slo)
        if found is None:
            return None
        cost = math.fsum(self.cm.pools[p].cost_per_hour for p in pools)
        return Solution(found[0], cost, arr, tuple(found[1]))

    def split(self, sol: Solution) -> list[int]:
        """Layers per stage: fewest prefill FLOPs on slow pools first, then balanced within each pool."""
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
