"""Layouts and `plan_moves`: the one place stage identity across a change is decided."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeshift.api import Layout, LayoutError, StagePlan, plan_moves


def test_shorthand_gives_local_pool_and_ids_in_order() -> None:
    layout = Layout.parse("3,3,2")
    assert [(s.stage_id, s.pool, s.start, s.end) for s in layout] == [
        (0, "local", 0, 3), (1, "local", 3, 6), (2, "local", 6, 8)]
    assert layout.num_layers == 8 and layout.short() == "3,3,2"


@pytest.mark.parametrize(("text", "message"), [
    ("3,x", "comma-separated"), ("3,0,2", "at least one"), ("", "comma-separated")])
def test_bad_shorthand_is_rejected_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        Layout.parse(text)


def test_shorthand_must_cover_the_model() -> None:
    with pytest.raises(LayoutError, match="covers 7 layers; the model has 8"):
        Layout.parse("4,3", num_layers=8)


def test_gaps_overlaps_and_duplicate_ids_are_rejected() -> None:
    with pytest.raises(LayoutError, match="expected 3"):
        Layout((StagePlan(0, "a", 0, 3), StagePlan(1, "a", 4, 8)))
    with pytest.raises(LayoutError, match="used twice"):
        Layout((StagePlan(0, "a", 0, 3), StagePlan(0, "a", 3, 8)))


def test_json_round_trip() -> None:
    layout = Layout((StagePlan(0, "l40s", 0, 5), StagePlan(3, "a100", 5, 8)))
    assert Layout.from_json(layout.to_json()) == layout


def test_boundary_shift_moves_one_layer_and_keeps_both_ids() -> None:
    plan = plan_moves(Layout.parse("4,4"), Layout.parse("3,5"))
    assert [(m.layer, m.src_stage, m.dst_stage) for m in plan.moves] == [(3, 0, 1)]
    assert plan.added == () and plan.removed == ()


def test_adding_a_middle_stage_takes_layers_from_both_neighbours() -> None:
    plan = plan_moves(Layout.parse("4,4"), Layout.parse("3,3,2"))
    assert [s.stage_id for s in plan.new] == [0, 2, 1]
    assert plan.added == (2,)
    assert [(m.layer, m.src_stage, m.dst_stage) for m in plan.moves] == [(3, 0, 2), (4, 1, 2), (5, 1, 2)]


def test_a_stage_on_another_pool_is_a_new_stage() -> None:
    old = Layout.parse("4,4")
    new = Layout((StagePlan(0, "local", 0, 4), StagePlan(1, "gpu", 4, 8)))
    plan = plan_moves(old, new)
    assert plan.added == (2,) and plan.removed == (1,)
    assert len(plan.moves) == 4


@st.composite
def layouts(draw: st.DrawFn, num_layers: int) -> Layout:
    cuts = sorted(draw(st.sets(st.integers(1, num_layers - 1), max_size=5))) if num_layers > 1 else []
    bounds = [0, *cuts, num_layers]
    pools = draw(st.lists(st.sampled_from(["a", "b"]), min_size=len(bounds) - 1, max_size=len(bounds) - 1))
    ids = draw(st.permutations(range(len(bounds) - 1)))
    return Layout(tuple(StagePlan(ids[i], pools[i], bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)))


@st.composite
def layout_pairs(draw: st.DrawFn) -> tuple[Layout, Layout]:
    n = draw(st.integers(1, 16))
    return draw(layouts(n)), draw(layouts(n))


@settings(max_examples=300, deadline=None)
@given(layout_pairs())
def test_plan_moves_accounts_for_every_layer_exactly(pair: tuple[Layout, Layout]) -> None:
    old, new = pair
    plan = plan_moves(old, new)
    # The renamed layout keeps the requested ranges and pools.
    assert [(s.pool, s.start, s.end) for s in plan.new] == [(s.pool, s.start, s.end) for s in new]
    moved = {m.layer: m for m in plan.moves}
    for layer in range(old.num_layers):
        src, dst = old.owner(layer).stage_id, plan.new.owner(layer).stage_id
        if layer in moved:
            assert (moved[layer].src_stage, moved[layer].dst_stage) == (src, dst) and src != dst
        else:
            assert src == dst
    old_ids, new_ids = {s.stage_id for s in old}, {s.stage_id for s in plan.new}
    assert set(plan.added) == new_ids - old_ids
    assert set(plan.removed) == old_ids - new_ids
    # A kept id stays on its pool and shares at least one layer with its old range.
    for s in plan.new:
        if s.stage_id in old_ids:
            o = old.stage(s.stage_id)
            assert o.pool == s.pool and min(o.end, s.end) > max(o.start, s.start)
    assert plan_moves(old, new) == plan
    assert plan_moves(old, old).is_noop
