"""A small JSON-over-HTTP client for the control APIs: bearer token, timeouts, and retries that are safe
because every state-changing call carries a request id the server deduplicates.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_TIMEOUT_S = 30.0
# Retries only for answers that never came because the connection failed (refused, reset); an HTTP error is
# an answer, and a timeout spent the caller's budget for the call: the caller decides (abort, or retry after
# the commit point).
RETRY_DELAYS_S = (0.05, 0.2)


class ControlCallError(RuntimeError):
    """A control call failed: `status` is the HTTP status, or None when no answer came (`timed_out`: none
    within the timeout); `name` says whose API it was (e.g. "stage 2"), for reports that name the culprit."""

    def __init__(self, method: str, url: str, status: int | None, message: str, name: str | None = None,
                 timed_out: bool = False) -> None:
        self.method, self.url, self.status, self.message = method, url, status, message
        self.name, self.timed_out = name, timed_out
        answered = f"answered {status}" if status is not None else "got no answer"
        super().__init__(f"{name + ': ' if name else ''}{method} {url} {answered}: {message}")


class ControlClient:
    """One control API at `base_url` (`http://host:port`); `name` (e.g. "stage 2") prefixes its errors."""

    def __init__(self, base_url: str, token: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 name: str | None = None) -> None:
        if not base_url.startswith(("http://", "https://")):
            base_url = f"http://{base_url}"
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.name = name

    @property
    def address(self) -> str:
        """`host:port`, the form the frontend and agents use for each other."""
        return self.base_url.split("://", 1)[1]

    def get(self, path: str, timeout_s: float | None = None) -> dict[str, Any]:
        return self._call("GET", path, None, timeout_s)

    def post(self, path: str, body: Mapping[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        if "request_id" not in body:
            raise ValueError(f"POST {path}: the body needs a request_id so that a retry cannot act twice")
        return self._call("POST", path, body, timeout_s)

    def _call(
        self, method: str, path: str, body: Mapping[str, Any] | None, timeout_s: float | None
    ) -> dict[str, Any]:
        url = self.base_url + path
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(len(RETRY_DELAYS_S) + 1):
            request = urllib.request.Request(url, data=data, method=method)
            if data is not None:
                request.add_header("Content-Type", "application/json")
            if self.token is not None:
                request.add_header("Authorization", f"Bearer {self.token}")
            limit = timeout_s or self.timeout_s
            try:
                with urllib.request.urlopen(request, timeout=limit) as response:
                    return _json(response.read())
            except urllib.error.HTTPError as error:
                with error:
                    answer = _json(error.read())
                raise ControlCallError(method, url, error.code, str(answer.get("error", answer)), self.name) from None
            except (urllib.error.URLError, OSError) as error:
                reason = getattr(error, "reason", error)
                if isinstance(reason, TimeoutError):
                    raise ControlCallError(method, url, None, f"timed out after {limit:g}s", self.name,
                                           timed_out=True) from None
                if attempt == len(RETRY_DELAYS_S):
                    raise ControlCallError(method, url, None, str(reason), self.name) from None
                logger.warning("%s %s: %s; retrying", method, url, reason)
                time.sleep(RETRY_DELAYS_S[attempt])
        raise AssertionError("unreachable")


def _json(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw or b"{}")
    except ValueError:
        return {"error": raw[:500].decode(errors="replace")}
    return value if isinstance(value, dict) else {"error": f"expected a JSON object, got {value!r}"}


def call_all(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """`fn` over `items` at once (one call per stage); the first error in item order is raised once every
    call has ended, so the caller never acts while some call is still running."""
    with ThreadPoolExecutor(max_workers=max(1, len(items))) as pool:
        futures = [pool.submit(fn, item) for item in items]
        errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
    return [f.result() for f in futures]
