"""The autoscaling loop of a pipeline without `spec.layout`: metrics → policy → planner → the layout it wants.

Each reconcile pass of such a pipeline asks `AutoscaleLoop.desired`, which reads metrics at most every
`metrics.interval_seconds` of the policy, steps the policy's `Autoscaler` (hysteresis, cooldowns and the
switch budget live there) and remembers a proposed layout until the live change to it starts; the pass
then treats that layout like a patched `spec.layout` (`change.py` moves there, resumably).

Metrics: Prometheus (through `prometheus-api-client`) when the policy names one or the operator was given
`--prometheus-url` (which then replaces the policy's URL); otherwise the operator scrapes the pipeline's own
pods: the frontend's and the agents' `/metrics` by pod IP (a `scrape.url` in the policy is for the local
tools, where addresses are known in advance; pod IPs are not). Pools: `spec.pools`, each sized by the
allocatable `nvidia.com/gpu` of the Nodes its `nodeSelector` matches.

The loop's memory survives an operator restart: since when each condition has held (the stabilization
windows), the last change, the switches of the past hour and the pending target are kept in
`status.autoscaling` (`status_patch`, written before each pass when it changed) and read back when a new
process first sees the pipeline. Times are wall-clock seconds, so they mean the same to the next process.

Scale to zero is not decided here: `zero.py` is the one authority (`spec.scaleToZero`, the policy's
`scale_to_zero.idle_seconds`). The policy reaches the `Autoscaler` with `scale_to_zero` off, so an idle
pipeline is only a `hold` here: it never proposes releasing the stages, spends a switch on it or restarts
its windows because of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeshift.api import Layout, StagePlan
from pipeshift.operator import manifests as m
from pipeshift.operator.reconcile import NORMAL, Event, Observed, current_layout
from pipeshift.operator.spec import PipelineSpec
from pipeshift.placement.pools import Pool, make_pool
from pipeshift.placement.profile import ModelProfile
from pipeshift.policy.autoscaler import Autoscaler, AutoscalerTimers, Decision
from pipeshift.policy.prometheus import PrometheusSource, default_queries
from pipeshift.policy.schema import AutoscalingPolicy
from pipeshift.policy.scrape import ScrapeSource
from pipeshift.policy.source import MetricsSource, MetricsUnavailable

logger = logging.getLogger(__name__)

_REASONS = {"scale_up": "ScaleUp", "scale_down": "ScaleDown", "pin": "PolicyPin"}
STATUS_KEY = "autoscaling"


@dataclass
class _Pipeline:
    """One pipeline's loop: its autoscaler (rebuilt when the policy, pools or model change), source, target."""

    digest: str
    autoscaler: Autoscaler
    source: MetricsSource
    source_key: tuple[str, ...]
    next_read: float = 0.0
    target: Decision | None = None
    # Restored windows must not be judged on a scrape's first read, which has no rates yet (it would end them).
    priming: bool = False


