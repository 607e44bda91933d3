"""Frames over plain TCP sockets: non-blocking ones on the event loop, and blocking ones for threads.

Receiving goes straight from the kernel into the frame's own buffer (`recv_into`), the only copy.
"""

from __future__ import annotations

import asyncio
import socket

from pipeshift.runtime.transport.codec import drive, drive_async, encode_parts, frame_parser
from pipeshift.runtime.transport.frame import Frame
from pipeshift.runtime.transport.limits import Accepts

# Below this, one send of header and payload joined beats two system calls.
_JOIN_BELOW = 64 * 1024


async def recv_frame(sock: socket.socket, accepts: Accepts) -> Frame:
    """The next frame from a non-blocking socket; raises FrameError, or PeerClosed at a clean EOF."""
    loop = asyncio.get_running_loop()

    async def fill(view: memoryview) -> int:
        got = 0
        while got < len(view):
            n = await loop.sock_recv_into(sock, view[got:])
            if n == 0:
                break
            got += n
        return got

    return await drive_async(frame_parser(accepts), fill)


async def send_frame(sock: socket.socket, frame: Frame) -> None:
    await send_encoded(sock, *encode_parts(frame))


async def send_encoded(sock: socket.socket, head: bytes, payload: memoryview) -> None:
    """Sends what `encode_parts` produced, for callers that must encode before committing to send."""
    loop = asyncio.get_running_loop()
    if payload.nbytes < _JOIN_BELOW:
        await loop.sock_sendall(sock, head + payload)
    else:
        await loop.sock_sendall(sock, head)
        await loop.sock_sendall(sock, payload)


def recv_frame_blocking(sock: socket.socket, accepts: Accepts) -> Frame:
    """`recv_frame` for a blocking socket (e.g. KV migration in a worker thread)."""

    def fill(view: memoryview) -> int:
        got = 0
        while got < len(view):
            n = sock.recv_into(view[got:])
            if n == 0:
                break
            got += n
        return got

    return drive(frame_parser(accepts), fill)


def send_frame_blocking(sock: socket.socket, frame: Frame) -> None:
    head, payload = encode_parts(frame)
    if payload.nbytes < _JOIN_BELOW:
        sock.sendall(head + payload)
    else:
        sock.sendall(head)
        sock.sendall(payload)
