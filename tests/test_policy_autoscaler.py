"""The decision loop on a fake clock: hysteresis, cooldowns, scale to zero, pins, the exact proposal counts, and its
timers carried over to a new instance."""

from __future__ import annotations

import random
import re
from collections.abc import Callable

import pytest

from pipeshift.api import Layout
from pipeshift.errors import UserError
from pipeshift.placement import (
    LengthDist,
    ModelProfile,
    PlacementRequest,
    PlanEstimate,
    Slo,
    Workload,
    estimate_layout,
    make_pool,
)
from pipeshift.policy import Autoscaler, AutoscalingPolicy, Decision, Signals, describe_change
from pipeshift.policy.autoscaler import AutoscalerTimers

MODEL = ModelProfile("llama-8b", 32, 4096, 32, 8, 128, 14336, 128256)
POOLS = (make_pool("l4", "l4", 4), make_pool("l40s", "l40s", 4))
INTERVAL = 15.0
TTFT, TPOT, QUEUE = 2.0, 0.05, 8
ON_L4 = Layout.from_json({"stages": [{"pool": "l4", "layers": [0, 16]}, {"pool": "l4", "layers": [16, 32]}]})
BUSY = {"running": 10.0, "request_rate": 2.0, "prompt_tokens_rate": 1024.0, "generated_tokens_rate": 256.0}


def policy(**changes: object) -> AutoscalingPolicy:
    base = {"name": "test", "mode": "cost",
            "targets": {"ttft_p95_seconds": TTFT, "tpot_p95_seconds": TPOT, "max_queue": QUEUE, "headroom": 0.8},
            "scale_up": {"stabilization_seconds": 60, "cooldown_seconds": 120},
            "scale_down": {"below_fraction": 0.3, "stabilization_seconds": 300, "cooldown_seconds": 600},
            "metrics": {"interval_seconds": INTERVAL, "scrape": {"url": "http://frontend:8000/metrics"}}}
    return AutoscalingPolicy.model_validate({**base, **changes})


def near_target(rng: random.Random) -> Signals:
    """Measurements wandering within 20 % under every target."""
    return Signals(ttft_p95=TTFT * (1 - 0.2 * rng.random()), tpot_p95=TPOT * (1 - 0.2 * rng.random()),
                   queued=float(rng.randint(0, QUEUE)), **BUSY)


def breaching(t: float) -> Signals:
    """Whatever the layout, TPOT stays 50 % over target."""
    return Signals(ttft_p95=0.5 * TTFT, tpot_p95=1.5 * TPOT, queued=0.0, **BUSY)


class Plant:
    """A serving system whose latencies are the model's predictions for the running layout, stretched.

    The stretch is set so that the layout it starts on runs at `breach` x the TPOT target under load.
    """

    def __init__(self, layout: Layout, breach: float) -> None:
        self.layout = layout
        self.stretch = breach * TPOT / self._predicted(layout).tpot_p95_s
        self.move_until: float | None = None
        self.pending: Layout | None = None

    @staticmethod
    def _predicted(layout: Layout) -> PlanEstimate:
        workload = Workload(2.0, LengthDist.fixed(512), LengthDist.fixed(128), min_concurrency=10)
        request = PlacementRequest(MODEL, POOLS, workload, Slo(TTFT, TPOT).scaled(0.8))
        return estimate_layout(request, layout)

    def signals(self) -> Signals:
        e = self._predicted(self.layout)
        return Signals(ttft_p95=self.stretch * e.ttft_p95_s, tpot_p95=self.stretch * e.tpot_p95_s, queued=0.0, **BUSY)

    def apply(self, decision: Decision, now: float, move_s: float = 30.0) -> None:
        self.pending, self.move_until = decision.layout, now + move_s

    def tick(self, now: float) -> bool:
        """Finish a move that is due; whether one is still in progress."""
        if self.move_until is not None and now >= self.move_until:
            self.layout, self.move_until = self.pending, None
        return self.move_until is not None


