"""The connecting side of a data-plane connection: handshake, then send frames and read replies.

`FrameClient` runs on the event loop; `BlockingFrameClient` is the same for a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from types import TracebackType

from pipeshift.runtime.security import load_control_token
from pipeshift.runtime.transport.errors import FrameError, HandshakeRefused, PeerClosed
from pipeshift.runtime.transport.frame import Frame, Kind
from pipeshift.runtime.transport.handshake import REPLY_LIMITS, check_reply, hello
from pipeshift.runtime.transport.limits import Accepts, FrameLimits, limits_by_kind
from pipeshift.runtime.transport.sockets import (
    recv_frame,
    recv_frame_blocking,
    send_frame,
    send_frame_blocking,
)


def _connect(host: str, port: int, timeout_s: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _with_close(replies: Accepts) -> dict[Kind, FrameLimits]:
    table = limits_by_kind(replies)
    table.setdefault(Kind.CLOSE, FrameLimits.messages(Kind.CLOSE))
    return table


def _refusal(exc: PeerClosed | FrameError) -> HandshakeRefused:
    return HandshakeRefused(f"the server ended the connection during the handshake ({exc})")


class FrameClient:
    """An authenticated connection to a `FrameServer`; build it with `await FrameClient.connect(...)`.

    `replies` limits what `recv` accepts from the server (CLOSE always is, and raises PeerClosed).
    Sends are serialised, so several tasks may share one client.
    """

    def __init__(self, sock: socket.socket, replies: Accepts) -> None:
        self._sock = sock
        self._replies = _with_close(replies)
        self._send_lock = asyncio.Lock()

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        role: str,
        stage_id: int,
        token: str | None = None,
        replies: Accepts = REPLY_LIMITS,
        timeout_s: float = 10.0,
    ) -> FrameClient:
        """`token=None` reads PIPESHIFT_CONTROL_TOKEN(_FILE), like the server does."""
        token = token if token is not None else load_control_token()
        sock = await asyncio.to_thread(_connect, host, port, timeout_s)
        sock.setblocking(False)
        try:
            await send_frame(sock, hello(role, stage_id, token))
            check_reply(await asyncio.wait_for(recv_frame(sock, REPLY_LIMITS), timeout_s))
        except (PeerClosed, FrameError) as exc:
            sock.close()
            raise _refusal(exc) from exc
        except BaseException:
            sock.close()
            raise
        return cls(sock, replies)

    async def send(self, frame: Frame) -> None:
        async with self._send_lock:
            await send_frame(self._sock, frame)

    async def recv(self) -> Frame:
        """The server's next reply; a CLOSE from the server raises PeerClosed with its reason."""
        frame = await recv_frame(self._sock, self._replies)
        if frame.kind is Kind.CLOSE:
            raise PeerClosed(f"the server closed the connection: {frame.body().get('reason', 'no reason given')}")
        return frame

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            await self.send(Frame.message(Kind.CLOSE))
        self._sock.close()

    async def __aenter__(self) -> FrameClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class BlockingFrameClient:
    """`FrameClient` for threads (e.g. streaming KV blocks during migration without the event loop)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        role: str,
        stage_id: int,
        token: str | None = None,
        replies: Accepts = REPLY_LIMITS,
        timeout_s: float = 10.0,
    ) -> None:
        token = token if token is not None else load_control_token()
        self._sock = _connect(host, port, timeout_s)
        self._replies = _with_close(replies)
        try:
            send_frame_blocking(self._sock, hello(role, stage_id, token))
            check_reply(recv_frame_blocking(self._sock, REPLY_LIMITS))
        except (PeerClosed, FrameError) as exc:
            self._sock.close()
            raise _refusal(exc) from exc
        except BaseException:
            self._sock.close()
            raise
        # The connect timeout bounded the handshake; a data connection may idle indefinitely.
        self._sock.settimeout(None)

    def send(self, frame: Frame) -> None:
        send_frame_blocking(self._sock, frame)

    def recv(self) -> Frame:
        frame = recv_frame_blocking(self._sock, self._replies)
        if frame.kind is Kind.CLOSE:
            raise PeerClosed(f"the server closed the connection: {frame.body().get('reason', 'no reason given')}")
        return frame

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send(Frame.message(Kind.CLOSE))
        self._sock.close()

    def __enter__(self) -> BlockingFrameClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
