"""The frontend's view of the stage agents: their control APIs over HTTP, and the data plane through them.

Batches leave on one connection to stage 0 and come back on the "return" server that the last stage
dials, so the pipeline is a ring; one writer task keeps batches in the order the scheduler built them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import torch

from pipeshift.runtime.microbatch import MicroBatch, MicroBatchReader, data_limits, send_microbatch
from pipeshift.runtime.transport import FrameClient, FrameServer, Peer
from pipeshift.runtime.transport.frame import Frame

logger = logging.getLogger(__name__)


class StageUnreachable(RuntimeError):
    """A stage's control API did not answer, or answered with an error."""


@dataclass(frozen=True)
class StageInfo:
    """What `GET /info` tells the frontend about one stage.

    `admission_layers`/`admission_blocks`: what admission must count with now: while an epoch switch is armed
    on the stage, the union of its old and new layers (it reserves for all of them until the old epoch
    retires) in the pool it has; otherwise its layer count and pool size. `after_layers`/`after_blocks`:
    while armed, what must also fit once the old epoch retired: its new layers in the pool it resizes to
    (else the same as now).
    `reservations`: blocks the stage reserves per sequence, to spot sequences the frontend does not know.
    """

    stage_id: int
    start: int
    end: int
    hidden_size: int
    vocab_size: int
    dtype: str
    block_size: int
    total_blocks: int
    reserved_blocks: int
    data_host: str
    data_port: int
    epoch: int
    admission_layers: int = 0
    admission_blocks: int = 0
    after_layers: int = 0
    after_blocks: int = 0
    reservations: dict[int, int] = field(default_factory=dict)

    @classmethod
    def from_json(cls, body: dict[str, Any], armed: bool = False) -> StageInfo:
        """`armed`: describe the stage as it serves the armed epoch (its `armed.layers`)."""
        kv, data = body["kv"], body["data"]
        start, end = body["armed"]["layers"] if armed else body["layers"]
        admission = body.get("admission") or {"layers": int(end) - int(start), "blocks": kv["total_blocks"]}
        after = admission.get("after") or admission
        return cls(
            stage_id=int(body["stage_id"]),
            start=int(start),
            end=int(end),
            hidden_size=int(body["hidden_size"]),
            vocab_size=int(body["vocab_size"]),
            dtype=str(body["dtype"]),
            block_size=int(body["block_size"]),
            total_blocks=int(kv["total_blocks"]),
            reserved_blocks=int(kv["reserved_blocks"]),
            data_host=str(data["host"]),
            data_port=int(data["port"]),
            epoch=int(body.get("epoch", 0)),
            admission_layers=int(admission["layers"]),
            admission_blocks=int(admission["blocks"]),
            after_layers=int(after["layers"]),
            after_blocks=int(after["blocks"]),
            reservations={int(k): int(v) for k, v in kv.get("reservations", {}).items()},
        )

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    @property
    def data_address(self) -> str:
        return f"{self.data_host}:{self.data_port}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


