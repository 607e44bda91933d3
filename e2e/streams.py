"""Client side of the lifecycle scenarios (stage restore, scale to zero): greedy requests streamed from
threads and counted, a watcher that records every phase an LLMPipeline passes through, and the in-process
engine's reference tokens."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import torch


@dataclass
class Outcome:
    """One request as the client saw it: HTTP status, token ids, an error event if any, when it ended."""

    status: int = 0
    tokens: list[int] = field(default_factory=list)
    error: str | None = None
    first_token_at: float | None = None
    ended_at: float | None = None


def stream(url: str, model: str, prompt: list[int], max_tokens: int, out: Outcome) -> None:
    """A streaming greedy completion, ignoring EOS so its length is known; fills `out`."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    session = requests.Session()
    session.trust_env = False  # pod IPs: never through a proxy from the environment
    try:
        with session.post(f"{url}/v1/completions", json=body, stream=True, timeout=600) as resp:
            out.status = resp.status_code
            if resp.status_code != 200:
                out.error = resp.text
                return
            for raw in resp.iter_lines():
                line = raw.decode()
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    out.error = json.dumps(event["error"])
                    return
                ids = event["choices"][0].get("token_ids") or []
                if ids and out.first_token_at is None:
                    out.first_token_at = time.monotonic()
                out.tokens += ids
    except requests.RequestException as e:
        out.error = repr(e)
    finally:
        out.ended_at = time.monotonic()


def start_streams(url: str, model: str, prompts: list[list[int]],
                  max_tokens: int) -> tuple[list[Outcome], list[threading.Thread]]:
    outcomes = [Outcome() for _ in prompts]
    threads = [threading.Thread(target=stream, args=(url, model, p, max_tokens, o), daemon=True)
               for p, o in zip(prompts, outcomes, strict=True)]
    for t in threads:
        t.start()
    return outcomes, threads


class PhaseWatch:
    """Polls an LLMPipeline's status.phase in a thread and keeps each change, in order."""

    def __init__(self, read: Callable[[], dict[str, Any]], interval_s: float = 0.2) -> None:
        self.phases: list[str] = []
        self._read, self._interval = read, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._observe()
            self._stop.wait(self._interval)

    def _observe(self) -> None:
        try:
            phase = str((self._read().get("status") or {}).get("phase"))
        except Exception:  # a transient API error: look again
            phase = ""
        if phase and (not self.phases or self.phases[-1] != phase):
            self.phases.append(phase)

    def stop(self) -> list[str]:
        """The phases seen, ending with the phase at the time of the call (a last look after the thread ends,
        so a phase the caller has just waited for is never missed between two polls)."""
        self._stop.set()
        self._thread.join(10)
        self._observe()
        return self.phases


def reference(model: Path, layout: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy tokens of the in-process engine (float64, no stop ids: the requests ignore EOS)."""
    from pipeshift.api import Layout
    from pipeshift.runtime.model.checkpoint import ModelDir
    from pipeshift.runtime.pipeline import Pipeline

    engine = Pipeline(ModelDir(model), Layout.parse(layout), dtype=torch.float64)
    return [engine.generate([p], max_tokens)[0] for p in prompts]


def metric_value(metrics_url: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text page (0 when absent); a series without labels has no braces."""
    session = requests.Session()
    session.trust_env = False
    text = session.get(metrics_url, timeout=5).text
    wanted = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    for line in text.splitlines():
        if line.startswith(f"{name}{wanted} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
