"""The frontend's control routes for a layout switch: `POST /control/hold` and `/control/resume` (drain),
`/control/arm`, `/control/retire` and `/control/settle` (epoch).

All are idempotent per `request_id` (an orchestrator retries after timeouts it cannot interpret) and
run one at a time, so a resume never overtakes the hold it follows.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from pipeshift.errors import UserError
from pipeshift.runtime.agent.idempotency import Answer, IdempotencyCache
from pipeshift.runtime.faults import FaultInjector
from pipeshift.runtime.frontend.recovery import GuardBody, RecoverBody, guard_call, recover_call
from pipeshift.runtime.frontend.scheduler import SwitchError
from pipeshift.runtime.frontend.stages import StageUnreachable
from pipeshift.runtime.frontend.zero import ScaleToZeroBody

if TYPE_CHECKING:
    from pipeshift.runtime.frontend.server import Frontend

RequestId = Annotated[StrictStr, Field(min_length=1, max_length=128)]


class HoldBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    request_id: RequestId
    timeout_s: Annotated[float, Field(gt=0, le=600)] = 30.0


class ResumeBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    request_id: RequestId
    stages: Annotated[list[StrictStr], Field(min_length=1)] | None = None
    epoch: Annotated[StrictInt, Field(ge=0)] | None = None
    reprefill: StrictBool = False
    # The request id of a hold this resume ends for good (an aborted change): that hold, arriving late, is refused.
    cancels: RequestId | None = None


class ArmBody(BaseModel):
    """`stages`: the control addresses of the epoch-`epoch` chain in order, each agent already armed."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    request_id: RequestId
    stages: Annotated[list[StrictStr], Field(min_length=1)]
    epoch: Annotated[StrictInt, Field(ge=1)]


class RetireBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    request_id: RequestId
    epoch: Annotated[StrictInt, Field(ge=1)]
    timeout_s: Annotated[float, Field(gt=0, le=600)] = 60.0


class SettleBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    request_id: RequestId


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class SwitchRoutes:
    def __init__(self, frontend: Frontend) -> None:
        self.f = frontend
        self._answers = IdempotencyCache()
        self._one_at_a_time = asyncio.Lock()
        self._cancelled: set[str] = set()
        self.faults = FaultInjector.from_env("frontend")  # PIPESHIFT_FAULT, for tests

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/control/hold", self.faults.wrap("switch", self._handler(HoldBody, self._hold))),
            web.post("/control/resume", self.faults.wrap("commit", self._handler(ResumeBody, self._resume))),
            web.post("/control/arm", self.faults.wrap("switch", self._handler(ArmBody, self._arm))),
            web.post("/control/retire", self.faults.wrap("commit", self._handler(RetireBody, self._retire))),
            web.post("/control/recover", self._handler(RecoverBody, lambda b: recover_call(self.f, b))),
            web.post("/control/guard", self._handler(GuardBody, lambda b: guard_call(self.f, b))),
            web.post("/control/settle", self.faults.wrap("cleanup", self._handler(SettleBody, self._settle))),
            web.post("/control/scale-to-zero", self._handler(ScaleToZeroBody, self._scale_to_zero)),
        ]

    def _handler(
        self, model: type[BaseModel], act: Callable[[Any], Awaitable[Answer]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            try:
                body = model.model_validate(json.loads(await request.read()))
            except (json.JSONDecodeError, UnicodeDecodeError):
                return _error(400, "the body is not valid JSON")
            except ValidationError as exc:
                first = exc.errors()[0]
                field = ".".join(str(p) for p in first["loc"]) or "body"
                return _error(400, f"field {field!r}: {first['msg']}")
            call = f"{request.path} {body.model_dump_json(exclude={'request_id'})}"
            status, answer = await self._answers.run(body.request_id, call, lambda: self._serialized(act, body))
            return web.json_response(answer, status=status)

        return handle

    async def _serialized(self, act: Callable[[Any], Awaitable[Answer]], body: BaseModel) -> Answer:
        async with self._one_at_a_time:
            return await act(body)

    async def _hold(self, body: HoldBody) -> Answer:
        if body.request_id in self._cancelled:
            return 409, {"error": f"hold {body.request_id!r} came after the resume that cancelled it (its change "
                                  "was aborted); nothing was held"}
        try:
            live = await self.f.hold(body.timeout_s)
        except SwitchError as e:
            return 409, {"error": str(e)}
        s = self.f.scheduler
        reserve = s.live_sequences()
        return 200, {
            "held": True,
            "in_flight": len(s.in_flight),
            "epoch": s.epoch,
            "sequences": live,
            "reserve_tokens": {str(i): reserve[i] for i in live},
        }

    async def _resume(self, body: ResumeBody) -> Answer:
        if body.cancels is not None:
            self._cancelled.add(body.cancels)
        try:
            await self.f.resume(body.stages, body.epoch, body.reprefill)
        except SwitchError as e:
            return 409, {"error": str(e)}
        except (StageUnreachable, UserError, OSError, ConnectionError) as e:
            return 502, {"error": f"field 'stages': the new chain could not be wired: {e}"}
        s = self.f.scheduler
        return 200, {"resumed": True, "epoch": s.epoch, "stages": list(self.f.stages)}

    async def _arm(self, body: ArmBody) -> Answer:
        """The point of no return of an epoch switch (see `epoch_switch`)."""
        try:
            return 200, await self.f.arm(body.stages, body.epoch)
        except SwitchError as e:
            return 409, {"error": str(e)}
        except (StageUnreachable, UserError, OSError, ConnectionError) as e:
            return 502, {"error": f"field 'stages': the new chain could not be armed: {e}"}

    async def _retire(self, body: RetireBody) -> Answer:
        try:
            return 200, await self.f.retired(body.epoch, body.timeout_s)
        except SwitchError as e:
            return 409, {"error": str(e)}

    async def _scale_to_zero(self, body: ScaleToZeroBody) -> Answer:
        try:
            return 200, await self.f.scale_to_zero()
        except SwitchError as e:
            return 409, {"error": str(e)}

    async def _settle(self, body: SettleBody) -> Answer:
        try:
            return 200, await self.f.settle()
        except (StageUnreachable, UserError, OSError, ConnectionError) as e:
            return 502, {"error": f"the stages could not be read: {e}"}
