"""The frontend's side of replacing a stage that died: keep its requests instead of failing them, and serve
them again, re-prefilled, once the chain is rewired.

A stage process that dies takes the KV of every live sequence with it. Within a recovery window a broken
chain suspends serving instead of failing every request (`Scheduler.suspend`): the live sequences queue
again to be prefilled with their prompt and output so far, new requests queue too, and whoever replaces
the stage (the reconfiguration orchestrator rolling a change forward or back past a crash) calls
`POST /control/recover` with the new chain. If nobody does within the window, the requests fail as they
would have at once. The window is the larger of `FrontendConfig.recover_timeout_s` (default 0: fail fast)
and what `POST /control/guard` asked for: an orchestrator opens it for the length of a change, since it is
the one that restarts a stage that dies meanwhile. The recomputation a recovery costs is counted:
`requests_reprefilled` and `tokens_recomputed` (KV positions lost with the stage) in its answer. The same
call attaches stages to a frontend scaled to zero (see `zero`).

A frontend that dies loses its in-memory queue and the streams of its clients: there is one frontend, so
that is not recovered here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from pipeshift.errors import UserError
from pipeshift.runtime.frontend.scheduler import Gate, Scheduler
from pipeshift.runtime.frontend.stages import StageUnreachable

if TYPE_CHECKING:
    from pipeshift.runtime.frontend.config import FrontendConfig

logger = logging.getLogger(__name__)


class RecoverBody(BaseModel):
    """`stages`: the chain's control addresses in order, the replaced stage's new one included; `epoch`: the
    layout epoch to serve (omitted: unchanged)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    request_id: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    stages: Annotated[list[StrictStr], Field(min_length=1)]
    epoch: Annotated[StrictInt, Field(ge=0)] | None = None


class GuardBody(BaseModel):
    """`recover_timeout_s`: the recovery window a change needs while it runs (0 when it ends)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    request_id: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    recover_timeout_s: Annotated[float, Field(ge=0, le=3600)]


class StageRecovery:
    """Mixed into `Frontend`; the attributes below are the frontend's."""

    config: FrontendConfig
    scheduler: Scheduler

    async def _rewire(self, stages: list[str], reprefill: bool) -> None:  # provided by Frontend
        raise NotImplementedError

    def _recovery_init(self) -> None:
        self._requeued = 0
        self._guard_s = 0.0
        self._give_up: asyncio.Task[None] | None = None

    @property
    def recover_window_s(self) -> float:
        return max(self.config.recover_timeout_s, self._guard_s)

    def guard(self, recover_timeout_s: float) -> dict[str, Any]:
        self._guard_s = recover_timeout_s
        return {"recover_timeout_s": self.recover_window_s}

    def suspend_for_recovery(self, reason: str) -> bool:
        """Called when the chain broke: suspend instead of failing, within a recovery window (True)."""
        s, window = self.scheduler, self.recover_window_s
        if window <= 0 or s.down_reason is not None:
            return False
        if s.suspended is None:
            logger.warning("the stage pipeline broke (%s); its requests wait up to %gs for the stage to be replaced",
                           reason, window)
            self._give_up = asyncio.create_task(self._fail_unless_recovered(reason, window))
        self._requeued += s.suspend(reason)
        return True

    async def _fail_unless_recovered(self, reason: str, window: float) -> None:
        await asyncio.sleep(window)
        s = self.scheduler
        if s.suspended is not None:
            s.suspended = None
            s.fail_all(f"the stage pipeline failed and was not recovered within {window:g}s: {reason}")

    async def recover(self, stages: list[str], epoch: int | None) -> dict[str, Any]:
        """Serve through `stages` again after one was replaced: every live sequence is prefilled again (even
        if the break was not noticed yet: the caller says the chain lost a stage), the mirror rebuilt from
        the stages, the gate opened. Serving stays suspended if the chain cannot be wired (a retry may)."""
        s = self.scheduler
        self._requeued += s.suspend("a stage of the chain was replaced")
        await self._rewire(stages, False)
        if epoch is not None:
            s.epoch = epoch
        if self._give_up is not None:
            self._give_up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._give_up
            self._give_up = None
        requeued, self._requeued = self._requeued, 0
        recomputed, s.lost_tokens = s.lost_tokens, 0
        s.down_reason = None
        if s.gate is not Gate.OPEN:
            s.open()  # a drain switch's hold: what it held for is done
        s.unsuspend()
        logger.warning("recovered on %d stages at epoch %d: %d requests prefilled again", len(stages), s.epoch,
                       requeued)
        return {"recovered": True, "requests_reprefilled": requeued, "tokens_recomputed": recomputed,
                "epoch": s.epoch, "stages": list(stages)}


async def recover_call(frontend: StageRecovery, body: RecoverBody) -> tuple[int, dict[str, Any]]:
    """`POST /control/recover` (idempotent per request id, run one at a time with the other switch calls)."""
    try:
        return 200, await frontend.recover(body.stages, body.epoch)
    except (StageUnreachable, UserError, OSError, ConnectionError) as e:
        return 502, {"error": f"field 'stages': the chain could not be wired: {e}"}


async def guard_call(frontend: StageRecovery, body: GuardBody) -> tuple[int, dict[str, Any]]:
    """`POST /control/guard`."""
    return 200, frontend.guard(body.recover_timeout_s)
