"""Frames over asyncio streams, for code that already holds a StreamReader/StreamWriter pair.

`FrameServer`/`FrameClient` use raw sockets instead (see `sockets`), which saves the stream buffer's copies.
"""

from __future__ import annotations

import asyncio

from pipeshift.runtime.transport.codec import drive_async, encode_parts, frame_parser
from pipeshift.runtime.transport.frame import Frame
from pipeshift.runtime.transport.limits import Accepts


async def read_frame(reader: asyncio.StreamReader, accepts: Accepts) -> Frame:
    """The next frame, validated against what `accepts` allows; raises FrameError, or PeerClosed at a clean EOF."""

    async def fill(view: memoryview) -> int:
        got = 0
        while got < len(view):
            chunk = await reader.read(len(view) - got)
            if not chunk:
                break
            view[got : got + len(chunk)] = chunk
            got += len(chunk)
        return got

    return await drive_async(frame_parser(accepts), fill)


async def write_frame(writer: asyncio.StreamWriter, frame: Frame) -> None:
    head, payload = encode_parts(frame)
    writer.write(head)
    if payload:
        writer.write(payload)
    await writer.drain()