def run(scaler: Autoscaler, seconds: float, signals: Callable[[float], Signals],
        layout: Layout | None, start: float = 0.0) -> list[Decision]:
    decisions, t = [], start
    while t < seconds:
        d = scaler.step(t, signals(t), layout, move_in_progress=False)
        if d is not None:
            decisions.append(d)
            layout = d.layout
        t += INTERVAL
    return decisions


def test_noise_within_20_percent_under_target_for_an_hour_proposes_nothing() -> None:
    rng = random.Random(11)
    scaler = Autoscaler(policy(), MODEL, POOLS)
    assert run(scaler, 3600, lambda t: near_target(rng), ON_L4) == []
    assert scaler.last_reason == "signals within targets"


def test_spikes_shorter_than_the_stabilization_window_propose_nothing() -> None:
    rng = random.Random(5)

    def spiky(t: float) -> Signals:
        if t % 600 < 45:  # 45 s over target every ten minutes
            return Signals(ttft_p95=TTFT * 1.5, tpot_p95=TPOT * 1.5, queued=0.0, **BUSY)
        return near_target(rng)

    assert run(Autoscaler(policy(), MODEL, POOLS), 3600, spiky, ON_L4) == []


def test_a_sustained_50_percent_breach_scales_up_exactly_once_within_the_window() -> None:
    scaler = Autoscaler(policy(), MODEL, POOLS)
    plant = Plant(ON_L4, breach=1.5)
    rng = random.Random(2)
    surge_at = 600.0
    decisions, t = [], 0.0
    while t < 3600:
        moving = plant.tick(t)
        signals = plant.signals() if t >= surge_at else near_target(rng)
        d = scaler.step(t, signals, plant.layout, moving)
        if d is not None:
            decisions.append(d)
            plant.apply(d, t)
        t += INTERVAL
    assert len(decisions) == 1
    (d,) = decisions
    assert d.kind == "scale_up"
    assert surge_at + 60 <= d.at <= surge_at + 60 + INTERVAL
    assert re.fullmatch(r"TPOT p95 75 ms > 50 ms target for \d+ s: 2 → \d+ stages.*", d.reason), d.reason
    assert plant.signals().tpot_p95 < TPOT, "the new layout resolves the breach"


def test_idle_past_the_scale_to_zero_period_releases_everything_once() -> None:
    scaler = Autoscaler(policy(scale_to_zero={"enabled": True, "idle_seconds": 900}), MODEL, POOLS)
    idle = Signals(queued=0.0, running=0.0, request_rate=0.0)
    decisions = run(scaler, 3600, lambda t: idle, ON_L4)
    assert [(d.kind, d.layout) for d in decisions] == [("scale_to_zero", None)]
    assert 900 <= decisions[0].at <= 900 + INTERVAL
    assert decisions[0].reason.startswith("idle for 900 s") and decisions[0].reason.endswith("2 → 0 stages")
    assert scaler.last_reason == "scaled to zero, no demand"


@pytest.mark.parametrize("cold_start", ["last", "plan"])
def test_demand_after_scaling_to_zero_starts_a_layout(cold_start: str) -> None:
    scaler = Autoscaler(policy(scale_to_zero={"enabled": True, "idle_seconds": 900, "cold_start": cold_start}),
                        MODEL, POOLS)
    idle = Signals(queued=0.0, running=0.0, request_rate=0.0)
    waiting = Signals(queued=3.0, running=0.0, request_rate=0.0)
    decisions = run(scaler, 3600, lambda t: idle if t < 2000 else waiting, ON_L4)
    assert [d.kind for d in decisions] == ["scale_to_zero", "cold_start"]
    start = decisions[1]
    assert 2000 <= start.at <= 2000 + INTERVAL and start.reason.startswith("3 requests queued while scaled to zero")
    if cold_start == "last":
        assert start.layout == ON_L4
    else:
        assert start.layout is not None and start.placement is not None and start.placement.estimate.slo_met


def test_nothing_is_proposed_during_a_move_and_cooldown_counts_from_its_end() -> None:
    scaler = Autoscaler(policy(), MODEL, POOLS)
    plant = Plant(ON_L4, breach=1.5)
    first = next(t * INTERVAL for t in range(100)
                 if scaler.step(t * INTERVAL, plant.signals(), plant.layout, move_in_progress=t * INTERVAL < 450))
    # The breach holds all along; the move is last seen at 435 s and the scale-up cooldown is 120 s.
    assert 435 + 120 <= first <= 435 + 120 + INTERVAL


