"""The autoscaling decision loop, one step at a time: signals in, a desired layout and its reason out.

Whoever drives it (the operator, a local demo) calls `step` every `metrics.interval_seconds` with the
time, the latest signals, the running layout (None when scaled to zero) and whether a move is under
way, and applies what comes back. Time is an argument, so tests drive it with a fake clock.
Hysteresis: a breach must last `scale_up.stabilization_seconds`, calm `scale_down.stabilization_seconds`
and idleness `scale_to_zero.idle_seconds`; cooldowns count from the end of the last move; nothing is
proposed while a move is in progress or once the hourly switch budget is spent.

That memory (`AutoscalerTimers`: since when each condition has held, the last move, the switches of the
past hour) is exported by `timers()` and put back by `restore()`, so a driver that restarts (the operator)
carries the stabilization windows, cooldowns and budget over instead of starting them again.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import statistics
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pipeshift.api import Layout
from pipeshift.errors import UserError
from pipeshift.placement.calibration import Calibration
from pipeshift.placement.estimate import Mode
from pipeshift.placement.planner import Placement, PlacementRequest, estimate_layout, plan
from pipeshift.placement.pools import Pool
from pipeshift.placement.profile import ModelProfile
from pipeshift.placement.workload import LengthDist, Slo, Workload
from pipeshift.policy.schema import AutoscalingPolicy
from pipeshift.policy.signals import Signals

logger = logging.getLogger(__name__)

DecisionKind = Literal["scale_up", "scale_down", "scale_to_zero", "cold_start", "pin"]
HOUR = 3600.0


@dataclass(frozen=True)
class Decision:
    at: float
    kind: DecisionKind
    layout: Layout | None  # None: release every stage
    reason: str
    strategy: str  # the policy's reconfiguration strategy, for whoever applies the change
    placement: Placement | None = None


@dataclass(frozen=True)
class AutoscalerTimers:
    """The decision loop's memory, in the clock `step` is given: since when a breach, calm and idleness have
    held (None: not holding), when the last move was proposed or last seen in progress (None: never), and
    the times of the switches of the past hour, oldest first (older ones are dropped when the budget is next
    counted). Checked on creation, so a restored value never breaks the loop later."""

    breach_since: float | None = None
    calm_since: float | None = None
    idle_since: float | None = None
    last_change: float | None = None
    switches: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in ("breach_since", "calm_since", "idle_since", "last_change"):
            value = getattr(self, name)
            if value is not None:
                _check_time(name, value)
        for i, value in enumerate(self.switches):
            _check_time(f"switches[{i}]", value)
        if any(later < earlier for earlier, later in itertools.pairwise(self.switches)):
            raise ValueError(f"switches must be in time order, oldest first: {list(self.switches)}")


def _check_time(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{field} must be a finite time in seconds, not {value!r}")


def _seconds(value: float) -> str:
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"


def _stages(layout: Layout | None) -> tuple[tuple[str, int, int], ...]:
    return () if layout is None else tuple((s.pool, s.start, s.end) for s in layout)


def describe_change(old: Layout | None, new: Layout | None) -> str:
    """`2 → 3 stages on l40s`, naming the pools of the new layout (and the splits when the count stays)."""
    before, after = len(old) if old else 0, len(new) if new else 0
    text = f"{before} → {after} stages"
    if new is None:
        return text
    counts = Counter(s.pool for s in new)
    text += f" on {next(iter(counts))}" if len(counts) == 1 else " (" + ", ".join(
        f"{pool}×{n}" for pool, n in counts.items()) + ")"
    if old is not None and before == after:
        text += f", split {old.short()} → {new.short()}"
    return text


def _allowed_pools(policy: AutoscalingPolicy, pools: Sequence[Pool]) -> tuple[Pool, ...]:
    if not policy.pools:
        return tuple(pools)
    by_name = {p.name: p for p in pools}
    chosen = []
    for choice in policy.pools:
        if choice.name not in by_name:
            raise UserError(f"policy {policy.name}: pool {choice.name!r} is not a cluster pool; "
                            f"pools are {', '.join(by_name)}")
        pool = by_name[choice.name]
        if choice.cost_per_hour is not None:
            pool = dataclasses.replace(pool, cost_per_hour=choice.cost_per_hour)
        chosen.append(pool)
    return tuple(chosen)


class Autoscaler:
    def __init__(self, policy: AutoscalingPolicy, model: ModelProfile, pools: Sequence[Pool]) -> None:
        self.policy = policy
        self.model = model
        self.pools = _allowed_pools(policy, pools)
        self.last_reason = ""  # why the latest step proposed nothing
        self._breach_since: float | None = None
        self._calm_since: float | None = None
        self._idle_since: float | None = None
        self._last_change = -math.inf
        self._switches: deque[float] = deque()
        self._released: Layout | None = None

    def timers(self) -> AutoscalerTimers:
        """The stabilization windows, last move and switches, to be handed to `restore` of another instance."""
        last = None if math.isinf(self._last_change) else self._last_change
        return AutoscalerTimers(self._breach_since, self._calm_since, self._idle_since, last, tuple(self._switches))

    def restore(self, timers: AutoscalerTimers) -> None:
        """Continue from `timers` (from `timers()` of an instance with the same policy): the windows, cooldowns
        and switch budget go on where they were instead of starting again."""
        self._breach_since, self._calm_since = timers.breach_since, timers.calm_since
        self._idle_since = timers.idle_since
        self._last_change = -math.inf if timers.last_change is None else timers.last_change
        self._switches = deque(timers.switches)

    def step(self, now: float, metrics: Signals, current: Layout | None, move_in_progress: bool) -> Decision | None:
        p = self.policy
        if not p.enabled:
            return self._hold(f"autoscaling is off in policy {p.name}")
        if move_in_progress:
            self._last_change = now
            return self._hold("a move is in progress")
        if p.pin is not None:
            return self._pinned(now, current)
        breaches = self._track(now, metrics)
        if current is None:
            return self._cold_start(now, metrics)
        if p.scale_to_zero.enabled and self._held(self._idle_since, now, p.scale_to_zero.idle_seconds):
            if self._budget_spent(now):
                return self._hold(f"idle, but the switch budget ({p.reconfiguration.max_switches_per_hour}/h) is spent")
            self._released = current
            return self._decide(now, "scale_to_zero", None, None, (
                f"idle for {now - self._idle_since:.0f} s (nothing running, queued or finishing): "
                f"{describe_change(current, None)}"))
        if breaches and self._held(self._breach_since, now, p.scale_up.stabilization_seconds):
            return self._scale(now, metrics, current, "scale_up", p.mode, p.scale_up.cooldown_seconds, breaches)
        if p.scale_down.enabled and self._held(self._calm_since, now, p.scale_down.stabilization_seconds):
            return self._scale(now, metrics, current, "scale_down", "cost", p.scale_down.cooldown_seconds, [])
        return self._hold("signals within targets" if not breaches else "breach not yet sustained")

    def _track(self, now: float, s: Signals) -> list[tuple[str, float, float]]:
        """Update how long each condition has held; return the breaches, worst first."""
        t = self.policy.targets
        frac = self.policy.scale_down.below_fraction
        checks = [("TTFT p95", s.ttft_p95, t.ttft_p95_seconds), ("TPOT p95", s.tpot_p95, t.tpot_p95_seconds),
                  ("queue", s.queued, float(t.max_queue))]
        breaches = sorted(((name, v, target) for name, v, target in checks if v is not None and v > target),
                          key=lambda b: -(b[1] / b[2] if b[2] else math.inf))
        # With no request finishing in the window there is no latency to judge; idle then counts as calm.
        calm = all((v is not None and v < frac * target) or (v is None and s.idle) for _, v, target in checks[:2])
        calm = calm and (s.queued or 0) <= frac * t.max_queue
        self._breach_since = (self._breach_since if self._breach_since is not None else now) if breaches else None
        self._calm_since = (self._calm_since if self._calm_since is not None else now) if calm else None
        self._idle_since = (self._idle_since if self._idle_since is not None else now) if s.idle else None
        return breaches

    @staticmethod
    def _held(since: float | None, now: float, seconds: float) -> bool:
        return since is not None and now - since >= seconds

    def _budget_spent(self, now: float) -> bool:
        while self._switches and self._switches[0] <= now - HOUR:
            self._switches.popleft()
        return len(self._switches) >= self.policy.reconfiguration.max_switches_per_hour

    def _hold(self, reason: str) -> None:
        self.last_reason = reason
        return None

    def _decide(self, now: float, kind: DecisionKind, layout: Layout | None, placement: Placement | None,
                reason: str) -> Decision:
        self._last_change = now
        if kind != "cold_start":
            self._switches.append(now)
        self._breach_since = self._calm_since = self._idle_since = None
        self.last_reason = reason
        logger.info("%s at %.0f s: %s", kind, now, reason)
        return Decision(now, kind, layout, reason, self.policy.reconfiguration.strategy, placement)

    def _pinned(self, now: float, current: Layout | None) -> Decision | None:
        pinned = self.policy.pin.layout()
        if _stages(current) == _stages(pinned):
            return self._hold("the layout is pinned by the policy and running")
        if now - self._last_change < self.policy.scale_up.cooldown_seconds:
            return self._hold("the pinned layout was proposed; waiting for the change")
        return self._decide(now, "pin", pinned, None,
                            f"policy {self.policy.name} pins {pinned.short()}: {describe_change(current, pinned)}")

    def _cold_start(self, now: float, s: Signals) -> Decision | None:
        if not s.demand:
            return self._hold("scaled to zero, no demand")
        if self.policy.scale_to_zero.cold_start == "last" and self._released is not None:
            layout, placement = self._released, None
        else:
            placement = self._plan(self.policy.mode, s, None)
            if placement is None:
                return None
            layout = placement.layout
        what = f"{s.queued:.0f} requests queued" if s.queued else "requests arriving"
        return self._decide(now, "cold_start", layout, placement,
                            f"{what} while scaled to zero: {describe_change(None, layout)}")

    def _scale(self, now: float, s: Signals, current: Layout, kind: DecisionKind, mode: Mode, cooldown: float,
               breaches: list[tuple[str, float, float]]) -> Decision | None:
        condition = "breach" if breaches else "calm"
        if now - self._last_change < cooldown:
            return self._hold(f"{condition} sustained, cooling down for {cooldown - (now - self._last_change):.0f} s")
        if self._budget_spent(now):
            return self._hold(f"{condition} sustained, but the switch budget "
                              f"({self.policy.reconfiguration.max_switches_per_hour}/h) is spent")
        placement = self._plan(mode, s, current)
        if placement is None:
            return None
        if _stages(placement.layout) == _stages(current):
            return self._hold(f"{condition} sustained, but the planner keeps {current.short()}")
        change = describe_change(current, placement.layout)
        if breaches:
            name, value, target = breaches[0]
            shown = (f"{value:.0f} > {target:.0f}" if name == "queue"
                     else f"{_seconds(value)} > {_seconds(target)} target")
            reason = f"{name} {shown} for {now - self._breach_since:.0f} s: {change}"
        else:
            kept = self._estimate_cost(current)
            if kept is not None and placement.estimate.cost_per_hour >= kept:
                return self._hold(f"calm, but no cheaper layout than {current.short()} meets the targets")
            price = f", ${kept:.2f}/h → ${placement.estimate.cost_per_hour:.2f}/h" if kept is not None else ""
            reason = (f"every signal under {self.policy.scale_down.below_fraction:.0%} of its target for "
                      f"{now - self._calm_since:.0f} s: {change}{price}")
        return self._decide(now, kind, placement.layout, placement, reason)

    def _request(self, mode: Mode, s: Signals, current: Layout | None,
                 calibration: Calibration | None = None) -> PlacementRequest:
        """The planner's inputs: the observed workload, targets with headroom, the policy's bounds."""
        p, t = self.policy, self.policy.targets
        prompt = s.mean_tokens(s.prompt_tokens_rate) or p.workload.prompt_tokens
        output = s.mean_tokens(s.generated_tokens_rate) or p.workload.output_tokens
        workload = Workload(rate=s.request_rate or 0.0, prompt=LengthDist.fixed(max(1.0, prompt)),
                            output=LengthDist.fixed(max(1.0, output)),
                            min_concurrency=(s.running or 0.0) + (s.queued or 0.0))
        return PlacementRequest(
            model=self.model, pools=self.pools, workload=workload,
            slo=Slo(t.ttft_p95_seconds, t.tpot_p95_seconds).scaled(t.headroom), mode=mode, current=current,
            migration_horizon_seconds=p.reconfiguration.migration_horizon_seconds, min_stages=p.stages.min,
            max_stages=p.stages.max, calibration=calibration or Calibration())

    def _calibration(self, s: Signals, current: Layout | None, mode: Mode) -> Calibration:
        """Measured per-layer step times of the running stages, per pool, and what they leave unexplained.

        The time scale is observed / predicted latency of the running layout once the measured step
        times are in: how much slower than the model the rest of the system runs.
        """
        known = {pool.name for pool in self.pools}
        if current is None or any(st.pool not in known for st in current):
            return Calibration()
        measured: dict[str, list[float]] = {}
        for st in current:
            seconds = s.step_seconds_per_layer.get(str(st.stage_id))
            if seconds:
                measured.setdefault(st.pool, []).append(seconds)
        steps = Calibration({pool: statistics.fmean(v) for pool, v in measured.items()})
        predicted = estimate_layout(self._request(mode, s, current, steps), current)
        ratios = [obs / pred for obs, pred in ((s.ttft_p95, predicted.ttft_p95_s), (s.tpot_p95, predicted.tpot_p95_s))
                  if obs and math.isfinite(pred) and pred > 0]
        return dataclasses.replace(steps, time_scale=max(ratios) if ratios else 1.0)

    def _plan(self, mode: Mode, s: Signals, current: Layout | None) -> Placement | None:
        keep = current if current is not None and current.num_layers == self.model.num_layers else None
        try:
            return plan(self._request(mode, s, keep, self._calibration(s, keep, mode)))
        except UserError as e:
            logger.warning("planner: %s", e)
            return self._hold(f"planner: {e}")

    def _estimate_cost(self, layout: Layout) -> float | None:
        known = {pool.name: pool.cost_per_hour for pool in self.pools}
        if any(s.pool not in known for s in layout):
            return None
        return math.fsum(known[s.pool] for s in layout)
