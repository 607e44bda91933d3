"""A local pipeline whose layout can change while it serves: the agent processes of every stage, the
current layout, and the start/stop callables that `pipeshift.control.reconfigure` needs for them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from pipeshift.api import Layout, LayoutError, StagePlan, plan_moves
from pipeshift.control import ReconfigReport, SwitchBudget, reconfigure
from pipeshift.errors import UserError
from pipeshift.local.processes import STOP_TIMEOUT_S, LocalAgents, start_agents, stop_processes

logger = logging.getLogger(__name__)


class LivePipeline:
    """Stage agents by stage id; `change(to)` reconfigures the pipeline behind `frontend_url` live.

    Stages started by a change are launched like the first ones (same dtype, KV or memory budget, token), so
    a later change can move layers back onto them, and warm (`pipeshift agent --warm`); one change runs at a time.
    """

    def __init__(self, model: Path, agents: LocalAgents, layout: Layout, *, dtype: str | None = None,
                 kv_bytes: int | None = None, token: str | None = None, memory_bytes: int | None = None) -> None:
        if kv_bytes is not None and memory_bytes is not None:
            raise UserError("give kv_bytes (--kv-bytes) or memory_bytes (--memory-bytes), not both")
        self.model, self.layout, self.dtype, self.kv_bytes, self.token = model, layout, dtype, kv_bytes, token
        self.memory_bytes = memory_bytes
        self.groups: dict[int, LocalAgents] = {a.stage_id: agents for a in agents.agents}
        self.urls: dict[int, str] = {a.stage_id: a.control_url for a in agents.agents}
        self._lock = threading.Lock()

    def start_stage(self, stage: StagePlan) -> str:
        started = start_agents(self.model, [stage], dtype=self.dtype, kv_bytes=self.kv_bytes,
                               memory_bytes=self.memory_bytes, token=self.token, threads=1, warm=True)
        self.groups[stage.stage_id] = started
        self.urls[stage.stage_id] = started.agents[0].control_url
        return self.urls[stage.stage_id]

    def stop_stage(self, stage_id: int) -> None:
        group = self.groups.pop(stage_id)
        self.urls.pop(stage_id)
        if len(group.agents) == 1:
            group.stop()
        else:
            stop_processes([group.process(stage_id)], STOP_TIMEOUT_S)

    def change(self, frontend_url: str, to: str, strategy: str = "live", *, weights: str = "checkpoint",
               before_hold: Callable[[], None] | None = None, switch: str = "epoch",
               timeout_s: float | None = None, precopy_bytes_per_s: float | None = None) -> ReconfigReport:
        """Reconfigure to layout `to` (layers per stage); the layout is updated only if the change commits.
        `weights`, `before_hold` and `switch` are passed to `pipeshift.control.reconfigure`; `timeout_s` (default
        `SwitchBudget`'s) bounds each of its control calls and each wait for the old epoch or a drain;
        `precopy_bytes_per_s` caps the pre-copy (`SwitchBudget.precopy_bytes_per_s`)."""
        if not self._lock.acquire(blocking=False):
            raise UserError("a reconfiguration is already running; wait for it to end")
        try:
            try:
                target = Layout.parse(to, num_layers=self.layout.num_layers)
            except LayoutError as error:
                raise UserError(f"--to {to!r}: {error}") from None
            plan = plan_moves(self.layout, target)
            if plan.is_noop:
                raise UserError(f"--to {to!r} is the current layout {self.describe()}; nothing to change")
            report = reconfigure(frontend_url, dict(self.urls), plan, start_stage=self.start_stage,
                                 stop_stage=self.stop_stage, token=self.token, strategy=strategy,
                                 weights=weights, before_hold=before_hold, switch=switch,
                                 budget=SwitchBudget.with_timeout(timeout_s, precopy_bytes_per_s=precopy_bytes_per_s))
            if report.outcome == "committed":
                self.layout = plan.new
            logger.info("reconfiguration to %s: %s", to, report.outcome)
            return report
        finally:
            self._lock.release()

    def describe(self) -> str:
        return ",".join(str(s.num_layers) for s in self.layout)

    def stop(self) -> None:
        for group in {id(g): g for g in self.groups.values()}.values():
            group.stop()
        self.groups.clear()
        self.urls.clear()
