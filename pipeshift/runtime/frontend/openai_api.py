"""The OpenAI-compatible HTTP API: completions and chat completions (plain or SSE), models, health, metrics.

Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`. A non-streaming reply is
built from the same deltas a stream would send, so both always carry the same text. A client that
disconnects cancels its request (the server runs handlers with cancellation on disconnect), which
frees its KV blocks on every stage.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeshift.runtime.frontend.chat import ChatTemplateError
from pipeshift.runtime.frontend.formats import ChatFormat, CompletionFormat, ResponseFormat
from pipeshift.runtime.frontend.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationFields,
    RequestError,
    parse_body,
)
from pipeshift.runtime.frontend.scheduler import QueueFull, Unavailable
from pipeshift.runtime.frontend.sequence import Delta, Failure, GenerationParams, Sequence
from pipeshift.runtime.frontend.switch_api import SwitchRoutes
from pipeshift.runtime.security import bearer_matches

if TYPE_CHECKING:
    from pipeshift.runtime.frontend.server import Frontend

RETRY_AFTER_S = 1
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error"}


def build_app(frontend: Frontend) -> web.Application:
    app = web.Application(middlewares=[_errors, _api_key(frontend)])
    api = _Api(frontend)
    app.add_routes(
        [
            web.post("/v1/completions", api.completions),
            web.post("/v1/chat/completions", api.chat_completions),
            web.get("/v1/models", api.models),
            web.get("/health", api.health),
            web.get("/metrics", api.metrics),
            web.get("/control/state", api.control_state),
            *SwitchRoutes(frontend).routes(),
        ]
    )
    return app


def error_response(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    body = {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(status, "server_error"),
            "param": param,
            "code": status,
        }
    }
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except RequestError as e:
        return error_response(e.status, e.message, e.param)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(e.status, e.reason)


def _api_key(frontend: Frontend) -> Callable[..., Awaitable[web.StreamResponse]]:
    """`/v1/*` needs `Authorization: Bearer $PIPESHIFT_API_KEY` when one is set; /control needs the control
    token; /health and /metrics stay open for probes and scrapers."""

    @web.middleware
    async def check(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        auth = request.headers.get("Authorization")
        if request.path.startswith("/v1/") and not bearer_matches(frontend.config.api_key, auth):
            return error_response(401, "a valid API key is required: Authorization: Bearer <key>")
        if request.path.startswith("/control/") and not bearer_matches(frontend.config.control_token, auth):
            return error_response(401, "a valid control token is required: Authorization: Bearer <token>")
        return await handler(request)

    return check


class _Api:
    def __init__(self, frontend: Frontend) -> None:
        self.f = frontend

    async def models(self, request: web.Request) -> web.Response:
        model = {
            "id": self.f.model.name,
            "object": "model",
            "created": self.f.started_at,
            "owned_by": "pipeshift",
            "max_model_len": self.f.model.context,
        }
        return web.json_response({"object": "list", "data": [model]})

    async def health(self, request: web.Request) -> web.Response:
        body = self.f.health()
        return web.json_response(body, status=200 if body["status"] in ("ok", "zero") else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.f.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def control_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.f.control_state())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = parse_body(await request.read(), CompletionRequest)
        self._check_model(body)
        if isinstance(body.prompt, str):
            prompt = self.f.model.encode(body.prompt)
        else:
            prompt = self._check_ids(body.prompt)
        seq = self._sequence(body, prompt, "prompt")
        return await self._run(request, body, seq, CompletionFormat(self.f.model.name, body.return_token_ids))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = parse_body(await request.read(), ChatCompletionRequest)
        self._check_model(body)
        try:
            text = self.f.model.chat.render([{"role": m.role, "content": m.content} for m in body.messages])
        except ChatTemplateError as e:
            raise RequestError("messages", f"messages: {e}") from None
        prompt = self.f.model.encode(text, add_special_tokens=False)
        seq = self._sequence(body, prompt, "messages")
        return await self._run(request, body, seq, ChatFormat(self.f.model.name, body.return_token_ids))

    def _check_model(self, body: GenerationFields) -> None:
        if body.model is not None and body.model != self.f.model.name:
            raise RequestError(
                "model",
                f"model: unknown model {body.model!r}; this server serves "
                f"{self.f.model.name!r} (see /v1/models)",
            )

    def _check_ids(self, ids: list[int]) -> list[int]:
        vocab = self.f.model.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError("prompt", f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return ids

    def _sequence(self, body: GenerationFields, prompt: list[int], field: str) -> Sequence:
        """The request as a sequence, once its prompt and length fit the context and the stages' pools."""
        context = self.f.model.context
        longest = min(context - 1, self.f.config.max_batch_tokens)
        if not prompt:
            raise RequestError(field, f"{field}: the prompt tokenizes to nothing")
        if len(prompt) > longest:
            raise RequestError(
                field,
                f"{field}: the prompt is {len(prompt)} tokens; at most {longest} fit "
                f"(context {context} tokens, max_position_embeddings, leaving one to generate; "
                f"batch cap {self.f.config.max_batch_tokens})",
            )
        room = context - len(prompt)
        max_tokens = (
            body.max_tokens if body.max_tokens is not None else min(self.f.config.default_max_tokens, room)
        )
        if max_tokens > room:
            raise RequestError(
                "max_tokens",
                f"max_tokens: {max_tokens} plus the {len(prompt)}-token prompt exceeds "
                f"the context of {context} tokens; at most {room}",
            )
        why = self.f.scheduler.mirror.never_fits(len(prompt) + max_tokens)
        if why is not None:
            raise RequestError("max_tokens", f"max_tokens: {max_tokens} is too many for the KV pools: {why}")
        params = GenerationParams(
            max_tokens=max_tokens,
            sampling=body.sampling(),
            stop=body.stop_strings(),
            ignore_eos=body.ignore_eos,
        )
        return Sequence(
            seq_id=self.f.next_seq_id(),
            prompt=prompt,
            params=params,
            decoder=self.f.model,
            eos_ids=frozenset(self.f.model.config.eos_token_ids),
        )

    async def _run(
        self, request: web.Request, body: GenerationFields, seq: Sequence, fmt: ResponseFormat
    ) -> web.StreamResponse:
        try:
            self.f.scheduler.submit(seq)
        except QueueFull as e:
            self.f.metrics.requests.labels("rejected").inc()
            return error_response(429, f"{e}; retry later", headers={"Retry-After": str(RETRY_AFTER_S)})
        except Unavailable as e:
            self.f.metrics.requests.labels("rejected").inc()
            return error_response(503, str(e), headers={"Retry-After": str(RETRY_AFTER_S)})
        try:
            if body.stream:
                # At zero a stream opens only once stages serve it, so a request that times out waiting
                # gets a real 503 with Retry-After instead of an error event in a 200 stream.
                return await _stream(request, seq, fmt, body.include_usage(), wait_first=self.f.at_zero)
            return await _collect(seq, fmt)
        finally:
            self.f.scheduler.cancel(seq)


