"""How `pipeshift demo` times its change so that at least `SPANNING_TARGET` requests stream across the switch.

Three parts. Stages the change adds are started (`StandbyPipeline.prestart`) before the load, as an operator
waits for a new pod to be ready before it reconfigures; their start-up time is reported on its own
(`stage_start_ms`) instead of disappearing into the change. The change is triggered once enough requests are
streaming with tokens still to come (`SpanGuard`). And the orchestrator's `before_hold` hook waits, right
before serving is held (or the frontend arms the new epoch), until that still holds: a request that has tokens
left when serving is held cannot finish before it resumes, so it streams across the switch. A workload that
can no longer reach the target fails the change with an error naming `--requests` and `--rate`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeshift.api import StagePlan
from pipeshift.control import ReconfigReport
from pipeshift.errors import UserError
from pipeshift.local.live import LivePipeline
from pipeshift.local.loadgen import PlannedRequest, StreamResult, replay
from pipeshift.local.processes import LocalAgents, start_agents

SPANNING_TARGET = 8
# Tokens a request must still have to count as streaming across a switch about to happen: one may be in flight
# while the frontend drains, one already sent but not yet read by the client, plus slack.
MARGIN_TOKENS = 4
GUARD_TIMEOUT_S = 300.0


def too_few(target: int, why: str) -> UserError:
    return UserError(f"{why}, so fewer than {target} requests would stream across the switch: give more "
                     "--requests, a higher --rate (or --speedup with --trace) or longer outputs (--max-tokens)")


class SpanGuard:
    """Client-side progress of every planned request: `on_token(i)` as tokens arrive, `tasks` as they start."""

    def __init__(self, planned: Sequence[PlannedRequest], target: int = SPANNING_TARGET,
                 margin: int = MARGIN_TOKENS) -> None:
        self.planned, self.target, self.margin = planned, target, margin
        self.chunks = [0] * len(planned)  # token chunks seen (one token each in practice; never more chunks)
        self.tasks: list[asyncio.Task[StreamResult]] = []

    def on_token(self, index: int) -> None:
        self.chunks[index] += 1

    def _left(self, i: int) -> int:
        return self.planned[i].max_tokens - self.chunks[i]

    def streaming(self) -> int:
        """Requests that have streamed a token, are not done and have at least `margin` tokens to come."""
        tasks = list(self.tasks)
        return sum(1 for i, task in enumerate(tasks)
                   if not task.done() and self.chunks[i] > 0 and self._left(i) >= self.margin)

    def possible(self) -> int:
        """An upper bound on `streaming()` from now on: requests not done (or not sent) with enough left."""
        tasks = list(self.tasks)
        done = {i for i, task in enumerate(tasks) if task.done()}
        return sum(1 for i in range(len(self.planned)) if i not in done and self._left(i) >= self.margin)

    def ready(self) -> bool:
        """True once `target` requests stream; raises UserError once that can no longer happen."""
        if self.streaming() >= self.target:
            return True
        if self.possible() < self.target:
            raise too_few(self.target, f"only {self.possible()} requests could still be streaming with "
                                       f"{self.margin}+ tokens to come")
        return False

    def wait(self, timeout_s: float = GUARD_TIMEOUT_S) -> None:
        """Block (the orchestrator's thread) until `ready()`; the `before_hold` hook."""
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise too_few(self.target, f"the load did not reach {self.target} streaming requests in {timeout_s}s")
            time.sleep(0.002)


class StandbyPipeline(LivePipeline):
    """A `LivePipeline` whose added stages may be started ahead (`prestart`); the change then adopts them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.standby: dict[int, tuple[StagePlan, LocalAgents]] = {}

    def prestart(self, stages: Sequence[StagePlan]) -> float:
        """Start `stages` now; returns the milliseconds that took."""
        started = time.perf_counter()
        for stage in stages:
            agents = start_agents(self.model, [stage], dtype=self.dtype, kv_bytes=self.kv_bytes,
                                  memory_bytes=self.memory_bytes, token=self.token, threads=1, warm=True)
            self.standby[stage.stage_id] = (stage, agents)
        return (time.perf_counter() - started) * 1e3

    def start_stage(self, stage: StagePlan) -> str:
        ready = self.standby.pop(stage.stage_id, None)
        if ready is None or ready[0] != stage:
            if ready is not None:
                ready[1].stop()
            return super().start_stage(stage)
        self.groups[stage.stage_id] = ready[1]
        self.urls[stage.stage_id] = ready[1].agents[0].control_url
        return self.urls[stage.stage_id]

    def stop(self) -> None:
        for _, agents in self.standby.values():
            agents.stop()
        self.standby.clear()
        super().stop()


@dataclass
class LiveRun:
    """The live replay: results, the report, and when the change call started and ended (perf_counter)."""

    results: list[StreamResult]
    report: ReconfigReport | None
    start: float
    end: float
    error: UserError | None = None


async def replay_with_change(url: str, planned: list[PlannedRequest], change: Callable[[Callable[[], None]],
                             ReconfigReport], on_done: Callable[[StreamResult], None] | None = None) -> LiveRun:
    """Replays `planned` and calls `change(before_hold)` in a thread once `SPANNING_TARGET` requests stream."""
    guard = SpanGuard(planned)
    run = LiveRun([], None, 0.0, 0.0)
    changer: list[asyncio.Task[None]] = []

    async def trigger() -> None:
        try:
            while not guard.ready():
                await asyncio.sleep(0.005)
        except UserError as error:
            run.error = error
            return
        run.start = time.perf_counter()
        run.report = await asyncio.to_thread(change, guard.wait)
        run.end = time.perf_counter()

    def started(tasks: list[asyncio.Task[StreamResult]]) -> None:
        guard.tasks = tasks
        changer.append(asyncio.create_task(trigger()))

    run.results = await replay(url, planned, on_done, started=started, on_token=guard.on_token)
    await changer[0]
    return run
