"""From one layout to another: which layers move between which stages.

`plan_moves` is the only place that decides stage identity across a change, so the bytes a
reconfiguration moves are deterministic and the planner, control and operator agree on them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeshift.api.layout import Layout, StagePlan


@dataclass(frozen=True, order=True)
class LayerMove:
    layer: int
    src_stage: int
    dst_stage: int


@dataclass(frozen=True)
class ReconfigPlan:
    """`new` carries the stage ids that `plan_moves` assigned (kept, or fresh for added stages)."""

    old: Layout
    new: Layout
    moves: tuple[LayerMove, ...]
    added: tuple[int, ...]
    removed: tuple[int, ...]

    @property
    def is_noop(self) -> bool:
        return not self.moves and not self.added and not self.removed

    def moved_layers(self) -> list[int]:
        return [m.layer for m in self.moves]


def _overlap(a: StagePlan, b: StagePlan) -> int:
    return max(0, min(a.end, b.end) - max(a.start, b.start))


def plan_moves(old: Layout, new: Layout) -> ReconfigPlan:
    """Match each new stage to the old stage of the same pool it overlaps most.

    Pairs are taken greedily by overlap size, each old stage at most once, which keeps the most
    layers in place. Ties go to the closer pair (fewer layers in one range but not the other), so
    in `4,4 → 3,3,2` the last stage keeps id 1 and the middle one is new; then earlier new stage,
    then lower old id. Unmatched new stages get fresh
    ids above every old id; unmatched old stages are removed. The ids of `new` are ignored.
    """
    if old.num_layers != new.num_layers:
        raise ValueError(f"layouts cover different layer counts: {old.num_layers} vs {new.num_layers}")
    candidates = sorted(
        (-_overlap(o, n), n.num_layers + o.num_layers - 2 * _overlap(o, n), ni, o.stage_id)
        for ni, n in enumerate(new.stages)
        for o in old.stages
        if o.pool == n.pool and _overlap(o, n) > 0
    )
    assigned: dict[int, int] = {}
    taken: set[int] = set()
    for _, _, ni, oid in candidates:
        if ni not in assigned and oid not in taken:
            assigned[ni] = oid
            taken.add(oid)
    next_id = max(s.stage_id for s in old.stages) + 1
    stages, added = [], []
    for ni, n in enumerate(new.stages):
        sid = assigned.get(ni)
        if sid is None:
            sid, next_id = next_id, next_id + 1
            added.append(sid)
        stages.append(StagePlan(sid, n.pool, n.start, n.end))
    renamed = Layout(tuple(stages))
    moves = tuple(
        LayerMove(layer, old.owner(layer).stage_id, renamed.owner(layer).stage_id)
        for layer in range(old.num_layers)
        if old.owner(layer).stage_id != renamed.owner(layer).stage_id
    )
    removed = tuple(sorted(s.stage_id for s in old.stages if s.stage_id not in taken))
    return ReconfigPlan(old, renamed, moves, tuple(added), removed)
