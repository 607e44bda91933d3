"""Starts a layout's stage agents as local OS processes on free ports, chains them, and stops them.

Readiness is observed, never assumed: each agent reports its ports on stdout, then `/health` answers.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

from pipeshift.api import Layout, StagePlan
from pipeshift.errors import UserError
from pipeshift.runtime.security import TOKEN_ENV, load_control_token

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 10.0
_POLL_S = 0.02
_LOG_TAIL_BYTES = 4000


@dataclass(frozen=True)
class AgentHandle:
    """Where one running agent listens."""

    stage_id: int
    start: int
    end: int
    host: str
    control_port: int
    data_port: int
    pid: int

    @property
    def control_url(self) -> str:
        return f"http://{self.host}:{self.control_port}"

    @property
    def data_address(self) -> str:
        return f"{self.host}:{self.data_port}"


class LocalAgents:
    """The running agents of one layout; a context manager that stops them on exit.

    `route(return_to)` chains agent i to agent i + 1 and the last one to `return_to` (the frontend's
    return server). Stopping sends SIGTERM, waits, then kills; it also runs at interpreter exit.
    """

    def __init__(
        self,
        agents: Sequence[AgentHandle],
        processes: Sequence[subprocess.Popen[bytes]],
        logs: Sequence[Path],
        token: str | None,
    ) -> None:
        self.agents = tuple(agents)
        self._processes = {a.stage_id: p for a, p in zip(agents, processes, strict=True)}
        self.logs = {a.stage_id: log for a, log in zip(agents, logs, strict=True)}
        self._token = token
        self._stopped = False
        atexit.register(self.stop)

    def process(self, stage_id: int) -> subprocess.Popen[bytes]:
        """The OS process of a stage (tests kill one to check how the rest copes)."""
        return self._processes[stage_id]

    def route(self, return_to: str) -> None:
        hops = [a.data_address for a in self.agents[1:]] + [return_to]
        for agent, downstream in zip(self.agents, hops, strict=True):
            self.control(agent, "POST", "/route", {"request_id": uuid.uuid4().hex, "downstream": downstream})

    def control(
        self, agent: AgentHandle, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """One control call with this launcher's token; a non-2xx answer raises UserError with its message."""
        status, answer = http_json(agent.control_url + path, method, body, self._token)
        if not 200 <= status < 300:
            raise UserError(
                f"stage {agent.stage_id} {method} {path}: HTTP {status}: {answer.get('error', answer)}"
            )
        return answer

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        stop_processes(list(self._processes.values()), timeout_s)

    def __enter__(self) -> LocalAgents:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def http_json(
    url: str,
    method: str = "GET",
    body: Mapping[str, Any] | None = None,
    token: str | None = None,
    timeout_s: float = HTTP_TIMEOUT_S,
) -> tuple[int, dict[str, Any]]:
    """Status and JSON answer of one HTTP call (error statuses are answers too, not exceptions)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        with error:
            text = error.read()
        try:
            return error.code, json.loads(text)
        except ValueError:
            return error.code, {"error": text.decode(errors="replace")}


def default_threads(processes: int) -> int:
    """The cores this process may use, shared evenly, so that stages on one host do not oversubscribe it."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, processes))