def test_a_pinned_layout_is_proposed_until_it_runs() -> None:
    pin = {"stages": [{"pool": "l40s", "layers": [0, 20]}, {"pool": "l40s", "layers": [20, 32]}]}
    scaler = Autoscaler(policy(pin=pin), MODEL, POOLS)
    first = scaler.step(0.0, Signals(), ON_L4, move_in_progress=False)
    assert first is not None and first.kind == "pin" and first.layout.short() == "20,12"
    assert first.reason == "policy test pins 20,12: 2 → 2 stages on l40s, split 16,16 → 20,12"
    assert scaler.step(INTERVAL, Signals(), ON_L4, move_in_progress=False) is None  # not applied yet: wait
    assert scaler.step(1000.0, Signals(), first.layout, move_in_progress=False) is None


def test_autoscaling_off_never_proposes() -> None:
    plant = Plant(ON_L4, breach=3.0)
    scaler = Autoscaler(policy(enabled=False), MODEL, POOLS)
    assert run(scaler, 3600, lambda t: plant.signals(), ON_L4) == []
    assert scaler.last_reason == "autoscaling is off in policy test"


def test_the_switch_budget_caps_changes_per_hour() -> None:
    cluster = (*POOLS, make_pool("h100", "h100-80gb", 4))  # room for a second, faster step
    unlimited = run(Autoscaler(policy(), MODEL, cluster), 3600, breaching, ON_L4)
    limited = run(Autoscaler(policy(reconfiguration={"max_switches_per_hour": 1}), MODEL, cluster), 3600,
                  breaching, ON_L4)
    assert len(unlimited) > 1 and len(limited) == 1


def test_calm_scales_down_to_a_cheaper_layout() -> None:
    on_l40s = Layout.from_json({"stages": [{"pool": "l40s", "layers": [0, 8]}, {"pool": "l40s", "layers": [8, 16]},
                                           {"pool": "l40s", "layers": [16, 24]}, {"pool": "l40s", "layers": [24, 32]}]})
    light = Signals(ttft_p95=0.1 * TTFT, tpot_p95=0.1 * TPOT, queued=0.0, running=1.0, request_rate=0.2,
                    prompt_tokens_rate=100.0, generated_tokens_rate=25.0)
    decisions = run(Autoscaler(policy(), MODEL, POOLS), 3600, lambda t: light, on_l40s)
    assert decisions and decisions[0].kind == "scale_down" and 300 <= decisions[0].at <= 300 + INTERVAL
    d = decisions[0]
    assert d.placement.estimate.cost_per_hour < 4 * POOLS[1].cost_per_hour
    assert re.fullmatch(r"every signal under 30% of its target for 300 s: 4 → \d+ stages.*, "
                        r"\$5\.60/h → \$\d+\.\d\d/h", d.reason), d.reason


def test_measured_step_times_decide_where_the_load_goes() -> None:
    mixed = Layout.from_json({"stages": [{"pool": "l40s", "layers": [0, 20]}, {"pool": "l4", "layers": [20, 32]}]})

    def proposal(measured: dict[str, float]) -> set[str]:
        signals = Signals(ttft_p95=0.5 * TTFT, tpot_p95=1.5 * TPOT, queued=0.0, step_seconds_per_layer=measured,
                          **BUSY)
        (d,) = run(Autoscaler(policy(reconfiguration={"max_switches_per_hour": 1}), MODEL, POOLS), 600,
                   lambda t: signals, mixed)
        return {s.pool for s in d.layout}

    assert proposal({}) == {"l40s"}  # by the datasheets, l40s is the faster pool
    assert proposal({"0": 4e-3, "1": 2e-4}) == {"l4"}  # measured on stages 0 (l40s) and 1 (l4): the reverse


