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
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeshift.api import Layout
from pipeshift.operator import manifests as m
from pipeshift.operator.reconcile import NORMAL, Event, Observed, current_layout
from pipeshift.operator.spec import PipelineSpec
from pipeshift.placement.pools import Pool, make_pool
from pipeshift.placement.profile import ModelProfile
from pipeshift.policy.autoscaler import Autoscaler, Decision
from pipeshift.policy.prometheus import PrometheusSource, default_queries
from pipeshift.policy.schema import AutoscalingPolicy
from pipeshift.policy.scrape import ScrapeSource
from pipeshift.policy.source import MetricsSource, MetricsUnavailable

logger = logging.getLogger(__name__)

_REASONS = {"scale_up": "ScaleUp", "scale_down": "ScaleDown", "scale_to_zero": "ScaleToZero",
            "cold_start": "ColdStart", "pin": "PolicyPin"}


@dataclass
class _Pipeline:
    """One pipeline's loop: its autoscaler (rebuilt when the policy, pools or model change), source, target."""

    digest: str
    autoscaler: Autoscaler
    source: MetricsSource
    source_key: tuple[str, ...]
    next_read: float = 0.0
    target: Decision | None = None


class AutoscaleLoop:
    """`desired(...)` per pass; `decided(kind)` is told of every decision (the operator's metrics)."""

    def __init__(self, prometheus_url: str | None = None, clock: Callable[[], float] = time.monotonic,
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
            parsed = _narrowed(AutoscalingPolicy.model_validate(dict(policy)), pools)
            model = ModelProfile.from_config(config, name=key, source="spec.model.config")
            loop = _Pipeline(digest, Autoscaler(parsed, model, pools), *self._source(parsed, observed))
            self._pipelines[key] = loop
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
        decision = loop.autoscaler.step(now, signals, current, moving or loop.target is not None)
        if decision is None:
            self.decided("hold")
            logger.debug("%s: hold: %s", key, loop.autoscaler.last_reason)
            return (loop.target.layout if loop.target else None), []
        self.decided(decision.kind)
        if decision.layout is None:  # scale to zero is the lifecycle hook's (zero.py), not a layout change
            return None, [Event(NORMAL, _REASONS.get(decision.kind, "Autoscale"), decision.reason)]
        loop.target = decision
        return decision.layout, [Event(NORMAL, _REASONS.get(decision.kind, "Autoscale"), decision.reason)]

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


def _narrowed(policy: AutoscalingPolicy, pools: list[Pool]) -> AutoscalingPolicy:
    """The policy's allowed pools less those with no GPU on their Nodes now (they cannot be planned on)."""
    if not policy.pools:
        return policy
    names = {p.name for p in pools}
    kept = [c for c in policy.pools if c.name in names]
    if not kept:
        raise MetricsUnavailable(f"policy {policy.name}: none of its pools has an allocatable GPU on a matching Node")
    return policy.model_copy(update={"pools": kept})


def _same(a: Layout | None, b: Layout | None) -> bool:
    if a is None or b is None:
        return a is b
    return [(s.pool, s.start, s.end) for s in a] == [(s.pool, s.start, s.end) for s in b]