class AutoscaleLoop:
    """`desired(...)` per pass; `decided(kind)` is told of every decision (the operator's metrics)."""

    def __init__(self, prometheus_url: str | None = None, clock: Callable[[], float] = time.time,
                 decided: Callable[[str], None] | None = None) -> None:
        self.prometheus_url = prometheus_url
        self.clock = clock
        self.decided = decided or (lambda kind: None)
        self._pipelines: dict[str, _Pipeline] = {}

    def desired(self, key: str, body: Mapping[str, Any], spec: PipelineSpec, policy: Mapping[str, Any] | None,
                observed: Observed, gpus: Callable[[Mapping[str, str]], int]) -> tuple[Layout | None, list[Event]]:
        """The layout the policy wants now (None: keep the current one) and the Events of its decisions.
        `policy`: the policy body (AutoscalingPolicy spec); `gpus(selector)`: allocatable GPUs of a pool."""
        status = body.get("status") or {}
        current = current_layout(status)
        if policy is None or current is None:
            return None, []
        policy = {"name": key.rsplit("/", 1)[-1], **policy}  # an inline policy may leave its name out
        pools = _pools(spec, gpus)
        config = dict(spec.model.config or observed.model_config or {})
        digest = hashlib.sha256(json.dumps([policy, [p.name for p in pools], [p.count for p in pools], config],
                                           sort_keys=True, default=str).encode()).hexdigest()[:16]
        loop = self._pipelines.get(key)
        if loop is None or loop.digest != digest:
            parsed = _for_operator(AutoscalingPolicy.model_validate(dict(policy)), pools)
            model = ModelProfile.from_config(config, name=key, source="spec.model.config")
            fresh = _Pipeline(digest, Autoscaler(parsed, model, pools), *self._source(parsed, observed))
            if loop is None:  # first seen by this process: what its predecessor remembered, for the same policy
                _restore(fresh, status.get(STATUS_KEY))
            loop = self._pipelines[key] = fresh
        else:
            wanted = self._source_key(loop.autoscaler.policy, observed)
            if wanted != loop.source_key:  # pods replaced: scrape the new addresses
                loop.source, loop.source_key = self._source(loop.autoscaler.policy, observed)
        moving = bool(status.get("reconfiguration"))
        if loop.target is not None and (moving or _same(loop.target.layout, current)):
            loop.target = None  # the change it asked for started (or the layout already is there)
        now = self.clock()
        if now < loop.next_read:
            return (loop.target.layout if loop.target else None), []
        loop.next_read = now + loop.autoscaler.policy.metrics.interval_seconds
        try:
            signals = loop.source.read()
        except MetricsUnavailable as error:
            logger.info("%s: metrics unavailable, holding: %s", key, error)
            self.decided("hold")
            return (loop.target.layout if loop.target else None), []
        if loop.priming:
            loop.priming = False
            self.decided("hold")
            return (loop.target.layout if loop.target else None), []
        decision = loop.autoscaler.step(now, signals, current, moving or loop.target is not None)
        if decision is None:
            self.decided("hold")
            logger.debug("%s: hold: %s", key, loop.autoscaler.last_reason)
            return (loop.target.layout if loop.target else None), []
        self.decided(decision.kind)
        loop.target = decision
        return decision.layout, [Event(NORMAL, _REASONS.get(decision.kind, "Autoscale"), decision.reason)]

    def status_patch(self, key: str, previous: Mapping[str, Any]) -> dict[str, Any] | None:
        """`{"autoscaling": ...}` to write when the loop's memory differs from `previous` (the status), else None.
        Written whole, with explicit nulls, since a merge patch keeps keys it does not name."""
        loop = self._pipelines.get(key)
        if loop is None:
            return None
        state = _state(loop)
        return None if _strip(state) == _strip(previous.get(STATUS_KEY)) else {STATUS_KEY: state}

    def reason(self, key: str) -> str | None:
        """Why the pending target was chosen (for the change's Event and status)."""
        loop = self._pipelines.get(key)
        return loop.target.reason if loop is not None and loop.target is not None else None

    def _source_key(self, policy: AutoscalingPolicy, observed: Observed) -> tuple[str, ...]:
        if policy.metrics.prometheus is not None or self.prometheus_url:
            return ("prometheus", self.prometheus_url or str(policy.metrics.prometheus.url))  # type: ignore[union-attr]
        return ("scrape", *_scrape_urls(observed))

    def _source(self, policy: AutoscalingPolicy, observed: Observed) -> tuple[MetricsSource, tuple[str, ...]]:
        key = self._source_key(policy, observed)
        window = policy.metrics.window_seconds
        if key[0] == "prometheus":
            config = policy.metrics.prometheus
            queries = default_queries(window, config.selector if config is not None else "")
            if config is not None:
                queries.update({k: v for k, v in config.queries.model_dump().items() if v is not None})
            return PrometheusSource(key[1], queries), key
        urls = key[1:]
        if not urls:
            return _Unavailable("no running frontend pod to scrape"), key
        return ScrapeSource(urls[0], stage_urls=list(urls[1:]), clock=self.clock), key


class _Unavailable:
    def __init__(self, why: str) -> None:
        self.why = why

    def read(self) -> Any:
        raise MetricsUnavailable(self.why)


def _scrape_urls(observed: Observed) -> tuple[str, ...]:
    """The frontend's /metrics first, then every running agent's (control port)."""
    up = [p for p in observed.pods if p.ready and p.pod_ip and not p.deleting and not p.finished]
    frontends = [f"http://{_host(p.pod_ip)}:{m.FRONTEND_PORT}/metrics" for p in up if p.role == m.ROLE_FRONTEND]
    if not frontends:
        return ()
    stages = sorted((p for p in up if p.role == m.ROLE_STAGE), key=lambda p: p.name)
    return (frontends[0], *(f"http://{m.stage_address(str(p.pod_ip))}/metrics" for p in stages))


