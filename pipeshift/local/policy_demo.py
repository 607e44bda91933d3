"""`pipeshift demo --policy FILE`: an autoscaling policy drives a local pipeline's layout while load rises and
falls; every decision is applied live and reported with the reason the policy gave for it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeshift.api import Layout
from pipeshift.control import ReconfigReport
from pipeshift.errors import UserError
from pipeshift.local.live import LivePipeline
from pipeshift.local.loadgen import PlannedRequest, StreamResult, replay
from pipeshift.local.processes import start_agents
from pipeshift.local.reconfigure_endpoint import check_strategy
from pipeshift.local.serve import frontend_config
from pipeshift.local.trace import workload
from pipeshift.placement.pools import make_pool
from pipeshift.placement.profile import DTYPE_BYTES, ModelProfile
from pipeshift.policy import Autoscaler, AutoscalingPolicy, Decision, MetricsUnavailable, Signals, load_policy
from pipeshift.policy.scrape import ScrapeSource
from pipeshift.runtime.frontend import BackgroundFrontend
from pipeshift.runtime.model.config import LlamaConfig

logger = logging.getLogger(__name__)

POOL = "cpu"  # the catalogue's local host: every stage of a local pipeline runs on it
DEFAULT_MAX_STAGES = 4


@dataclass(frozen=True)
class DecisionRecord:
    """One decision as the report shows it; `outcome` is the change's (committed, aborted, failed) or why
    nothing was changed."""

    at_s: float
    kind: str
    from_layout: str
    to: str
    reason: str
    outcome: str
    pause_ms: float | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["from"] = data.pop("from_layout")
        return data


def rising_and_falling(n: int, peak_rate: float, *, seed: int, vocab: int, prompt_tokens: int,
                       max_tokens: int) -> list[PlannedRequest]:
    """`n` Poisson arrivals whose rate climbs linearly to `peak_rate` and back to zero.

    Given their count, the arrivals of a Poisson process are independent draws from its rate curve, so
    a triangular distribution over the span T = 2n / peak (where the expected count is n) gives them.
    """
    rng = random.Random(seed)
    span = 2 * n / peak_rate
    planned = []
    for at in sorted(rng.triangular(0.0, span, span / 2) for _ in range(n)):
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(max(1, prompt_tokens // 2), prompt_tokens))]
        planned.append(PlannedRequest(at, prompt, rng.randint(max(1, max_tokens // 2), max_tokens)))
    return planned




def initial_layout(policy: AutoscalingPolicy, num_layers: int) -> Layout:
    """The policy's pinned layout, else its minimum stage count with the layers split evenly."""
    if policy.pin is not None:
        return policy.pin.layout()
    stages = policy.stages.min
    if stages > num_layers:
        raise UserError(f"policy {policy.name}: stages.min is {stages}, but the model has only {num_layers} layers")
    return Layout.from_sizes([num_layers // stages + (i < num_layers % stages) for i in range(stages)], pool=POOL)


def autoscaler_for(policy: AutoscalingPolicy, model: Path, dtype: str) -> Autoscaler:
    """The policy's autoscaler over one `cpu` pool with room for `stages.max` stages.

    The planner's estimates know no float64; float32 is the nearest it prices, and the scrape's measured
    latencies calibrate the rest.
    """
    profile = ModelProfile.from_path(model, dtype=dtype if dtype in DTYPE_BYTES else "float32")
    pool = make_pool(POOL, POOL, policy.stages.max or DEFAULT_MAX_STAGES)
    return Autoscaler(policy, profile, [pool])


class PolicyLoop:
    """Reads the frontend's metrics every interval, steps the autoscaler and applies its decisions live.

    One change at a time: a change runs in a worker thread while the loop keeps reading metrics and
    tells the autoscaler a move is in progress. Scale to zero is recorded but its stages stay up (a
    local pipeline cannot serve the cold start that would bring them back), so the autoscaler is told
    the layout is released and a later cold start of the same layout changes nothing.
    """

    def __init__(self, autoscaler: Autoscaler, source: ScrapeSource, pipeline: LivePipeline, frontend_url: str,
                 strategy: str) -> None:
        self.autoscaler, self.source, self.pipeline = autoscaler, source, pipeline
        self.frontend_url, self.strategy = frontend_url, check_strategy(strategy)
        self.decisions: list[DecisionRecord] = []
        self.released = False
        self._t0 = time.monotonic()

    def running(self) -> Layout:
        return Layout.from_sizes(self.pipeline.layout.sizes, pool=POOL)

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    async def run(self, until: asyncio.Event, linger_s: float) -> None:
        interval = self.autoscaler.policy.metrics.interval_seconds
        change: asyncio.Task[None] | None = None
        ended: float | None = None
        while ended is None or self.elapsed() - ended < linger_s or (change is not None and not change.done()):
            await asyncio.sleep(interval)
            if ended is None and until.is_set():
                ended = self.elapsed()
            try:
                signals = await asyncio.to_thread(self.source.read)
            except MetricsUnavailable as error:
                logger.warning("holding this interval: %s", error)
                continue
            moving = change is not None and not change.done()
            decision = self.autoscaler.step(self.elapsed(), signals, None if self.released else self.running(),
                                            moving)
            logger.debug("%.1f s: %s -> %s", self.elapsed(), signals, self.autoscaler.last_reason)
            if decision is not None:
                change = self._apply(decision, signals)
        if change is not None:
            await change

    def _apply(self, decision: Decision, signals: Signals) -> asyncio.Task[None] | None:
        before = "0" if self.released else self.pipeline.layout.short()
        if decision.layout is None:
            self.released = True
            self.decisions.append(DecisionRecord(decision.at, decision.kind, before, "0", decision.reason,
                                                 "not applied: the local demo keeps its stages running"))
            return None
        self.released = False
        target = decision.layout.short()
        if target == self.pipeline.layout.short():
            self.decisions.append(DecisionRecord(decision.at, decision.kind, before, target, decision.reason,
                                                 "nothing to change: these stages were kept running"))
            return None
        logger.info("applying %s to %s (queued %s, running %s)", decision.kind, target, signals.queued,
                    signals.running)
        return asyncio.create_task(self._change(decision, before, target))

    async def _change(self, decision: Decision, before: str, target: str) -> None:
        try:
            report: ReconfigReport = await asyncio.to_thread(self.pipeline.change, self.frontend_url, target,
                                                             self.strategy)
        except UserError as error:
            self.decisions.append(DecisionRecord(decision.at, decision.kind, before, target, decision.reason,
                                                 "failed", error=str(error)))
            return
        self.decisions.append(DecisionRecord(decision.at, decision.kind, before, target, decision.reason,
                                             report.outcome, report.pause_ms, report.error))


async def drive(planned: list[PlannedRequest], loop: PolicyLoop, linger_s: float) -> list[StreamResult]:
    done = asyncio.Event()

    async def load() -> list[StreamResult]:
        try:
            return await replay(loop.frontend_url, planned)
        finally:
            done.set()

    results, _ = await asyncio.gather(load(), loop.run(done, linger_s))
    return results


def table(result: dict[str, Any]) -> str:
    lines = [f"{k:<20}  {v}" for k, v in result.items() if k != "decisions"]
    lines.append(f"{'decisions':<20}  {len(result['decisions'])}")
    for d in result["decisions"]:
        pause = "" if d["pause_ms"] is None else f", pause {d['pause_ms']:.1f} ms"
        error = f" ({d['error']})" if d["error"] else ""
        lines.append(f"  {d['at_s']:6.1f} s  {d['kind']:<13} {d['from']} → {d['to']}: {d['outcome']}{error}{pause}")
        lines.append(f"            reason: {d['reason']}")
    return "\n".join(lines)


def run_policy(args: argparse.Namespace, model: Path) -> int:
    """The `--policy` form of `pipeshift demo`; returns 0 when no request was lost and no change failed."""
    if args.linger < 0:
        raise UserError(f"--linger must be zero or more seconds, got {args.linger}")
    policy = load_policy(args.policy)
    check_strategy(args.strategy)
    config = LlamaConfig.from_file(model / "config.json")
    autoscaler = autoscaler_for(policy, model, args.dtype)
    start = initial_layout(policy, config.num_layers)
    planned = workload(args, config.vocab_size, config.max_position_embeddings, rising_and_falling)
    print(f"starting the {start.short()} pipeline under policy {policy.name} ...", file=sys.stderr)
    with start_agents(model, Layout.from_sizes(start.sizes), dtype=args.dtype) as agents, \
            BackgroundFrontend(frontend_config(model, agents)) as frontend:
        pipeline = LivePipeline(model, agents, Layout.from_sizes(start.sizes), dtype=args.dtype,
                                token=frontend.frontend.config.control_token)
        loop = PolicyLoop(autoscaler, ScrapeSource(frontend.url + "/metrics"), pipeline, frontend.url,
                          args.strategy)
        try:
            results = asyncio.run(drive(planned, loop, args.linger))
        finally:
            frontend.stop()
            pipeline.stop()
    completed = sum(1 for r in results if r.finish in ("stop", "length"))
    decisions = sorted(loop.decisions, key=lambda d: d.at_s)
    result = {"policy": policy.name, "start": start.short(), "final": pipeline.layout.short(),
              "requests": len(results), "requests_completed": completed, "requests_lost": len(results) - completed,
              "decisions": [d.to_json() for d in decisions]}
    print(json.dumps(result) if args.json else table(result))
    failed = any(d.outcome in ("aborted", "failed") for d in decisions)
    return 0 if result["requests_lost"] == 0 and not failed else 1
