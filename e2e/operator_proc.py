"""The operator as a restartable local process for the live-change scenarios, plus a load generator.

Like `test_pinned_pipeline`, the chart is installed with `helm install` (CRDs, ServiceAccount, RBAC) and
`pipeshift operator` runs beside the bed with that ServiceAccount's token (a process-kubelet pod gets no
in-cluster account). Unlike it, the process can be stopped and started again with other environment
(`PIPESHIFT_OPERATOR_FAULT`), which the restart scenario needs.
"""

from __future__ import annotations

import random
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from e2e.bed import Cluster
from e2e.bed.procs import Managed, wait_until
from e2e.test_pinned_pipeline import installed_chart

BIN = Path(sys.executable).parent


class OperatorProcess:
    """Start, stop and restart `pipeshift operator`; each start gets a new log file."""

    def __init__(self, cluster: Cluster, kubeconfig: Path, work: Path) -> None:
        self.cluster, self.kubeconfig, self.work = cluster, kubeconfig, work
        self.proc: Managed | None = None
        self.metrics_url = ""
        self.starts = 0

    def start(self, extra_env: Mapping[str, str] | None = None, args: tuple[str, ...] = ()) -> OperatorProcess:
        self.starts += 1
        log = self.work / f"operator-{self.starts}.log"
        env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(self.work), "KUBECONFIG": str(self.kubeconfig),
               **(extra_env or {})}
        self.proc = Managed(f"operator-{self.starts}", [str(BIN / "pipeshift"), "operator", "--all-namespaces",
                                                         "--metrics-host", "127.0.0.1", "--metrics-port", "0",
                                                         "--log-level", "debug", "--recheck-seconds", "2", *args],
                            log, env=env)
        found: list[str] = []

        def announced() -> bool:
            found[:] = re.findall(r"metrics on (http://\S+/metrics)", log.read_text())
            return bool(found)

        wait_until(announced, 60, "the operator's first line", watch=[self.proc])
        self.metrics_url = found[0]
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace=15)
            self.proc = None

    def metric(self, name: str, **labels: str) -> float:
        text = requests.get(self.metrics_url, timeout=5).text
        wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
        pattern = rf"^{re.escape(name)}\{{{re.escape(wanted)}\}} (\S+)$" if labels else rf"^{re.escape(name)} (\S+)$"
        match = re.search(pattern, text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def log_text(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.work.glob("operator-*.log")))


@dataclass
class Outcome:
    prompt: int
    started: float
    ended: float
    status: int | None
    tokens: list[int] | None
    error: str | None = None


@dataclass
class LoadGenerator:
    """`workers` threads, each sending one completion at a time (greedy, token ids back) until stopped;
    every request's outcome is recorded client-side, so a lost one cannot hide."""

    url: str
    model: str
    prompts: list[list[int]]
    max_tokens: int = 16
    workers: int = 4
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> LoadGenerator:
        for i in range(self.workers):
            thread = threading.Thread(target=self._run, args=(i,), name=f"load-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        session = requests.Session()
        session.trust_env = False
        while not self._stop.is_set():
            index = rng.randrange(len(self.prompts))
            began = time.time()
            status, tokens, error = None, None, None
            try:
                resp = session.post(f"{self.url}/v1/completions", timeout=180, json={
                    "model": self.model, "prompt": self.prompts[index], "max_tokens": self.max_tokens,
                    "temperature": 0, "return_token_ids": True})
                status = resp.status_code
                if status == 200:
                    tokens = resp.json()["choices"][0]["token_ids"]
                else:
                    error = resp.text[:300]
            except requests.RequestException as exc:
                error = str(exc)
            with self._lock:
                self.outcomes.append(Outcome(index, began, time.time(), status, tokens, error))

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=200)
        with self._lock:
            return list(self.outcomes)

    def served(self) -> int:
        with self._lock:
            return sum(1 for o in self.outcomes if o.status == 200)


def lost(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.status != 200]


def mismatched(outcomes: list[Outcome], expected: list[list[int]]) -> list[Any]:
    return [(o.prompt, o.tokens, expected[o.prompt]) for o in outcomes if o.status == 200
            and o.tokens != expected[o.prompt]]


@contextmanager
def running_operator(cluster: Cluster, helm: Path, work: Path) -> Iterator[OperatorProcess]:
    """The chart installed and `pipeshift operator` started with its token; stopped, then uninstalled."""
    with installed_chart(cluster, helm, work) as kubeconfig:
        proc = OperatorProcess(cluster, kubeconfig, work).start()
        try:
            yield proc
        finally:
            proc.stop()


def settled_committed(status: dict[str, Any]) -> bool:
    """An LLMPipeline status that is Ready with no change under way, its last change committed."""
    last = status.get("lastReconfiguration") or {}
    return status.get("phase") == "Ready" and not status.get("reconfiguration") and last.get("outcome") == "committed"