class AgentClient:
    """One agent's control API; state-changing calls carry a fresh request id, as the API requires."""

    def __init__(self, session: aiohttp.ClientSession, address: str, token: str | None) -> None:
        self.address = address
        self._session = session
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def info(self, timeout_s: float = 10.0, armed: bool = False) -> StageInfo:
        body = await self._call("GET", "/info", None, timeout_s)
        if armed and not body.get("armed"):
            raise StageUnreachable(f"stage at {self.address} is not armed for an epoch switch (POST /reconfig/arm)")
        try:
            return StageInfo.from_json(body, armed)
        except (KeyError, TypeError, ValueError) as e:
            raise StageUnreachable(f"stage at {self.address}: /info answered without a valid {e}") from None

    async def route(self, downstream: str, timeout_s: float = 10.0) -> None:
        await self._call(
            "POST",
            "/route",
            {"request_id": f"frontend-{uuid.uuid4().hex}", "downstream": downstream},
            timeout_s,
        )

    async def healthy(self, timeout_s: float) -> bool:
        try:
            async with self._session.get(
                f"http://{self.address}/health", timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def _call(
        self, method: str, path: str, body: dict[str, Any] | None, timeout_s: float
    ) -> dict[str, Any]:
        url = f"http://{self.address}{path}"
        try:
            async with self._session.request(
                method, url, json=body, headers=self._headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                payload = await resp.json(content_type=None)
                if resp.status != 200:
                    reason = payload.get("error") if isinstance(payload, dict) else payload
                    raise StageUnreachable(f"{method} {url} answered {resp.status}: {reason}")
                return payload
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
            raise StageUnreachable(f"{method} {url} failed: {e!r}") from None


@dataclass(frozen=True)
class _Redial:
    """Queued among the batches: from here on, send to `client`."""

    client: FrameClient


class DataPlane:
    """The connection to stage 0, the return server, and the ordered writer between the scheduler and them."""

    def __init__(
        self,
        *,
        host: str,
        token: str | None,
        vocab_size: int,
        dtype: torch.dtype,
        max_rows: int,
        on_result: Callable[[MicroBatch], None],
        on_broken: Callable[[str], None],
    ) -> None:
        self._host = host
        self._token = token
        self._on_result = on_result
        self._on_broken = on_broken
        limits = data_limits(width=vocab_size, dtypes=[dtype], max_tokens=max_rows, max_seqs=max_rows)
        self._server = FrameServer(self._on_frame, limits, token=token, host=host, port=0)
        self._readers: dict[Peer, MicroBatchReader] = {}
        self._outbox: asyncio.Queue[MicroBatch | _Redial] = asyncio.Queue()
        self._client: FrameClient | None = None
        self._writer: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._server.start()

    @property
    def return_address(self) -> str:
        return f"{self._host}:{self._server.port}"

    async def connect(self, host: str, port: int) -> None:
        """(Re)open the connection to stage 0, dropping queued batches (their requests were failed)."""
        await self._disconnect()
        while not self._outbox.empty():
            self._outbox.get_nowait()
        self._client = await FrameClient.connect(host, port, role="frontend", stage_id=0, token=self._token)
        self._writer = asyncio.create_task(self._write())
        self._watcher = asyncio.create_task(self._watch(self._client))

    async def redial(self, host: str, port: int) -> None:
        """Dial a new first stage now; batches queued from the next `send` on go to it, those queued before
        still go to the current one (an epoch switch whose first stage changes)."""
        client = await FrameClient.connect(host, port, role="frontend", stage_id=0, token=self._token)
        self._outbox.put_nowait(_Redial(client))

    async def disconnect(self) -> None:
        """Let go of stage 0 (the chain is gone: scaled to zero); `connect` dials the next one."""
        await self._disconnect()
        while not self._outbox.empty():
            self._outbox.get_nowait()

    def send(self, batch: MicroBatch) -> None:
        self._outbox.put_nowait(batch)

    async def close(self) -> None:
        await self._disconnect()
        await self._server.close()

    async def _disconnect(self) -> None:
        tasks = [t for t in (self._writer, self._watcher) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._writer = self._watcher = None
        if self._client is not None:
            with contextlib.suppress(OSError):
                await self._client.close()
            self._client = None

    async def _write(self) -> None:
        while True:
            batch = await self._outbox.get()
            if isinstance(batch, _Redial):
                await self._swap(batch.client)
                continue
            assert self._client is not None
            try:
                await send_microbatch(self._client, batch)
            except (OSError, ConnectionError) as e:
                self._on_broken(
                    f"lost the data connection to stage 0 while sending micro-batch {batch.batch_id}: {e!r}"
                )
                return

    async def _swap(self, client: FrameClient) -> None:
        """Everything queued before went to the old first stage: stop watching it, then use `client`."""
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        old, self._client = self._client, client
        self._watcher = asyncio.create_task(self._watch(client))
        if old is not None:
            with contextlib.suppress(OSError):
                await old.close()

    async def _watch(self, client: FrameClient) -> None:
        """Stage 0 never sends on this connection; anything arriving, or its end, means it is gone."""
        try:
            frame = await client.recv()
            reason = f"stage 0 sent an unexpected {frame!r} on the data connection"
        except (OSError, ConnectionError, ValueError) as e:
            reason = f"stage 0 closed the data connection ({e})"
        self._on_broken(reason)

    async def _on_frame(self, frame: Frame, peer: Peer) -> None:
        reader = self._readers.setdefault(peer, MicroBatchReader())
        batch = reader.feed(frame)
        if batch is not None:
            self._on_result(batch)
