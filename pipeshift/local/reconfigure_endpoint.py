"""The reconfiguration endpoint `pipeshift serve` hosts beside the frontend: `POST /reconfigure` with
`{"to": "3,3,2", "strategy": "live", "switch": "epoch", "weights": "checkpoint"}` changes the layout live and
answers with the report.

It lives with `serve` because added stages are processes that must start on the host the pipeline runs on.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

from aiohttp import web

from pipeshift.control import STRATEGIES, SWITCHES, WEIGHTS
from pipeshift.control.reconfigure import ReconfigFailed
from pipeshift.errors import UserError
from pipeshift.local.live import LivePipeline

logger = logging.getLogger(__name__)
# The longest per-call timeout a change may ask for (`timeout_s`); the same bound as the control APIs' own.
MAX_TIMEOUT_S = 600.0



def check_strategy(strategy: str) -> str:
    """Checked before anything starts, so a typo costs nothing; an unknown one names the valid ones."""
    if strategy not in STRATEGIES:
        raise UserError(f"strategy {strategy!r} is not available; choose one of {', '.join(STRATEGIES)}")
    return strategy


def check_switch(switch: str) -> str:
    """Like `check_strategy`, for how a live strategy hands over (`SWITCHES`)."""
    if switch not in SWITCHES:
        raise UserError(f"switch {switch!r} is not available; choose one of {', '.join(SWITCHES)}")
    return switch


def check_weights(weights: str) -> str:
    """Like `check_strategy`, for where targets take incoming layers' weights from (`WEIGHTS`)."""
    if weights not in WEIGHTS:
        raise UserError(f"weights {weights!r} is not available; choose one of {', '.join(WEIGHTS)}")
    return weights


def check_timeout(raw: Any) -> float | None:
    """The per-call timeout of the change in seconds (`timeout_s`, optional): a positive number."""
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 < raw <= MAX_TIMEOUT_S:
        raise UserError(f"timeout_s {raw!r} must be a number of seconds in (0, {MAX_TIMEOUT_S:g}]")
    return float(raw)


def check_rate(raw: Any) -> float | None:
    """The pre-copy cap of the change in bytes/s (`precopy_bytes_per_s`, optional): a positive number."""
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 < raw < float("inf"):
        raise UserError(f"precopy_bytes_per_s {raw!r} must be a positive number of bytes per second")
    return float(raw)


def reconfigure_app(pipeline: LivePipeline, frontend_url: str, token: str | None) -> web.Application:
    """With `token`, every call must carry it as a bearer token (the same one the control APIs use)."""

    async def change(request: web.Request) -> web.Response:
        if token is not None and not hmac.compare_digest(
            request.headers.get("Authorization", ""), f"Bearer {token}"
        ):
            return web.json_response({"error": "missing or wrong bearer token"}, status=401)
        try:
            body: dict[str, Any] = await request.json()
            to = str(body["to"])
            strategy = check_strategy(str(body.get("strategy", "live")))
            switch = check_switch(str(body.get("switch", "epoch")))
            timeout_s = check_timeout(body.get("timeout_s"))
            rate = check_rate(body.get("precopy_bytes_per_s"))
            weights = check_weights(str(body.get("weights", "checkpoint")))
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": 'expected a JSON body like {"to": "3,3,2"}'}, status=400)
        except UserError as error:
            return web.json_response({"error": str(error)}, status=400)
        try:
            report = await asyncio.to_thread(pipeline.change, frontend_url, to, strategy, switch=switch,
                                             timeout_s=timeout_s, weights=weights, precopy_bytes_per_s=rate)
        except UserError as error:
            return web.json_response({"error": str(error)}, status=409)
        except ReconfigFailed as failed:
            return web.json_response({"report": failed.report.to_json(), "layout": pipeline.describe()},
                                     status=500)
        except Exception as error:
            logger.exception("reconfiguration to %s", to)
            return web.json_response({"error": f"{type(error).__name__}: {error}"}, status=500)
        return web.json_response({"report": report.to_json(), "layout": pipeline.describe()})

    async def layout(request: web.Request) -> web.Response:
        return web.json_response({"layout": pipeline.describe(), "stages": pipeline.urls})

    app = web.Application()
    app.router.add_post("/reconfigure", change)
    app.router.add_get("/layout", layout)
    return app
