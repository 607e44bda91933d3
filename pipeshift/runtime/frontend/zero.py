"""The frontend with zero stages: scaled to zero, it keeps accepting requests and holds them until stages
come back, so that demand stays visible and nothing is lost while an operator brings the pipeline back.

The frontend is at zero when its chain is empty: started with no stages (`--stages ''`), or told
`POST /control/scale-to-zero` before the stage pods went away. Then:

- requests queue in the scheduler's waiting queue (suspended: nothing is sent). Its bound is
  `max_queue`: past it a request gets 429 with Retry-After, as under load;
- a request that waited longer than `zero_wait_timeout_s` ends with 503 and Retry-After (the stages did
  not come back in time); the client may retry;
- `pipeshift_requests_waiting_for_stages` counts the held requests: the operator scales up on it;
- `/health` answers 200 (`status: zero`): the frontend is serving its purpose, holding requests, and must
  stay behind its Service to receive them;
- `POST /control/recover` with the new chain (the same call that replaces a dead stage) wires the stages
  and serves the held requests, running ones of the scale-down re-prefilled first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from pipeshift.runtime.frontend.scheduler import Gate, Scheduler, SwitchError

if TYPE_CHECKING:
    from pipeshift.runtime.frontend.config import FrontendConfig
    from pipeshift.runtime.frontend.stages import AgentClient, DataPlane, StageInfo
    from pipeshift.runtime.metrics import FrontendMetrics

logger = logging.getLogger(__name__)

ZERO_REASON = "the pipeline is scaled to zero; requests wait for stages to come back"
# How often held requests are checked against `zero_wait_timeout_s`.
ZERO_POLL_S = 0.25
# What a client is told to wait before retrying a request refused at zero (seconds).
ZERO_RETRY_AFTER_S = 5


class ScaleToZeroBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    request_id: Annotated[StrictStr, Field(min_length=1, max_length=128)]


class ZeroStages:
    """Mixed into `Frontend`; the attributes below are the frontend's."""

    config: FrontendConfig
    metrics: FrontendMetrics
    scheduler: Scheduler
    stages: list[str]
    stage_up: list[bool]
    infos: list[StageInfo]
    _agents: list[AgentClient]
    _data: DataPlane | None

    def _zero_init(self) -> None:
        self.zero_since: float | None = time.monotonic() if not self.config.stages else None
        self.metrics.waiting_for_stages.set_function(self._waiting_for_stages)

    @property
    def at_zero(self) -> bool:
        return not self.stages

    def _waiting_for_stages(self) -> float:
        scheduler = getattr(self, "scheduler", None)
        return float(len(scheduler.waiting)) if scheduler is not None and self.at_zero else 0.0

    async def scale_to_zero(self) -> dict[str, Any]:
        """Let go of every stage: their pods are about to be deleted. Live sequences (an idle pipeline has
        none, but a request may have slipped in) queue again, to be re-prefilled on the stages that come
        back. Idempotent: at zero already, it answers the same."""
        s = self.scheduler
        if s.gate is not Gate.OPEN:
            raise SwitchError(f"cannot scale to zero during a layout switch (the gate is {s.gate.value})")
        requeued = 0
        if not self.at_zero:
            s.suspended = None  # a suspension for a stage's recovery becomes this one
            requeued = s.suspend(ZERO_REASON)
            s.down_reason = None
            self.stages, self._agents, self.infos, self.stage_up = [], [], [], []
            self.metrics.stage_up.clear()
            if self._data is not None:
                await self._data.disconnect()
            self.zero_since = time.monotonic()
            logger.info("scaled to zero: %d requests wait for stages (%d re-prefilled later)", len(s.waiting),
                        requeued)
        return {"scaled_to_zero": True, "requests_requeued": requeued, "waiting": len(s.waiting)}

    def _left_zero(self) -> None:
        """Stages were attached (see `recovery.recover`)."""
        if self.zero_since is not None:
            logger.info("stages attached after %.1fs at zero", time.monotonic() - self.zero_since)
        self.zero_since = None

    async def _expire_zero_waits(self) -> None:
        """Requests held at zero longer than `zero_wait_timeout_s` end with 503 and Retry-After."""
        while True:
            await asyncio.sleep(ZERO_POLL_S)
            if self.at_zero:
                limit = self.config.zero_wait_timeout_s
                self.scheduler.fail_waiting(
                    time.monotonic() - limit,
                    f"no stage came back within {limit:g}s (the pipeline is scaled to zero); retry later",
                    503,
                    ZERO_RETRY_AFTER_S,
                )
