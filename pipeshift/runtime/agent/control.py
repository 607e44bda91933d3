"""The agent's HTTP control API: health and metrics (open), info, stats, routing, layers, pool and live
reconfiguration (prepare, precopy, commit, abort), all but health and metrics behind the token.

State changes run on the stage's worker thread between micro-batches and are idempotent per request id.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from pipeshift.runtime.agent.dataplane import DataPlane
from pipeshift.runtime.agent.epoch_api import ArmBody, FlushBody, RetireBody, arm, flush, retire, seq_ids
from pipeshift.runtime.agent.idempotency import Answer, IdempotencyCache
from pipeshift.runtime.agent.reconfig import Reconfigurer
from pipeshift.runtime.agent.weights import parse_layers, parse_sources, serve_layers, weight_counters
from pipeshift.runtime.agent.worker import StageWorker, StateConflict
from pipeshift.runtime.faults import FaultInjector
from pipeshift.runtime.metrics import AgentMetrics
from pipeshift.runtime.security import bearer_matches

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/metrics"})
MAX_BODY_BYTES = 64 * 1024
RequestId = Annotated[StrictStr, Field(min_length=1, max_length=128)]
Count = Annotated[StrictInt, Field(ge=0)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    request_id: RequestId


class RouteBody(_Body):
    downstream: StrictStr


class LayersBody(_Body):
    start: Count
    end: Count


class ResizeBody(_Body):
    blocks: Annotated[StrictInt, Field(ge=1)]


ReconfigId = Annotated[StrictStr, Field(min_length=1, max_length=128)]
LayerRange = Annotated[list[Count], Field(min_length=2, max_length=2)]


class PrepareBody(_Body):
    reconfig_id: ReconfigId
    epoch: Count
    layers: LayerRange
    sequences: dict[StrictStr, Count] = Field(default_factory=dict)
    resize: StrictBool = True
    # "source": fetch incoming layers from `weight_sources` (layer -> control URL of the stage computing it).
    weights: Literal["checkpoint", "source"] = "checkpoint"
    weight_sources: dict[StrictStr, StrictStr] = Field(default_factory=dict)


class PrecopyBody(_Body):
    reconfig_id: ReconfigId
    target: StrictStr
    layers: Annotated[list[Count], Field(min_length=1)]
    max_bytes_per_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None


class CommitBody(_Body):
    reconfig_id: ReconfigId
    epoch: Count
    layers: LayerRange
    downstream: StrictStr
    sequences: list[Count] = Field(default_factory=list)
    resize: StrictBool = True


class AbortBody(_Body):
    reconfig_id: ReconfigId


def _range(layers: list[int]) -> tuple[int, int]:
    return layers[0], layers[1]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "body"
    return f"field {field!r}: {first['msg']}"


class ControlAPI:
    """Routes bound to one agent's worker, data plane and metrics."""

    def __init__(
        self, worker: StageWorker, data: DataPlane, metrics: AgentMetrics, token: str | None
    ) -> None:
        self.worker = worker
        self.data = data
        self.metrics = metrics
        self.token = token
        self.reconfig = Reconfigurer(worker, data, token)
        self.idempotent = IdempotencyCache()
        self.faults = FaultInjector.from_env(f"stage {worker.config.stage_id}")  # PIPESHIFT_FAULT, for tests

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=MAX_BODY_BYTES)
        fault = self.faults.wrap  # the fault injection hook of each phase's call (PIPESHIFT_FAULT)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_text)
        app.router.add_get("/info", self.info)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/reconfig/weights", self.weights)
        app.router.add_post("/route", self._changing(RouteBody, self._route))
        app.router.add_post("/layers/load", self._changing(LayersBody, self._load))
        app.router.add_post("/layers/unload", self._changing(LayersBody, self._unload))
        app.router.add_post("/pool/resize", self._changing(ResizeBody, self._resize))
        app.router.add_post("/reconfig/prepare", fault("prepare", self._changing(PrepareBody, self._prepare)))
        app.router.add_post("/reconfig/precopy", fault("precopy", self._changing(PrecopyBody, self._precopy)))
        app.router.add_post("/reconfig/commit", fault("commit", self._changing(CommitBody, self._commit)))
        app.router.add_post("/reconfig/abort", self._changing(AbortBody, self._abort))
        app.router.add_post("/reconfig/arm", fault("switch", self._changing(ArmBody, lambda b: arm(self, b))))
        # Epoch switch: arming is the switch, a source's flush (its final deltas imported) the commit, the
        # retirement of the old epoch the clean-up.
        app.router.add_post("/reconfig/flush", fault("commit", self._changing(FlushBody, lambda b: flush(self, b))))
        app.router.add_post("/reconfig/retire", fault("cleanup", self._changing(RetireBody, lambda b: retire(self, b))))
        return app

    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path not in OPEN_PATHS and not bearer_matches(
            self.token, request.headers.get("Authorization")
        ):
            return _error(401, "missing or wrong control token (send Authorization: Bearer <token>)")
        return await handler(request)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "stage_id": self.worker.config.stage_id})

    async def metrics_text(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response(await self._info())

    async def _info(self) -> dict[str, Any]:
        # One hop to the worker, not one per part: each waits for the micro-batch being computed, and the
        # frontend reads every stage's /info while it arms an epoch switch.
        info = await self.worker.call(lambda: self.worker.info() | self.reconfig.epoch_info())
        info["data"] = {"host": self.worker.config.host, "port": self.data.port}
        info["downstream"] = self.data.downstream.address
        info["epoch"] = self.reconfig.epoch
        info["reconfig"] = self.reconfig.describe()
        return info

    async def stats(self, request: web.Request) -> web.Response:
        steps = await self.worker.call(self.worker.stats.as_json)
        return web.json_response(
            {
                **steps,
                "loaded_layers": await self.worker.call(lambda: self.worker.stage.loaded_layers),
                "kv_layers": await self.worker.call(self.worker.stage.kv_layers),
                **await self.worker.call(weight_counters, self.worker.stage),
                "frames_rejected": self.data.rejected,
                "upstream_connections": self.data.upstreams,
                "downstream": self.data.downstream.address,
                "downstream_connected": self.data.downstream.connected,
                "downstream_connects": self.data.downstream.connects,
                "dropped_batches": self.data.downstream.dropped,
            }
        )

    async def weights(self, request: web.Request) -> web.Response:
        """`?layers=3,4`: those layers' weights (computed here now) as safetensors bytes, for a target stage
        that streams its incoming layers from this one (`weights: "source"` in its prepare)."""
        try:
            payload = await serve_layers(self.worker, parse_layers(request.query.get("layers")))
        except ValueError as exc:
            return _error(400, str(exc))
        except StateConflict as exc:
            return _error(409, str(exc))
        return web.Response(body=payload, content_type="application/octet-stream")

    def _changing(
        self, model: type[_Body], act: Callable[[Any], Awaitable[Answer]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """Parse, validate and run a state-changing call at most once per request id."""

        async def handle(request: web.Request) -> web.Response:
            try:
                raw = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                return _error(400, "the body is not valid JSON")
            try:
                body = model.model_validate(raw)
            except ValidationError as exc:
                return _error(400, _validation_message(exc))
            call = f"{request.path} {body.model_dump_json(exclude={'request_id'})}"
            status, answer = await self.idempotent.run(
                body.request_id, call, lambda: self._guarded(act, body)
            )
            return web.json_response(answer, status=status)

        return handle

    async def _guarded(self, act: Callable[[Any], Awaitable[Answer]], body: _Body) -> Answer:
        try:
            return await act(body)
        except StateConflict as exc:
            return 409, {"error": str(exc)}
        except ValueError as exc:
            return 400, {"error": str(exc)}

    async def _route(self, body: RouteBody) -> Answer:
        await self.data.downstream.route(body.downstream)
        logger.info("stage %d: routed downstream to %s", self.worker.config.stage_id, body.downstream)
        return 200, {"downstream": self.data.downstream.address}

    async def _load(self, body: LayersBody) -> Answer:
        await self.worker.call(self.worker.load_layers, body.start, body.end)
        return 200, await self._info()

    async def _unload(self, body: LayersBody) -> Answer:
        await self.worker.call(self.worker.unload_layers, body.start, body.end)
        return 200, await self._info()

    async def _resize(self, body: ResizeBody) -> Answer:
        await self.worker.call(self.worker.resize, body.blocks)
        return 200, await self._info()

    async def _prepare(self, body: PrepareBody) -> Answer:
        sources = parse_sources(body.weight_sources) if body.weights == "source" else None
        answer = await self.reconfig.prepare(
            body.reconfig_id, body.epoch, _range(body.layers), seq_ids(body.sequences), body.resize, sources
        )
        return 200, answer

    async def _precopy(self, body: PrecopyBody) -> Answer:
        return 200, await self.reconfig.precopy(body.reconfig_id, body.target, body.layers, body.max_bytes_per_s)

    async def _commit(self, body: CommitBody) -> Answer:
        await self.reconfig.commit(
            body.reconfig_id, body.epoch, _range(body.layers), body.downstream, body.sequences, body.resize
        )
        return 200, await self._info()

    async def _abort(self, body: AbortBody) -> Answer:
        dropped = await self.reconfig.abort(body.reconfig_id)
        return 200, {"dropped_layers": dropped, **await self._info()}