def _host(ip: str | None) -> str:
    return f"[{ip}]" if ip and ":" in ip else str(ip)


def _pools(spec: PipelineSpec, gpus: Callable[[Mapping[str, str]], int]) -> list[Pool]:
    """`spec.pools` as the planner's pools; one without a GPU on a matching Node is left out."""
    out = []
    for pool in spec.pools:
        count = gpus(pool.node_selector)
        if count < 1:
            continue
        extra = {} if pool.cost_per_hour is None else {"cost_per_hour": pool.cost_per_hour}
        out.append(make_pool(pool.name, pool.gpu, count, **extra))
    return out


def _for_operator(policy: AutoscalingPolicy, pools: list[Pool]) -> AutoscalingPolicy:
    """The policy as the operator's Autoscaler gets it: scale to zero off (`zero.py` decides that), and the
    allowed pools less those with no GPU on their Nodes now (they cannot be planned on)."""
    policy = policy.model_copy(update={"scale_to_zero": policy.scale_to_zero.model_copy(update={"enabled": False})})
    if not policy.pools:
        return policy
    names = {p.name for p in pools}
    kept = [c for c in policy.pools if c.name in names]
    if not kept:
        raise MetricsUnavailable(f"policy {policy.name}: none of its pools has an allocatable GPU on a matching Node")
    return policy.model_copy(update={"pools": kept})


def _state(loop: _Pipeline) -> dict[str, Any]:
    """`status.autoscaling`: the loop's memory, in wall-clock seconds (see the module docstring): the
    Autoscaler's timers and the pending target."""
    timers, target = loop.autoscaler.timers(), loop.target
    return {
        "digest": loop.digest,
        "pendingSince": {"breach": timers.breach_since, "calm": timers.calm_since, "idle": timers.idle_since},
        "lastChange": timers.last_change,
        "switches": list(timers.switches),
        "target": None if target is None or target.layout is None else {
            "at": target.at, "kind": target.kind, "reason": target.reason,
            "stages": [{"stageId": s.stage_id, "pool": s.pool, "layers": [s.start, s.end]} for s in target.layout]},
    }


def _restore(loop: _Pipeline, saved: Any) -> None:
    """Put `status.autoscaling` back into a new loop, when it was written for the same policy, pools and model
    (another policy starts its windows afresh). A malformed entry is ignored: the windows start again."""
    if not isinstance(saved, Mapping) or saved.get("digest") != loop.digest:
        return
    scaler = loop.autoscaler
    try:
        since = saved.get("pendingSince") or {}
        timers = AutoscalerTimers(
            breach_since=_seconds(since.get("breach")), calm_since=_seconds(since.get("calm")),
            idle_since=_seconds(since.get("idle")), last_change=_seconds(saved.get("lastChange")),
            switches=tuple(float(t) for t in saved.get("switches") or []))
        target = saved.get("target")
        decision = None if not isinstance(target, Mapping) else Decision(
            float(target["at"]), target["kind"], Layout(tuple(
                StagePlan(int(s["stageId"]), str(s["pool"]), int(s["layers"][0]), int(s["layers"][1]))
                for s in target["stages"])), str(target["reason"]), scaler.policy.reconfiguration.strategy)
    except (KeyError, TypeError, ValueError, IndexError) as error:
        logger.warning("status.%s is malformed, the stabilization windows start again: %s", STATUS_KEY, error)
        return
    scaler.restore(timers)
    loop.target = decision
    loop.priming = isinstance(loop.source, ScrapeSource)


def _seconds(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"not a time in seconds: {value!r}")
    return float(value)


def _strip(value: Any) -> Any:
    """`value` without null entries, as the API server keeps a merge-patched object."""
    if isinstance(value, Mapping):
        return {k: _strip(v) for k, v in value.items() if v is not None}
    return value


def _same(a: Layout | None, b: Layout | None) -> bool:
    if a is None or b is None:
        return a is b
    return [(s.pool, s.start, s.end) for s in a] == [(s.pool, s.start, s.end) for s in b]
