"""A TCP server that authenticates stage peers and feeds their frames to one handler, per connection.

A bad frame or a failing handler ends only that connection (logged with the reason); the listener
keeps accepting. Frames on one connection are handled in order, one at a time, so a slow handler
pushes back on its sender through TCP rather than queueing unbounded memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from types import TracebackType

from pipeshift.runtime.security import load_control_token
from pipeshift.runtime.transport.codec import encode_parts
from pipeshift.runtime.transport.errors import FrameError, HandshakeRefused, PeerClosed
from pipeshift.runtime.transport.frame import Frame, Kind
from pipeshift.runtime.transport.handshake import HELLO_LIMITS, Peer, accept_hello
from pipeshift.runtime.transport.limits import Accepts, FrameLimits, limits_by_kind
from pipeshift.runtime.transport.sockets import recv_frame, send_encoded, send_frame

logger = logging.getLogger(__name__)

FrameHandler = Callable[[Frame, Peer], Awaitable[Frame | None]]
_LINGER_S = 1.0


class FrameServer:
    """Listens on `host:port` (port 0: an ephemeral one, see `.port`) and calls `on_frame` per frame.

    `token=None` reads PIPESHIFT_CONTROL_TOKEN(_FILE), so a configured cluster is never left open by
    omission; with no token configured anywhere, any peer may connect. A frame the handler returns
    is sent back on the same connection. `accepts` describes the data frames (one `FrameLimits` per
    group of kinds); a client's CLOSE is always accepted.
    """

    def __init__(
        self,
        on_frame: FrameHandler,
        accepts: Accepts,
        *,
        token: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        handshake_timeout_s: float = 10.0,
    ) -> None:
        self._on_frame = on_frame
        self._accepts = limits_by_kind(accepts)
        self._accepts.pop(Kind.HANDSHAKE, None)
        self._accepts.setdefault(Kind.CLOSE, FrameLimits.messages(Kind.CLOSE))
        self._token = token if token is not None else load_control_token()
        self._host, self._port = host, port
        self._handshake_timeout_s = handshake_timeout_s
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("FrameServer.port is known only after start()")
        return int(self._listener.getsockname()[1])

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        self._listener = socket.create_server((self._host, self._port), family=family, backlog=128)
        self._listener.setblocking(False)
        self._accepting = asyncio.create_task(self._accept_loop(self._listener))
        logger.info("frame server listening on %s:%d", self._host, self.port)

    async def close(self) -> None:
        tasks = [t for t in (self._accepting, *self._connections) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        self._accepting, self._listener = None, None

    async def __aenter__(self) -> FrameServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, address = await loop.sock_accept(listener)
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._serve(conn, f"{address[0]}:{address[1]}"))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, conn: socket.socket, address: str) -> None:
        who = address
        try:
            first = await asyncio.wait_for(recv_frame(conn, HELLO_LIMITS), self._handshake_timeout_s)
            peer = accept_hello(first, self._token, address)
            who = f"{peer.role} {peer.stage_id} at {address}"
            await send_frame(conn, Frame.message(Kind.ACK))
            await self._serve_frames(conn, peer)
        except (FrameError, HandshakeRefused) as exc:
            logger.warning("closing data connection from %s: %s", who, exc)
            await self._send_reason(conn, str(exc))
        except PeerClosed:
            logger.debug("data connection from %s closed by the peer", who)
        except TimeoutError:
            logger.warning("closing data connection from %s: no handshake within %ss", who, self._handshake_timeout_s)
        except OSError as exc:
            logger.info("data connection from %s failed: %s", who, exc)
        finally:
            conn.close()

    async def _serve_frames(self, conn: socket.socket, peer: Peer) -> None:
        while True:
            frame = await recv_frame(conn, self._accepts)
            if frame.kind is Kind.CLOSE:
                logger.debug("%s %d said goodbye", peer.role, peer.stage_id)
                return
            try:
                reply = await self._on_frame(frame, peer)
                # Encoded here because a reply that cannot be encoded is the handler's bug.
                encoded = None if reply is None else encode_parts(reply)
            except Exception:
                logger.exception("handler failed on %r from %s %d; closing its connection", frame, peer.role,
                                 peer.stage_id)  # fmt: skip
                await self._send_reason(conn, "the server failed to handle a frame; see its log")
                return
            if encoded is not None:
                await send_encoded(conn, *encoded)

    async def _send_reason(self, conn: socket.socket, reason: str) -> None:
        """Best effort and bounded in time: a buggy peer learns why, a hostile one cannot stall us.

        Closing with unread input makes the kernel send a reset, which can overtake the reason; so the
        write side is shut first and input is discarded for a moment (a lingering close, as in HTTP).
        """
        loop = asyncio.get_running_loop()

        async def deliver() -> None:
            await send_frame(conn, Frame.message(Kind.CLOSE, {"reason": reason[:500]}))
            conn.shutdown(socket.SHUT_WR)
            scratch = bytearray(64 * 1024)
            while await loop.sock_recv_into(conn, scratch):
                pass

        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(deliver(), _LINGER_S)
