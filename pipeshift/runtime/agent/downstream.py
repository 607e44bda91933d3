"""The agent's connection to the next hop (the next stage, or the frontend's return server).

Dialled lazily and redialled after a break, a few times per batch, so a restarted peer is picked up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from pipeshift.runtime.microbatch import MicroBatch, send_microbatch
from pipeshift.runtime.transport import FrameClient, FrameError, PeerClosed

logger = logging.getLogger(__name__)

SEND_ATTEMPTS = 3
RETRY_DELAYS_S = (0.05, 0.25)
CONNECT_TIMEOUT_S = 5.0


def parse_address(text: str) -> tuple[str, int]:
    """`host:port` (an IPv6 host in brackets: `[::1]:9000`)."""
    host, sep, port_s = text.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_s)
    except ValueError:
        port = -1
    if not sep or not host or not 1 <= port <= 65535:
        raise ValueError(f"downstream {text!r} is not host:port with a port in 1..65535")
    return host, port


class Downstream:
    """Sends micro-batches to the routed address; `route` may change it between batches."""

    def __init__(self, *, stage_id: int, token: str | None) -> None:
        self._stage_id = stage_id
        self._token = token
        self._address: tuple[str, int] | None = None
        self._client: FrameClient | None = None
        self._watch: asyncio.Task[None] | None = None
        # Held across a whole send so a route change never lands between a header and its data.
        self._lock = asyncio.Lock()
        self.dropped = 0
        self.connects = 0

    @property
    def address(self) -> str | None:
        return None if self._address is None else f"{self._address[0]}:{self._address[1]}"

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def route(self, address: str) -> None:
        parsed = parse_address(address)
        async with self._lock:
            if parsed != self._address:
                await self._disconnect()
                self._address = parsed

    async def send(self, mb: MicroBatch) -> bool:
        """True once sent; False (batch dropped and logged) when no attempt reaches the downstream."""
        async with self._lock:
            error: Exception | None = None
            for attempt in range(SEND_ATTEMPTS):
                if self._address is None:
                    error = ConnectionError("no downstream is routed yet (POST /route)")
                    break
                try:
                    client = self._client or await self._connect(*self._address)
                    await send_microbatch(client, mb)
                    return True
                except FrameError as exc:
                    error = exc  # this batch cannot be encoded; retrying would not help
                    break
                except (OSError, TimeoutError) as exc:
                    error = exc
                    await self._disconnect()
                    if attempt < len(RETRY_DELAYS_S):
                        await asyncio.sleep(RETRY_DELAYS_S[attempt])
            self.dropped += 1
            logger.error(
                "stage %d: dropped batch %d, downstream %s unreachable: %s",
                self._stage_id,
                mb.batch_id,
                self.address,
                error,
            )
            return False

    async def close(self) -> None:
        async with self._lock:
            await self._disconnect()

    async def _connect(self, host: str, port: int) -> FrameClient:
        client = await FrameClient.connect(
            host, port, role="stage", stage_id=self._stage_id, token=self._token, timeout_s=CONNECT_TIMEOUT_S
        )
        self._client = client
        self.connects += 1
        self._watch = asyncio.create_task(self._watch_close(client))
        logger.info("stage %d: connected downstream to %s:%d", self._stage_id, host, port)
        return client

    async def _watch_close(self, client: FrameClient) -> None:
        """A receiver never answers batches, so anything read means it is gone: redial on the next batch.

        Without this the first send after the peer died would vanish into the kernel's buffer.
        """
        try:
            await client.recv()
        except (PeerClosed, OSError) as exc:
            logger.warning(
                "stage %d: downstream %s closed the connection: %s", self._stage_id, self.address, exc
            )
        except Exception as exc:
            logger.warning(
                "stage %d: downstream %s sent something unexpected: %s", self._stage_id, self.address, exc
            )
        if self._client is client:
            self._client = None
            with contextlib.suppress(OSError):
                await client.close()

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
        if client is not None:
            with contextlib.suppress(OSError):
                await client.close()