async def _collect(seq: Sequence, fmt: ResponseFormat) -> web.Response:
    deltas: list[Delta] = []
    while True:
        event = await seq.events.get()
        if isinstance(event, Failure):
            return _failure_response(event)
        deltas.append(event)
        if event.finish_reason is not None:
            return web.json_response(fmt.whole(deltas, seq.usage()))


def _failure_response(event: Failure) -> web.Response:
    headers = {"Retry-After": str(event.retry_after)} if event.retry_after is not None else None
    return error_response(event.status, event.message, headers=headers)


async def _stream(
    request: web.Request, seq: Sequence, fmt: ResponseFormat, include_usage: bool, wait_first: bool = False
) -> web.StreamResponse:
    pending: Delta | Failure | None = None
    if wait_first:
        pending = await seq.events.get()
        if isinstance(pending, Failure):
            return _failure_response(pending)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    first = fmt.opening()
    if first is not None:
        await _event(response, first)
    while True:
        event, pending = (pending, None) if pending is not None else (await seq.events.get(), None)
        if isinstance(event, Failure):
            await _event(
                response,
                {
                    "error": {
                        "message": event.message,
                        "type": "server_error",
                        "param": None,
                        "code": event.status,
                    }
                },
            )
            break
        if event.text or (event.token_ids and fmt.token_ids) or event.finish_reason is not None:
            await _event(response, fmt.chunk(event))
        if event.finish_reason is not None:
            if include_usage:
                await _event(response, fmt.usage_chunk(seq.usage()))
            break
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _event(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode())