def test_a_change_is_described_by_stage_counts_and_pools() -> None:
    two = Layout.from_json({"stages": [{"pool": "l40s", "layers": [0, 4]}, {"pool": "l40s", "layers": [4, 8]}]})
    three = Layout.from_json({"stages": [{"pool": "l40s", "layers": [0, 3]}, {"pool": "l40s", "layers": [3, 6]},
                                         {"pool": "l40s", "layers": [6, 8]}]})
    mixed = Layout.from_json({"stages": [{"pool": "l4", "layers": [0, 3]}, {"pool": "l40s", "layers": [3, 8]}]})
    assert describe_change(two, three) == "2 → 3 stages on l40s"
    assert describe_change(three, mixed) == "3 → 2 stages (l4×1, l40s×1)"
    assert describe_change(None, two) == "0 → 2 stages on l40s"
    assert describe_change(two, None) == "2 → 0 stages"


def test_policy_pools_must_exist_in_the_cluster() -> None:
    with pytest.raises(UserError, match="pool 'h100' is not a cluster pool; pools are l4, l40s"):
        Autoscaler(policy(pools=[{"name": "h100"}]), MODEL, POOLS)


def test_a_restored_instance_continues_the_stabilization_window() -> None:
    first = Autoscaler(policy(), MODEL, POOLS)
    assert run(first, 60, breaching, ON_L4) == []  # breached from 0 s; 60 s are needed
    timers = first.timers()
    assert timers == AutoscalerTimers(breach_since=0.0)

    restored, fresh = Autoscaler(policy(), MODEL, POOLS), Autoscaler(policy(), MODEL, POOLS)
    restored.restore(timers)
    decision = restored.step(60.0, breaching(60.0), ON_L4, move_in_progress=False)
    assert decision is not None and decision.kind == "scale_up"
    assert decision.reason.startswith("TPOT p95 75 ms > 50 ms target for 60 s")
    assert fresh.step(60.0, breaching(60.0), ON_L4, move_in_progress=False) is None
    assert fresh.last_reason == "breach not yet sustained"


def test_a_restored_instance_keeps_the_switch_budget_until_its_hour_is_over() -> None:
    one_per_hour = policy(reconfiguration={"max_switches_per_hour": 1})
    cluster = (*POOLS, make_pool("h100", "h100-80gb", 4))  # room for a second, faster step
    before = Autoscaler(one_per_hour, MODEL, cluster)
    (decision,) = run(before, 60 + INTERVAL, breaching, ON_L4)
    timers = before.timers()
    assert timers.switches == (decision.at,) and timers.last_change == decision.at
    assert timers.breach_since is None  # a decision restarts every window

    restored = Autoscaler(one_per_hour, MODEL, cluster)
    restored.restore(timers)
    after = run(restored, decision.at + 3600 + 200, breaching, decision.layout, start=decision.at + INTERVAL)
    assert len(after) == 1 and after[0].at >= decision.at + 3600, [d.at for d in after]
    fresh = run(Autoscaler(one_per_hour, MODEL, cluster), decision.at + 600, breaching, decision.layout,
                start=decision.at + INTERVAL)
    assert len(fresh) == 1 and fresh[0].at < decision.at + 600  # without the timers, the budget is whole


def test_timers_round_trip_and_a_fresh_loop_has_none() -> None:
    scaler = Autoscaler(policy(), MODEL, POOLS)
    assert scaler.timers() == AutoscalerTimers()
    saved = AutoscalerTimers(breach_since=10.0, calm_since=None, idle_since=5.0, last_change=3.0,
                             switches=(1.0, 3.0))
    scaler.restore(saved)
    assert scaler.timers() == saved


@pytest.mark.parametrize(("fields", "message"), [
    ({"calm_since": float("nan")}, "calm_since must be a finite time in seconds, not nan"),
    ({"last_change": float("-inf")}, "last_change must be a finite time in seconds, not -inf"),
    ({"breach_since": True}, "breach_since must be a finite time in seconds, not True"),
    ({"switches": (1.0, "2")}, r"switches\[1\] must be a finite time in seconds, not '2'"),
    ({"switches": (5.0, 1.0)}, r"switches must be in time order, oldest first: \[5.0, 1.0\]"),
])
def test_bad_timers_are_refused_naming_the_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AutoscalerTimers(**fields)  # type: ignore[arg-type]
