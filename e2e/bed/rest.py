"""A small JSON client for the bed's API server, used by the harness itself.

Why not the `kubernetes` client: the process kubelet lists pods several times a second, and plain
dicts over one `requests` session cost far less CPU on a 2-core machine than building typed
models, and every patch says its content type explicitly. Tests and the operator use the real
`kubernetes` client through `Cluster.api()`.
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path
from typing import Any

import requests

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"


def local_session() -> requests.Session:
    """A session that ignores the environment's proxies and CA bundle: the bed is all loopback, and
    REQUESTS_CA_BUNDLE would silently replace a per-session `verify`. Use it for every bed URL."""
    session = requests.Session()
    session.trust_env = False
    return session


def get(url: str, **kwargs: Any) -> requests.Response:
    """`requests.get` through `local_session()`."""
    with local_session() as session:
        return session.get(url, **kwargs)


class ApiError(RuntimeError):
    """A non-2xx answer; `status` is the HTTP code, `reason` the Status reason when there is one."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        self.status = status
        self.reason = ""
        with contextlib.suppress(ValueError, AttributeError):
            self.reason = str(json.loads(body).get("reason", ""))
        super().__init__(f"{method} {path} -> {status}: {body[:500]}")


class Rest:
    """JSON requests against the API server with the admin client certificate.

    One `requests.Session` per thread (sessions are not documented as thread-safe).
    """

    def __init__(self, server: str, ca: Path, cert: Path, key: Path, timeout: float = 10.0) -> None:
        self.server = server.rstrip("/")
        self._verify = str(ca)
        self._cert = (str(cert), str(key))
        self._timeout = timeout
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = local_session()
            session.verify = self._verify
            session.cert = self._cert
            self._local.session = session
        return session

    def request(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
                params: dict[str, str] | None = None, timeout: float | None = None) -> Any:
        data = None if body is None else json.dumps(body)
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        response = self._session().request(method, self.server + path, data=data, headers=headers, params=params,
                                           timeout=timeout or self._timeout)
        if response.status_code >= 300:
            raise ApiError(method, path, response.status_code, response.text)
        return response.json() if response.content else None

    def get(self, path: str, **params: str) -> Any:
        return self.request("GET", path, params=params or None)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body)

    def patch(self, path: str, body: Any, content_type: str = MERGE_PATCH) -> Any:
        return self.request("PATCH", path, body, content_type=content_type)

    def delete(self, path: str, body: Any = None) -> Any:
        return self.request("DELETE", path, body)
