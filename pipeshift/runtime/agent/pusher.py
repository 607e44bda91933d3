"""A source's stream of final KV deltas to one target during an epoch switch.

After arming, every old-epoch step a source computes may be the last one of its sequences, so the blocks it
wrote in the moving layers are queued here right after the step (planned on the worker, copied here off it)
and sent in order over one migration connection, each group confirmed by the target's import answer. A
target's E+1 batch that needs them waits at its fence until they are imported (see `transition`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from pipeshift.runtime.agent.downstream import parse_address
from pipeshift.runtime.migrate import MIGRATE_ROLE, PlannedChunk, blocks_in, frame_bytes, stream_chunks
from pipeshift.runtime.transport import FrameClient, FrameError, FrameLimits, Kind, PeerClosed

logger = logging.getLogger(__name__)

REPLY_TIMEOUT_S = 60.0
ATTEMPTS = 2
# Delays every push by this many seconds: lets tests show that a target waits at its fence for late KV.
DELAY_ENV = "PIPESHIFT_PUSH_DELAY_S"


def push_delay_s() -> float:
    raw = os.environ.get(DELAY_ENV, "")
    try:
        delay = float(raw) if raw else 0.0
    except ValueError:
        raise ValueError(f"{DELAY_ENV}={raw!r} is not a number of seconds") from None
    if delay < 0:
        raise ValueError(f"{DELAY_ENV}={raw!r} must be >= 0")
    return delay


class KVPusher:
    """Ordered, confirmed pushes of chunk groups to the target at `address` (its data port)."""

    def __init__(self, address: str, stage_id: int, token: str | None) -> None:
        self.address = address
        self._host, self._port = parse_address(address)
        self._stage_id = stage_id
        self._token = token
        self._delay = push_delay_s()
        self._queue: asyncio.Queue[list[PlannedChunk]] = asyncio.Queue()
        self._client: FrameClient | None = None
        self._task = asyncio.create_task(self._run())
        self.bytes = self.blocks = self.groups = 0
        self.seconds = 0.0
        self.errors: list[str] = []

    def push(self, chunks: list[PlannedChunk]) -> None:
        if chunks:
            self._queue.put_nowait(chunks)

    async def flush(self, timeout_s: float) -> dict[str, Any]:
        """Wait until every group queued so far is confirmed (or failed); what was pushed."""
        await asyncio.wait_for(self._queue.join(), timeout_s)
        return self.stats()

    def stats(self) -> dict[str, Any]:
        return {"target": self.address, "bytes": self.bytes, "blocks": self.blocks, "groups": self.groups,
                "seconds": self.seconds, "errors": list(self.errors)}  # fmt: skip

    async def close(self) -> None:
        # Cancel until it ends: Python 3.11's `wait_for` can swallow a cancellation that lands as its reply
        # arrives, and the task would then wait for the next group for good (an abort that never answers).
        while not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=0.1)
        await self._disconnect()

    async def _run(self) -> None:
        while True:
            chunks = await self._queue.get()
            try:
                if self._delay:
                    await asyncio.sleep(self._delay)
                await self._send_confirmed(chunks)
            finally:
                self._queue.task_done()

    async def _send_confirmed(self, chunks: list[PlannedChunk]) -> None:
        started = time.perf_counter()
        error = ""
        for attempt in range(ATTEMPTS):
            try:
                client = self._client or await self._connect()
                await stream_chunks(client, chunks)
                reply = (await asyncio.wait_for(client.recv(), REPLY_TIMEOUT_S)).body()
            except (OSError, TimeoutError, FrameError, PeerClosed) as exc:
                error = f"push to {self.address} failed: {exc!r}"
                await self._disconnect()
                logger.warning("stage %d: %s (attempt %d)", self._stage_id, error, attempt + 1)
                continue
            if "error" in reply or reply.get("imported") != blocks_in(chunks):
                error = f"target {self.address} did not import a push: {reply.get('error', reply)}"
                break
            self.bytes += frame_bytes(chunks)
            self.blocks += blocks_in(chunks)
            self.groups += 1
            self.seconds += time.perf_counter() - started
            return
        self.errors.append(error)
        logger.error("stage %d: %s", self._stage_id, error)

    async def _connect(self) -> FrameClient:
        self._client = await FrameClient.connect(
            self._host, self._port, role=MIGRATE_ROLE, stage_id=self._stage_id, token=self._token,
            replies=FrameLimits.messages(Kind.CONTROL),
        )  # fmt: skip
        return self._client

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(OSError):
                await client.close()
