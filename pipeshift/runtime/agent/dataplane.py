"""The agent's data path: upstream connections → queue → the compute worker → queue → downstream.

Bounded queues let the next batch arrive while one computes and one is sent, without buffering more.
Peers that say they are "migrate" carry KV blocks for a reconfiguration instead (see `migrate`).

During an epoch switch a batch of the new epoch may have to wait at this stage's fence until KV it reads
has arrived (see `transition`); it waits alone: later batches are computed and sent past it. Releases are
applied when a batch arrives, and a batch that overtakes waiting ones carries their releases too (a
release is idempotent), so no stage downstream sees an admission before a release the frontend ordered
before it. Batches of each epoch leave by that epoch's route.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from pipeshift.errors import UserError
from pipeshift.runtime.agent.downstream import Downstream, parse_address
from pipeshift.runtime.agent.worker import StageWorker, StateConflict
from pipeshift.runtime.kv import KVCapacityError
from pipeshift.runtime.metrics import AgentMetrics
from pipeshift.runtime.microbatch import MAX_RELEASES, MAX_SEQS, MicroBatch, MicroBatchReader, data_limits
from pipeshift.runtime.migrate import (
    MIGRATE_ROLE,
    KVChunk,
    PlannedChunk,
    chunk_from,
    chunk_header,
    migration_limits,
)
from pipeshift.runtime.transport import Frame, FrameError, FrameLimits, HandshakeRefused, Kind, PeerClosed
from pipeshift.runtime.transport.handshake import HELLO_LIMITS, accept_hello
from pipeshift.runtime.transport.sockets import recv_frame, send_frame

logger = logging.getLogger(__name__)

QUEUE_DEPTH = 2
HANDSHAKE_TIMEOUT_S = 10.0
# A batch held at a fence longer than this fails, naming the KV it still lacks.
FENCE_TIMEOUT_S = 20.0
FENCE_POLL_S = 0.5
# Imported chunks are placed on the worker in groups of at most this many bytes (one hop per group).
IMPORT_GROUP_BYTES = 8 << 20
# Sends KV chunks a source owes a target (data address) during an epoch switch.
PushHook = Callable[[str, list[PlannedChunk]], None]


@dataclass
class _Held:
    """A batch that arrived (and was admitted) but has not left: waiting at the fence (`out` None), or
    computed but not allowed past earlier waiting ones yet."""

    mb: MicroBatch
    since: float
    out: MicroBatch | None = None
    fenced: bool = False


class DataPlane:
    """Accepts upstream peers on `host:port` (0: ephemeral, see `.port`) and drives batches through."""

    def __init__(
        self, worker: StageWorker, metrics: AgentMetrics, *, host: str, port: int, token: str | None
    ) -> None:
        self.worker = worker
        self.metrics = metrics
        self._host, self._port, self._token = host, port, token
        self.downstream = Downstream(stage_id=worker.config.stage_id, token=token)
        # The route of an armed epoch (epoch, downstream) while an epoch switch is under way.
        self.armed: tuple[int, Downstream] | None = None
        self.push: PushHook | None = None
        self._kv_arrived = asyncio.Event()
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

    def limits(self, role: str = "") -> tuple[FrameLimits, ...]:
        """The frontend sends token ids, stages send hidden states (a stage may be first in one epoch and not
        in the other while a switch is armed, so the sender decides, not the stage's current range)."""
        config = self.worker.config
        first = role == "frontend"
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
                frame = await recv_frame(conn, (*self.limits(peer.role), FrameLimits.messages(Kind.CLOSE)))
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
        """Import chunks in arrival order, in groups; on `flush`, answer how many blocks were imported since
        the last one, or the first error (later chunks of that round are skipped, so the source resends)."""
        limits = migration_limits(self.worker.stage.spec)
        header: tuple[int, int] | None = None
        group: list[KVChunk] = []
        imported, error = 0, ""
        while True:
            frame = await recv_frame(conn, limits)
            if frame.kind is Kind.CLOSE:
                return
            if frame.kind is Kind.CONTROL:
                body = frame.body()
                if "flush" in body:
                    done, error = await self._import(group, error)
                    imported, group = imported + done, []
                    reply = {"error": error} if error else {"imported": imported}
                    await send_frame(conn, Frame.message(Kind.CONTROL, reply))
                    imported, error = 0, ""
                    continue
                header = chunk_header(frame)
                continue
            chunk, header = chunk_from(header, frame), None
            if not error:
                group.append(chunk)
            if sum(c.nbytes for c in group) >= IMPORT_GROUP_BYTES:
                done, error = await self._import(group, error)
                imported, group = imported + done, []

    async def _import(self, chunks: list[KVChunk], error: str) -> tuple[int, str]:
        """Blocks imported from `chunks` on the worker, and the first error (which skips the rest)."""
        if error or not chunks:
            return 0, error
        if self.kv_import is None:
            return 0, "this stage takes no KV imports"
        try:
            return await self.worker.call(self._import_on_worker, self.kv_import, chunks), ""
        except (StateConflict, KVCapacityError, ValueError) as exc:
            logger.warning("stage %d: KV import failed: %s", self.worker.config.stage_id, exc)
            return 0, f"stage {self.worker.config.stage_id}: {exc}"
        finally:
            self._kv_arrived.set()  # a batch waiting at the fence may run now

    @staticmethod
    def _import_on_worker(kv_import: Callable[[KVChunk], int], chunks: Sequence[KVChunk]) -> int:
        return sum(kv_import(chunk) for chunk in chunks)

    def _reject(self) -> None:
        self.rejected += 1
        self.metrics.frames_rejected.inc()

    # ---- routes of an epoch switch ---------------------------------------------------------------

    def route_for(self, epoch: int) -> Downstream:
        if self.armed is not None and epoch >= self.armed[0]:
            return self.armed[1]
        return self.downstream

    async def arm_route(self, epoch: int, address: str) -> None:
        """Batches of `epoch` (and later) leave for `address`; older ones keep the current route."""
        if parse_address(address) == _parsed(self.downstream.address):
            downstream = self.downstream
        else:
            downstream = Downstream(stage_id=self.worker.config.stage_id, token=self._token)
            await downstream.route(address)
        await self.disarm_route()
        self.armed = (epoch, downstream)

    async def retire_route(self) -> None:
        """The armed route becomes the only one (the old epoch has no batch left)."""
        if self.armed is None:
            return
        downstream, old = self.armed[1], self.downstream
        self.downstream, self.armed = downstream, None
        if old is not downstream:
            await old.close()

    async def disarm_route(self) -> None:
        """Forget the armed route (an aborted switch)."""
        armed, self.armed = self.armed, None
        if armed is not None and armed[1] is not self.downstream:
            await armed[1].close()

    # ---- compute ---------------------------------------------------------------------------------

    async def _compute_loop(self) -> None:
        held: list[_Held] = []
        getter: asyncio.Task[MicroBatch] | None = None
        try:
            while True:
                if getter is None:
                    getter = asyncio.ensure_future(self._inbox.get())
                if held:
                    self._kv_arrived.clear()
                    await self._retry(held)
                if held:
                    arrived = asyncio.ensure_future(self._kv_arrived.wait())
                    await asyncio.wait({getter, arrived}, timeout=FENCE_POLL_S, return_when=asyncio.FIRST_COMPLETED)
                    arrived.cancel()
                    if not getter.done():
                        continue
                else:
                    await asyncio.wait({getter})
                mb, getter = getter.result(), None
                await self._take(mb, held)
        finally:
            if getter is not None:
                getter.cancel()

    async def _take(self, mb: MicroBatch, held: list[_Held]) -> None:
        """Admit `mb` now (arrival order); compute and send it now unless it must wait."""
        if not held:
            out, pushes = await self._guard(mb, self.worker.step, mb)
            self._push(pushes)
            if out is None:
                held.append(_Held(mb, time.monotonic(), fenced=True))
            else:
                await self._outbox.put(out)
            return
        failed = await self._guard(mb, self.worker.admit, mb)
        held.append(_Held(mb, time.monotonic(), out=failed))
        await self._retry(held)

    async def _retry(self, held: list[_Held]) -> None:
        """Send every held batch that may go now, in arrival order, each past the ones still waiting."""
        progressed = True
        while progressed:
            progressed = False
            for i, h in enumerate(held):
                before = held[:i]
                if not _fits(h.out or h.mb, before):
                    continue
                if h.out is None:
                    waited = time.monotonic() - h.since
                    out, pushes = await self._guard(h.mb, self.worker.compute, h.mb, waited if h.fenced else 0.0)
                    self._push(pushes)
                    if out is None and waited > FENCE_TIMEOUT_S:
                        out = await self.worker.call(self.worker.expire, h.mb, waited)
                    if out is None:
                        h.fenced = True
                        continue
                    h.out = out
                del held[i]
                await self._outbox.put(_carrying(h.out, before))
                progressed = True
                break

    async def _guard(self, mb: MicroBatch, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on the worker; a crash fails the batch instead of stopping the stage."""
        try:
            return await self.worker.call(fn, *args)
        except Exception as exc:
            logger.exception("stage %d: batch %d crashed", self.worker.config.stage_id, mb.batch_id)
            failed = await self.worker.call(self.worker.fail, mb, f"stage {self.worker.config.stage_id}: {exc!r}")
            return failed if fn == self.worker.admit else (failed, [])

    def _push(self, pushes: list[tuple[str, list[PlannedChunk]]]) -> None:
        for target, chunks in pushes:
            if self.push is None:
                logger.error("stage %d: KV for %s computed but no push is armed", self.worker.config.stage_id, target)
                continue
            self.push(target, chunks)

    async def _send_loop(self) -> None:
        while True:
            mb = await self._outbox.get()
            await self.route_for(mb.epoch).send(mb)


def _parsed(address: str | None) -> tuple[str, int] | None:
    return None if address is None else parse_address(address)


def _fits(mb: MicroBatch, before: Sequence[_Held]) -> bool:
    """Whether `mb` can carry the releases of the earlier held batches of its epoch (so it may pass them)."""
    return len(_releases(mb, before)) <= MAX_RELEASES


def _releases(mb: MicroBatch, before: Sequence[_Held]) -> tuple[int, ...]:
    carried = [seq for h in before if h.mb.epoch == mb.epoch for seq in h.mb.release]
    return tuple(dict.fromkeys([*mb.release, *carried]))


def _carrying(mb: MicroBatch, before: Sequence[_Held]) -> MicroBatch:
    releases = _releases(mb, before)
    return mb if releases == mb.release else replace(mb, release=releases)
