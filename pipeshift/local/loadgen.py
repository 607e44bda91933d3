"""A load generator for the OpenAI-compatible API: open-loop arrivals, streaming, client-side timings.

Used by `pipeshift demo` and `bench/serving.py`, so both measure TTFT and TPOT the same way: TTFT is
arrival to first token; TPOT is (end − first token) / (tokens − 1), as the client sees them.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp


@dataclass(frozen=True)
class Load:
    rate: float          # requests per second (open loop: arrivals do not wait for answers)
    requests: int
    prompt_tokens: int
    max_tokens: int
    warmup: int = 0      # concurrent untimed requests sent first


@dataclass(frozen=True)
class RequestTiming:
    ttft: float
    tpot: float
    e2e: float
    tokens: int


async def one_request(session: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int) -> RequestTiming:
    """One streaming completion that must generate exactly `max_tokens` tokens (EOS ignored); a failure raises,
    since a benchmark's figures mean nothing with a request missing."""
    result = await stream_planned(session, url, PlannedRequest(0.0, prompt, max_tokens))
    if result.error is not None or len(result.tokens) != max_tokens:
        raise RuntimeError(f"request failed: {result.error or f'streamed {len(result.tokens)} of {max_tokens} tokens'}")
    first, last = result.token_times[0], result.token_times[-1]
    return RequestTiming(ttft=first - result.sent, tpot=(last - first) / max(1, max_tokens - 1),
                         e2e=last - result.sent, tokens=max_tokens)


async def drive(url: str, load: Load, vocab: int, *, seed: int = 0,
                on_done: Callable[[RequestTiming], None] | None = None) -> tuple[list[RequestTiming], float]:
    """Send `load` to the frontend at `url`; returns the timed requests and the wall time they took."""
    rng = random.Random(seed)

    def prompt() -> list[int]:
        return [rng.randrange(2, vocab) for _ in range(load.prompt_tokens)]

    async def timed(p: list[int]) -> RequestTiming:
        timing = await one_request(session, url, p, load.max_tokens)
        if on_done is not None:
            on_done(timing)
        return timing

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(one_request(session, url, prompt(), load.max_tokens) for _ in range(load.warmup)))
        tasks = []
        started = time.perf_counter()
        for i in range(load.requests):
            delay = started + i / load.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(timed(prompt())))
        timings = await asyncio.gather(*tasks)
        return list(timings), time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(timings: list[RequestTiming], wall: float) -> dict[str, float]:
    ttft, tpot = [t.ttft for t in timings], [t.tpot for t in timings]
    generated = sum(t.tokens for t in timings)
    return {
        "requests": len(timings),
        "tokens": generated,
        "wall_s": wall,
        "throughput_tok_s": generated / wall,
        "requests_per_s": len(timings) / wall,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p95_s": percentile(ttft, 0.95),
        "tpot_p50_s": statistics.median(tpot),
        "tpot_p95_s": percentile(tpot, 0.95),
        "e2e_p50_s": statistics.median(t.e2e for t in timings),
    }


@dataclass(frozen=True)
class PlannedRequest:
    """One request of a replayable workload: when it arrives (seconds from the start) and what it asks."""

    arrival_s: float
    prompt: list[int]
    max_tokens: int


@dataclass(frozen=True)
class StreamResult:
    """What the client saw: tokens, finish reason (None if the stream broke), and when each token came."""

    tokens: list[int]
    finish: str | None
    sent: float
    token_times: list[float]
    error: str | None = None

    @property
    def ended(self) -> float:
        return self.token_times[-1] if self.token_times else self.sent


def poisson_requests(n: int, rate: float, *, seed: int, vocab: int, prompt_tokens: int,
                     max_tokens: int) -> list[PlannedRequest]:
    """Poisson arrivals at `rate` per second; prompt and output lengths uniform up to the given sizes."""
    rng = random.Random(seed)
    at, planned = 0.0, []
    for _ in range(n):
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(max(1, prompt_tokens // 2), prompt_tokens))]
        planned.append(PlannedRequest(at, prompt, rng.randint(max(1, max_tokens // 2), max_tokens)))
        at += rng.expovariate(rate)
    return planned


async def stream_planned(session: aiohttp.ClientSession, url: str, request: PlannedRequest,
                         on_token: Callable[[], None] | None = None) -> StreamResult:
    """One greedy streaming request; failures are results (finish None), since the demo counts losses.
    `on_token` is called as each chunk of tokens arrives (a benchmark waits for first tokens with it)."""
    body = {"prompt": request.prompt, "max_tokens": request.max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    sent = time.perf_counter()
    tokens: list[int] = []
    times: list[float] = []
    finish = None
    try:
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                return StreamResult(tokens, None, sent, times, f"HTTP {resp.status}: {await resp.text()}")
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return StreamResult(tokens, None, sent, times, str(chunk["error"]))
                choice = chunk["choices"][0]
                got = choice.get("token_ids") or []
                tokens += got
                times += [time.perf_counter()] * len(got)
                if got and on_token is not None:
                    on_token()
                finish = choice.get("finish_reason") or finish
    except aiohttp.ClientError as error:
        return StreamResult(tokens, None, sent, times, str(error))
    return StreamResult(tokens, finish, sent, times)


async def replay(url: str, planned: list[PlannedRequest],
                 on_done: Callable[[StreamResult], None] | None = None,
                 started: Callable[[list[asyncio.Task[StreamResult]]], None] | None = None,
                 on_token: Callable[[int], None] | None = None) -> list[StreamResult]:
    """Send `planned` open-loop at their arrival times; `started` sees the task list as it grows;
    `on_token(i)` is called whenever tokens of `planned[i]` arrive (the demo watches progress with it)."""
    tasks: list[asyncio.Task[StreamResult]] = []

    async def one(index: int, request: PlannedRequest) -> StreamResult:
        tick = None if on_token is None else (lambda: on_token(index))
        result = await stream_planned(session, url, request, tick)
        if on_done is not None:
            on_done(result)
        return result

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        t0 = time.perf_counter()
        if started is not None:
            started(tasks)
        for index, request in enumerate(planned):
            delay = t0 + request.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index, request)))
        return list(await asyncio.gather(*tasks))