def start_agents(
    model: str | Path,
    layout: Layout | str | Sequence[StagePlan],
    *,
    host: str = "127.0.0.1",
    return_to: str | None = None,
    kv_bytes: int | None = None,
    memory_bytes: int | None = None,
    block_size: int | None = None,
    dtype: str | None = None,
    threads: int | None = None,
    max_batch_tokens: int | None = None,
    warm: bool = False,
    token: str | None = None,
    env: Mapping[str, str] | None = None,
    log_dir: str | Path | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> LocalAgents:
    """Launches one `pipeshift agent` per stage and returns once every one answers `/health`.

    `layout` may also be some stages of a layout only (a stage that joins a running pipeline).
    `threads` defaults to the cores divided among the agents plus one frontend. `token` is passed to
    the agents as PIPESHIFT_CONTROL_TOKEN (default: the one configured in this process, if any). With
    `return_to`, the chain is routed too. Stage logs go to `log_dir` (default: a temporary directory),
    and a stage that dies while starting raises UserError with the tail of its log. SIGTERM to this
    process stops the agents too (see `exit_on_sigterm`). `memory_bytes` (each stage's memory for weights and
    KV together) replaces `kv_bytes`: a stage's pool is then what its weights leave. `warm`: the stages touch
    their read workspaces at start (`pipeshift agent --warm`), for stages that join a running pipeline.
    """
    if kv_bytes is not None and memory_bytes is not None:
        raise UserError("give kv_bytes (--kv-bytes) or memory_bytes (--memory-bytes), not both")
    stages = Layout.parse(layout).stages if isinstance(layout, str) else tuple(layout)
    exit_on_sigterm()
    token = token if token is not None else load_control_token()
    child_env = dict(os.environ if env is None else env)
    if token is not None:
        child_env[TOKEN_ENV] = token
        child_env.pop("PIPESHIFT_CONTROL_TOKEN_FILE", None)
    logs_at = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="pipeshift-agents-"))
    logs_at.mkdir(parents=True, exist_ok=True)
    options = {
        "--host": host,
        "--kv-bytes": kv_bytes,
        "--memory-bytes": memory_bytes,
        "--block-size": block_size,
        "--dtype": dtype,
        "--threads": threads or default_threads(len(stages) + 1),
        "--max-batch-tokens": max_batch_tokens,
        "--warm": 1 if warm else None,
    }
    processes: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        for stage in stages:
            argv = [
                sys.executable,
                "-m",
                "pipeshift.cli",
                "agent",
                "--model",
                str(model),
                "--layers",
                f"{stage.start}:{stage.end}",
                "--stage-id",
                str(stage.stage_id),
                "--data-port",
                "0",
                "--control-port",
                "0",
            ]
            argv += [str(v) for flag, value in options.items() if value is not None for v in (flag, value)]
            log = logs_at / f"stage-{stage.stage_id}.log"
            with log.open("wb") as stderr:
                processes.append(
                    subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, env=child_env
                    )
                )
            logs.append(log)
        deadline = time.monotonic() + ready_timeout_s
        handles = []
        for stage, process, log in zip(stages, processes, logs, strict=True):
            ports = _read_ports(process, log, deadline)
            handles.append(
                AgentHandle(
                    stage.stage_id,
                    stage.start,
                    stage.end,
                    host,
                    ports["control_port"],
                    ports["data_port"],
                    process.pid,
                )
            )
        for handle, process, log in zip(handles, processes, logs, strict=True):
            _wait_healthy(handle, process, log, deadline)
    except BaseException:
        stop_processes(processes, STOP_TIMEOUT_S)
        raise
    agents = LocalAgents(handles, processes, logs, token)
    if return_to is not None:
        try:
            agents.route(return_to)
        except BaseException:
            agents.stop()
            raise
    return agents


def _log_tail(log: Path) -> str:
    with contextlib.suppress(OSError):
        text = log.read_bytes()[-_LOG_TAIL_BYTES:].decode(errors="replace").strip()
        return text.splitlines()[-1] if text else "(no output)"
    return "(no log)"


def _died(process: subprocess.Popen[bytes], log: Path) -> UserError:
    return UserError(
        f"agent process {process.pid} exited with code {process.returncode} while starting "
        f"(log {log}): {_log_tail(log)}"
    )


def _read_ports(process: subprocess.Popen[bytes], log: Path, deadline: float) -> dict[str, int]:
    """The agent's one JSON line, read without blocking past the deadline."""
    stdout: IO[bytes] = process.stdout  # type: ignore[assignment]
    line = b""
    with selectors.DefaultSelector() as selector:
        selector.register(stdout, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UserError(f"agent process {process.pid} did not report its ports in time (log {log})")
            if not selector.select(min(remaining, 0.5)):
                continue
            chunk = os.read(stdout.fileno(), 4096)
            if not chunk:
                process.wait(timeout=STOP_TIMEOUT_S)
                raise _died(process, log)
            line += chunk
    try:
        ports = json.loads(line)
        return {"control_port": int(ports["control_port"]), "data_port": int(ports["data_port"])}
    except (ValueError, KeyError, TypeError):
        raise UserError(
            f"agent process {process.pid} printed {line[:200]!r}, not its ports as JSON"
        ) from None


def _wait_healthy(agent: AgentHandle, process: subprocess.Popen[bytes], log: Path, deadline: float) -> None:
    while True:
        if process.poll() is not None:
            raise _died(process, log)
        with contextlib.suppress(OSError):
            status, _ = http_json(agent.control_url + "/health", timeout_s=1.0)
            if status == 200:
                return
        if time.monotonic() > deadline:
            raise UserError(
                f"stage {agent.stage_id} at {agent.control_url} is not healthy in time (log {log})"
            )
        time.sleep(_POLL_S)


def stop_processes(processes: Sequence[subprocess.Popen[bytes]], timeout_s: float) -> None:
    """SIGTERM all, wait together up to `timeout_s`, then SIGKILL whatever is left."""
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("agent process %d ignored SIGTERM for %ss; killing it", process.pid, timeout_s)
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def exit_on_sigterm() -> None:
    """Turns SIGTERM into a normal exit in this process, so `atexit` stops the agents it started.

    Only when SIGTERM still has its default action and this is the main thread: an application that
    handles SIGTERM itself (an asyncio server) keeps its handler and stops the agents there.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_exit)


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)
