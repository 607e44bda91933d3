"""Child processes of the bed: started in their own session with output to a log file, stopped cleanly.

Every daemon of the bed (etcd, kube-*, prometheus) and every pod process goes through `Managed`, so
a failed readiness check can always print what the process said, and stopping never leaves
orphans: SIGTERM to the whole process group, SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


class BedError(RuntimeError):
    """The bed could not be brought up or a wait ran out; the message carries the relevant logs."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel's choice, so parallel beds rarely collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a log file (empty if it does not exist yet)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Managed:
    """One child process with its log; `stop()` is idempotent."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=dict(env) if env is not None else None, cwd=cwd,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Signal the whole process group (a shell wrapper's children too)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL; returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.proc.wait(timeout=10)
        finally:
            # Reap stragglers left in the group after the leader exited.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def describe(self, lines: int = 40) -> str:
        state = "running" if self.running() else f"exited {self.proc.returncode}"
        return f"--- {self.name} ({state}), log {self.log} ---\n{tail(self.log, lines)}"


def wait_until(check: Callable[[], bool], timeout: float, what: str, *, watch: Sequence[Managed] = (),
               interval: float = 0.2) -> None:
    """Poll `check` until it is true; fail early if a watched process died, with its log in the error."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        for proc in watch:
            if not proc.running():
                raise BedError(f"{proc.name} exited while waiting for {what}\n{proc.describe()}")
        try:
            if check():
                return
            last_error = None
        except Exception as exc:  # the thing polled is not up yet
            last_error = exc
        if time.monotonic() > deadline:
            logs = "\n".join(p.describe() for p in watch)
            reason = f" (last error: {last_error})" if last_error else ""
            raise BedError(f"timed out after {timeout:.0f} s waiting for {what}{reason}\n{logs}")
        time.sleep(interval)
