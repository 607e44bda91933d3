"""The agent's data path: upstream connections → queue → the compute worker → queue → downstream.

Bounded queues let the next batch arrive while one computes and one is sent, without buffering more.
Peers that say they are "migrate" carry KV blocks for a reconfiguration instead (see `migrate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import torch

from pipeshift.errors import UserError
from pipeshift.runtime.agent.downstream import Downstream
from pipeshift.runtime.agent.worker import StageWorker, StateConflict
from pipeshift.runtime.kv import KVCapacityError
from pipeshift.runtime.metrics import AgentMetrics
from pipeshift.runtime.microbatch import MAX_SEQS, MicroBatch, MicroBatchReader, data_limits
from pipeshift.runtime.migrate import MIGRATE_ROLE, KVChunk, chunk_from, chunk_header, migration_limits
from pipeshift.runtime.transport import Frame, FrameError, FrameLimits, HandshakeRefused, Kind, PeerClosed
from pipeshift.runtime.transport.handshake import HELLO_LIMITS, accept_hello
from pipeshift.runtime.transport.sockets import recv_frame, send_frame

logger = logging.getLogger(__name__)

QUEUE_DEPTH = 2
HANDSHAKE_TIMEOUT_S = 10.0


class DataPlane:
    """Accepts upstream peers on `host:port` (0: ephemeral, see `.port`) and drives batches through."""

    def __init__(
        self, worker: StageWorker, metrics: AgentMetrics, *, host: str, port: int, token: str | None
    ) -> None:
        self.worker = worker
        self.metrics = metrics
        self._host, self._port, self._token = host, port, token
        self.downstream = Downstream(stage_id=worker.config.stage_id, token=token)
        self._inbox: asyncio.Queue[MicroBatch] = asyncio.Queue(QUEUE_DEPTH)
        self._outbox: asyncio.Queue[MicroBatch] = asyncio.Queue(QUEUE_DEPTH)
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.upstreams = 0
        self.rejected = 0
        # Set by the reconfiguration state: imports one chunk on the worker thread, returns its blocks.
        self.kv_import: Callable[[KVChunk], int] | None = None

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("DataPlane.port is known only after start()")
        return int(self._listener.getsockname()[1])

    def limits(self) -> tuple[FrameLimits, ...]:
        """Derived from the stage as it is now: loading layer 0 turns hidden-state input into token ids."""
        config = self.worker.config
        first = self.worker.stage.is_first
        return data_limits(
            width=None if first else self.worker.model.hidden_size,
            dtypes=[torch.int64] if first else [self.worker.dtype],
            max_tokens=config.max_batch_tokens,
            max_seqs=min(MAX_SEQS, config.max_batch_tokens),
        )

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        try:
            self._listener = socket.create_server((self._host, self._port), family=family, backlog=64)
        except OSError as exc:
            raise UserError(
                f"--data-port {self._port}: cannot listen on {self._host}: {exc.strerror}"
            ) from None
        self._listener.setblocking(False)
        for loop in (self._accept_loop(self._listener), self._compute_loop(), self._send_loop()):
            self._spawn(loop)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        await self.downstream.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, address = await loop.sock_accept(listener)
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._spawn(self._serve(conn, f"{address[0]}:{address[1]}"))

    async def _serve(self, conn: socket.socket, address: str) -> None:
        """One upstream connection; whatever it sends wrong ends it alone."""
        who = address
        self.upstreams += 1
        try:
            hello = await asyncio.wait_for(recv_frame(conn, HELLO_LIMITS), HANDSHAKE_TIMEOUT_S)
            peer = accept_hello(hello, self._token, address)
            who = f"{peer.role} {peer.stage_id} at {address}"
            await send_frame(conn, Frame.message(Kind.ACK))
            if peer.role == MIGRATE_ROLE:
                await self._receive_kv(conn)
                return
            reader = MicroBatchReader()
            while True:
                frame = await recv_frame(conn, (*self.limits(), FrameLimits.messages(Kind.CLOSE)))
                if frame.kind is Kind.CLOSE:
                    return
                mb = reader.feed(frame)
                if mb is not None:
                    await self._inbox.put(mb)
        except (FrameError, HandshakeRefused) as exc:
            self._reject()
            logger.warning(
                "stage %d: closing data connection from %s: %s", self.worker.config.stage_id, who, exc
            )
            with contextlib.suppress(OSError, TimeoutError):
                reason = Frame.message(Kind.CLOSE, {"reason": str(exc)[:500]})
                await asyncio.wait_for(send_frame(conn, reason), 1.0)
        except PeerClosed:
            logger.debug("data connection from %s closed by the peer", who)
        except TimeoutError:
            self._reject()
            logger.warning(
                "closing data connection from %s: no handshake within %ss", who, HANDSHAKE_TIMEOUT_S
            )
        except OSError as exc:
            logger.info("data connection from %s failed: %s", who, exc)
        finally:
            self.upstreams -= 1
            conn.close()

    async def _receive_kv(self, conn: socket.socket) -> None:
        """Import chunks in arrival order; on `flush`, answer how many blocks were imported since the last
        one, or the first error (later chunks of that round are skipped, so the source resends them)."""
        limits = migration_limits(self.worker.stage.spec)
        header: tuple[int, int] | None = None
        imported, error = 0, ""
        while True:
            frame = await recv_frame(conn, limits)
            if frame.kind is Kind.CLOSE:
                return
            if frame.kind is Kind.CONTROL:
                body = frame.body()
                if "flush" in body:
                    reply = {"error": error} if error else {"imported": imported}
                    await send_frame(conn, Frame.message(Kind.CONTROL, reply))
                    imported, error = 0, ""
                    continue
                header = chunk_header(frame)
                continue
            chunk, header = chunk_from(header, frame), None
            if error:
                continue
            if self.kv_import is None:
                error = "this stage takes no KV imports"
                continue
            try:
                imported += await self.worker.call(self.kv_import, chunk)
            except (StateConflict, KVCapacityError, ValueError) as exc:
                error = f"stage {self.worker.config.stage_id}: {exc}"
                logger.warning("stage %d: KV import failed: %s", self.worker.config.stage_id, exc)

    def _reject(self) -> None:
        self.rejected += 1
        self.metrics.frames_rejected.inc()

    async def _compute_loop(self) -> None:
        while True:
            mb = await self._inbox.get()
            try:
                out = await self.worker.call(self.worker.process, mb)
            except Exception as exc:
                # A bug in one batch must not stop the stage: fail the batch and keep serving.
                logger.exception("stage %d: batch %d crashed", self.worker.config.stage_id, mb.batch_id)
                out = await self.worker.call(
                    self.worker.fail, mb, f"stage {self.worker.config.stage_id}: {exc!r}"
                )
            await self._outbox.put(out)

    async def _send_loop(self) -> None:
        while True:
            mb = await self._outbox.get()
            await self.downstream.send(mb)
