"""A frontend on its own event loop in a daemon thread, for synchronous callers (CLI, benchmarks, tests).

The frontend's loop never shares a thread with the caller's, so a caller blocking on HTTP does not
stall batching, and a caller running its own asyncio client measures real end-to-end latency.
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

from pipeshift.runtime.frontend.config import FrontendConfig
from pipeshift.runtime.frontend.server import Frontend, start_frontend

START_TIMEOUT_S = 60.0


class BackgroundFrontend:
    def __init__(self, config: FrontendConfig) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pipeshift-frontend", daemon=True)
        self._thread.start()
        try:
            self.frontend: Frontend = asyncio.run_coroutine_threadsafe(
                start_frontend(config), self._loop
            ).result(START_TIMEOUT_S)
        except BaseException:
            self._shutdown()
            raise

    @property
    def url(self) -> str:
        return self.frontend.url

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.frontend.stop(), self._loop).result(START_TIMEOUT_S)
            self._shutdown()

    def _shutdown(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(START_TIMEOUT_S)
        self._loop.close()

    def __enter__(self) -> BackgroundFrontend:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
