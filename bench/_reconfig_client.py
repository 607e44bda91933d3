"""The benchmark's client, in its own spawned process so its event loop never competes with the frontend's
for a GIL: it streams the long requests that make up the live KV, plus a steady trickle of short probes
whose TTFT shows what a newcomer waits for, and records when every token arrived (Unix time).

Protocol over a pipe with the benchmark process: the client sends `("prefilled", t)` once every long
request has its first token; `(kind, [(prompt, max_tokens), ...])` from the benchmark starts those requests
at once (a burst); after `"stop"` it sends no more probes, waits for every stream to end and answers
`("results", [dict, ...])`.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import aiohttp

from pipeshift.local.loadgen import PlannedRequest, StreamResult, stream_planned


@dataclass(frozen=True)
class ClientPlan:
    """What to send: `long` requests (prompt token ids, max tokens) at once, then, from when every one of them
    has its first token, probes every `1 / probe_rate` seconds (open loop: arrivals never wait for answers;
    rate 0: no probes)."""

    url: str
    long: list[tuple[list[int], int]]
    probe_rate: float
    probe_prompt: int
    probe_max_tokens: int
    vocab: int
    seed: int


def _as_record(kind: str, request: PlannedRequest, result: StreamResult, offset: float) -> dict[str, Any]:
    return {
        "kind": kind,
        "prompt_tokens": len(request.prompt),
        "max_tokens": request.max_tokens,
        "tokens": len(result.tokens),
        "finish": result.finish,
        "error": result.error,
        "sent": result.sent + offset,
        "token_times": [t + offset for t in result.token_times],
    }


async def _drive(plan: ClientPlan, conn: Connection) -> list[dict[str, Any]]:
    # perf_counter is monotonic and fine-grained; one offset maps it onto the Unix clock the other process uses.
    offset = time.time() - time.perf_counter()
    rng = random.Random(plan.seed)
    records: list[asyncio.Task[dict[str, Any]]] = []
    first_tokens: list[asyncio.Event] = []

    async def one(kind: str, request: PlannedRequest, first: asyncio.Event | None) -> dict[str, Any]:
        result = await stream_planned(session, plan.url, request, None if first is None else first.set)
        if first is not None:
            first.set()  # a stream that failed before its first token must not stall the benchmark
        return _as_record(kind, request, result, offset)

    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        for prompt, max_tokens in plan.long:
            event = asyncio.Event()
            first_tokens.append(event)
            records.append(asyncio.create_task(one("long", PlannedRequest(0.0, prompt, max_tokens), event)))
        started = 0.0  # probes start once the long requests are prefilled (the steady state)
        announced = False
        probes = 0
        while True:
            if not announced and all(e.is_set() for e in first_tokens):
                conn.send(("prefilled", time.time()))
                announced, started = True, time.perf_counter()
            if conn.poll():
                message = conn.recv()
                if message == "stop":
                    break
                kind, batch = message
                for prompt, max_tokens in batch:
                    records.append(asyncio.create_task(one(kind, PlannedRequest(0.0, prompt, max_tokens), None)))
            if announced and plan.probe_rate > 0:
                due = started + probes / plan.probe_rate
                if time.perf_counter() >= due:
                    prompt = [rng.randrange(2, plan.vocab) for _ in range(plan.probe_prompt)]
                    request = PlannedRequest(due - started, prompt, plan.probe_max_tokens)
                    records.append(asyncio.create_task(one("probe", request, None)))
                    probes += 1
            await asyncio.sleep(0.005)
        return list(await asyncio.gather(*records))


def client_process(plan: ClientPlan, conn: Connection) -> None:
    try:
        conn.send(("results", asyncio.run(_drive(plan, conn))))
    except BaseException as error:
        conn.send(("error", f"{type(error).__name__}: {error}"))
        raise
