"""Deterministic fault injection for live reconfiguration: `PIPESHIFT_FAULT=<phase>:<action>`.

Read from the environment of an agent or the frontend when its control app is built, so a malformed value
stops that process at start-up with a message naming the variable, never halfway through a change. The
fault fires once, on the first control call of that phase the process handles, at the HTTP boundary
(before the call is parsed or remembered by request id), so it spoils exactly that one call:

- `crash`: the process exits at once (`os._exit`, no clean-up, no answer) with `CRASH_EXIT_CODE`;
- `hang`: the call never answers; every other call and the data plane go on as before;
- `slow`: the call waits `PIPESHIFT_FAULT_DELAY_S` seconds (default `DEFAULT_DELAY_S`), then runs;
- `refuse`: the call answers 503 with an error naming the fault, and acts on nothing.

A retry of the spoiled call with the same request id is a new call and acts normally, which is what lets
an orchestrator roll a committed change forward through a hang or a refusal. Why once: a fault that
fired on every retry would make every fault after the commit point a permanent outage, which tests
nothing but the retry limit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from pipeshift.errors import UserError

logger = logging.getLogger(__name__)

FAULT_ENV = "PIPESHIFT_FAULT"
DELAY_ENV = "PIPESHIFT_FAULT_DELAY_S"
DEFAULT_DELAY_S = 2.0
PHASES = ("prepare", "precopy", "switch", "commit", "cleanup")
ACTIONS = ("crash", "hang", "slow", "refuse")
# An exit status no ordinary failure of ours uses, so a test can tell an injected crash from a real one.
CRASH_EXIT_CODE = 86
# How often a hung call looks whether its caller has hung up.
HANG_POLL_S = 0.05

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Fault:
    phase: str
    action: str
    delay_s: float = DEFAULT_DELAY_S

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"fault phase {self.phase!r} is not one of {', '.join(PHASES)}")
        if self.action not in ACTIONS:
            raise ValueError(f"fault action {self.action!r} is not one of {', '.join(ACTIONS)}")
        if not (math.isfinite(self.delay_s) and self.delay_s >= 0):
            raise ValueError(f"fault delay must be a finite number of seconds >= 0, got {self.delay_s}")

    def __str__(self) -> str:
        return f"{self.phase}:{self.action}"


def fault_from_env(environ: Mapping[str, str] | None = None) -> Fault | None:
    """The fault configured in `environ` (default: this process's), or None when `PIPESHIFT_FAULT` is unset
    or empty; a malformed value raises UserError naming the variable and the valid values."""
    env = os.environ if environ is None else environ
    raw = env.get(FAULT_ENV, "").strip()
    if not raw:
        return None
    phase, sep, action = (part.strip().lower() for part in raw.partition(":"))
    if not sep or phase not in PHASES or action not in ACTIONS:
        raise UserError(
            f"{FAULT_ENV}={raw!r} is not <phase>:<action>; phases: {', '.join(PHASES)}; "
            f"actions: {', '.join(ACTIONS)} (e.g. {FAULT_ENV}=commit:hang)"
        )
    delay_raw = env.get(DELAY_ENV, "").strip()
    delay = DEFAULT_DELAY_S
    if delay_raw:
        try:
            delay = float(delay_raw)
        except ValueError:
            delay = math.nan
        if not (math.isfinite(delay) and delay >= 0):
            raise UserError(f"{DELAY_ENV}={delay_raw!r} must be a number of seconds >= 0 (default {DEFAULT_DELAY_S})")
    return Fault(phase, action, delay)


class FaultInjector:
    """The fault of one process (`where` names it in logs and answers); `wrap` puts it at a phase's route."""

    def __init__(self, fault: Fault | None, where: str) -> None:
        self.fault = fault
        self.where = where
        self.fired = False

    @classmethod
    def from_env(cls, where: str, environ: Mapping[str, str] | None = None) -> FaultInjector:
        fault = fault_from_env(environ)
        if fault is not None:
            logger.warning("%s: fault injection armed: %s=%s", where, FAULT_ENV, fault)
        return cls(fault, where)

    def wrap(self, phase: str, handler: Handler) -> Handler:
        """`handler` with this process's fault in front of it when the fault is for `phase` (else `handler`
        itself, untouched)."""
        if phase not in PHASES:
            raise ValueError(f"unknown reconfiguration phase {phase!r}; valid: {', '.join(PHASES)}")
        if self.fault is None or self.fault.phase != phase:
            return handler

        async def faulty(request: web.Request) -> web.StreamResponse:
            await self.hit(phase, request)
            return await handler(request)

        return faulty

    async def hit(self, phase: str, request: web.Request | None = None) -> None:
        """Inject the fault if it is for `phase` and has not fired yet; returns when the call may go on.

        A hung call ends (unanswered) once its caller hangs up, so that it never keeps the process from
        shutting down; without `request` it hangs for good."""
        fault = self.fault
        if fault is None or fault.phase != phase or self.fired:
            return
        self.fired = True
        where = self.where if request is None else f"{self.where} {request.method} {request.path}"
        logger.warning("%s: injecting fault %s", where, fault)
        if fault.action == "crash":
            print(f"{where}: injected fault {fault}: exiting with status {CRASH_EXIT_CODE}", file=sys.stderr,
                  flush=True)
            os._exit(CRASH_EXIT_CODE)
        if fault.action == "hang":
            while _caller_waits(request):
                await asyncio.sleep(HANG_POLL_S)
            logger.warning("%s: the caller gave up on the hung call", where)
            raise _unanswered(f"{where}: the caller hung up on this call, hung by {FAULT_ENV}={fault}")
        if fault.action == "slow":
            await asyncio.sleep(fault.delay_s)
            return
        if fault.action == "refuse":
            raise _unanswered(f"{where}: refused by the injected fault {FAULT_ENV}={fault}")


def _unanswered(message: str) -> web.HTTPServiceUnavailable:
    """503 with the control APIs' JSON error body: the call acted on nothing."""
    return web.HTTPServiceUnavailable(text=json.dumps({"error": message}), content_type="application/json")


def _caller_waits(request: web.Request | None) -> bool:
    transport = None if request is None else request.transport
    return request is None or (transport is not None and not transport.is_closing())
