"""The orchestrator's pure parts: the phase order with its commit point, the pre-copy stop rule against a
brute-force simulation of the link, and the grouping of layer moves into (source, target) copies.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeshift.api import Layout, plan_moves
from pipeshift.control.phases import Phase, PhaseClock, PhaseError
from pipeshift.control.precopy import STALLED_FRACTION, RoundStats, copy_pairs, precopy_done
from pipeshift.control.reconfigure import SwitchBudget


class FakeTime:
    """A clock the test advances by hand (time itself, not a mock of our code)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_phases_run_forward_and_record_the_time_spent_in_each() -> None:
    t = FakeTime()
    clock = PhaseClock(t)
    for phase, spent in [(Phase.PREPARING, 0.5), (Phase.HOLDING, 0.25), (Phase.COMMITTING, 0.125),
                         (Phase.DONE, 1.0)]:
        t.now += spent
        clock.enter(phase)
    assert clock.durations_ms == {"planned": 500.0, "preparing": 250.0, "holding": 125.0, "committing": 1000.0}
    assert clock.elapsed_ms() == 1875.0


def test_before_commit_a_failure_aborts_and_after_it_only_rolls_forward() -> None:
    early = PhaseClock()
    early.enter(Phase.FINAL_COPY)
    assert not early.committed
    with pytest.raises(PhaseError, match="abort"):
        early.enter(Phase.FAILED)
    early.enter(Phase.ABORTED)
    with pytest.raises(PhaseError, match="ended"):
        early.enter(Phase.RESUMING)

    late = PhaseClock()
    late.enter(Phase.COMMITTING)
    assert late.committed
    with pytest.raises(PhaseError, match="roll forward"):
        late.enter(Phase.ABORTED)
    with pytest.raises(PhaseError, match="back"):
        late.enter(Phase.PRECOPYING)
    late.enter(Phase.FAILED)


def simulate(dirty0: int, write_rate: float, link: float, budget_s: float, max_rounds: int) -> list[RoundStats]:
    """Brute force: each round sends everything dirty at `link` bytes/s while serving re-dirties
    `write_rate` bytes/s (never more than was sent); rounds continue until the rule says stop."""
    rounds: list[RoundStats] = []
    dirty = dirty0
    while not precopy_done(rounds, budget_s, max_rounds):
        seconds = dirty / link
        redirtied = min(dirty, int(write_rate * seconds))
        rounds.append(RoundStats(blocks=1, bytes=dirty, seconds=seconds, dirty_blocks=int(redirtied > 0),
                                 dirty_bytes=redirtied))
        dirty = redirtied
    return rounds


@settings(max_examples=60, deadline=None)
@given(
    dirty0=st.integers(1, 10**9),
    write_rate=st.floats(0, 1e9),
    link=st.floats(1e3, 1e10),
    budget_s=st.floats(0, 1),
    max_rounds=st.integers(1, 6),
)
def test_precopy_stops_exactly_when_the_rest_fits_the_budget_stalls_or_the_round_limit_is_hit(
    dirty0: int, write_rate: float, link: float, budget_s: float, max_rounds: int
) -> None:
    rounds = simulate(dirty0, write_rate, link, budget_s, max_rounds)
    assert 1 <= len(rounds) <= max_rounds
    fits = [r.dirty_bytes / link <= budget_s * (1 + 1e-9) for r in rounds]
    stalled = [r.dirty_bytes >= STALLED_FRACTION * r.bytes for r in rounds]
    # Every round but the last left too much and was still converging; the last one fits, or stalled, or the
    # limit stopped it.
    assert not any(fits[:-1]) and not any(stalled[:-1])
    assert fits[-1] or stalled[-1] or len(rounds) == max_rounds


def test_precopy_without_a_measured_speed_stops_only_when_clean_or_at_the_limit() -> None:
    idle = RoundStats(blocks=0, bytes=0, seconds=0.0, dirty_blocks=3, dirty_bytes=300)
    assert not precopy_done([], 1.0, 4)
    assert not precopy_done([idle], 1e9, 4)
    assert precopy_done([idle] * 4, 0.0, 4)
    assert precopy_done([RoundStats(0, 0, 0.0, 0, 0)], 0.0, 4)


@pytest.mark.parametrize(("old", "new"), [("4,4", "3,5"), ("4,4", "3,3,2"), ("3,3,2", "4,4"), ("2,2,2,2", "8")])
def test_copy_pairs_cover_every_moved_layer_once_from_its_old_owner_to_its_new_one(old: str, new: str) -> None:
    plan = plan_moves(Layout.parse(old), Layout.parse(new))
    pairs = copy_pairs(plan)
    sent = sorted(itertools.chain.from_iterable(p.layers for p in pairs))
    expected = sorted(
        layer for layer in range(plan.old.num_layers)
        if plan.old.owner(layer).stage_id != plan.new.owner(layer).stage_id
    )
    assert sent == expected
    for p in pairs:
        for layer in p.layers:
            assert plan.old.owner(layer).stage_id == p.source and plan.new.owner(layer).stage_id == p.target


def test_precopy_stops_when_a_round_no_longer_converges() -> None:
    # 100 MB sent in 1 s against a 10 ms budget: 60 MB left means serving dirties as fast as rounds copy.
    stalled = RoundStats(blocks=10, bytes=100_000_000, seconds=1.0, dirty_blocks=6, dirty_bytes=60_000_000)
    converging = RoundStats(blocks=10, bytes=100_000_000, seconds=1.0, dirty_blocks=4, dirty_bytes=40_000_000)
    assert precopy_done([stalled], 0.01, 4)
    assert not precopy_done([converging], 0.01, 4)


@pytest.mark.parametrize("rate", [0, -1.0, float("inf"), float("nan")])
def test_a_precopy_rate_cap_must_be_a_positive_number_of_bytes_per_second(rate: float) -> None:
    with pytest.raises(ValueError, match="precopy_bytes_per_s"):
        SwitchBudget(precopy_bytes_per_s=rate)
    assert SwitchBudget(precopy_bytes_per_s=50e6).precopy_bytes_per_s == 50e6
    assert SwitchBudget().precopy_bytes_per_s is None
