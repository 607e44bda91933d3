"""The direct-scrape metric source: reads a frontend's `/metrics` and derives signals from two scrapes.

Histograms give a p95 over the buckets filled between the previous scrape and this one; counters
give rates over the same window. The first read has no window, so only gauges are known then.
Agents' `/metrics` (optional) add each stage's mean step time per layer over the same window.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipeshift.policy import exposition
from pipeshift.policy.exposition import Sample
from pipeshift.policy.signals import Signals
from pipeshift.policy.source import MetricsUnavailable


@dataclass(frozen=True)
class _Scrape:
    at: float
    samples: list[Sample]


def _per_stage(samples: list[Sample], name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in samples:
        if s.name == name and "stage" in s.labels:
            out[s.labels["stage"]] = out.get(s.labels["stage"], 0.0) + s.value
    return out


class ScrapeSource:
    def __init__(self, url: str, stage_urls: Sequence[str] = (), timeout_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.urls = (url, *stage_urls)
        self.timeout_s, self._clock = timeout_s, clock
        self._previous: _Scrape | None = None

    def _fetch(self, url: str) -> list[Sample]:
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
                text = response.read().decode("utf-8")
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise MetricsUnavailable(f"cannot scrape {url}: {getattr(e, 'reason', e)}") from None
        try:
            return exposition.parse(text)
        except exposition.ExpositionError as e:
            raise MetricsUnavailable(f"{url}: {e}") from None

    def read(self) -> Signals:
        current = _Scrape(self._clock(), [s for url in self.urls for s in self._fetch(url)])
        previous, self._previous = self._previous, current
        gauges = {"queued": exposition.total(current.samples, "pipeshift_requests_queued"),
                  "running": exposition.total(current.samples, "pipeshift_requests_running")}
        if previous is None or current.at <= previous.at:
            return Signals(**gauges)
        elapsed = current.at - previous.at

        def p95(histogram: str) -> float | None:
            window = exposition.delta(exposition.buckets(current.samples, histogram),
                                      exposition.buckets(previous.samples, histogram))
            return exposition.quantile(0.95, window)

        def rate(counter: str) -> float | None:
            now = exposition.total(current.samples, counter)
            before = exposition.total(previous.samples, counter)
            if now is None:
                return None
            increase = now if before is None or now < before else now - before
            return increase / elapsed

        return Signals(ttft_p95=p95("pipeshift_ttft_seconds"), tpot_p95=p95("pipeshift_tpot_seconds"),
                       request_rate=rate("pipeshift_requests_total"),
                       prompt_tokens_rate=rate("pipeshift_prompt_tokens_total"),
                       generated_tokens_rate=rate("pipeshift_generated_tokens_total"),
                       step_seconds_per_layer=self._step_per_layer(current, previous), **gauges)

    @staticmethod
    def _step_per_layer(current: _Scrape, previous: _Scrape) -> dict[str, float]:
        """Mean step time per layer of each stage over the window (stages that stepped and hold layers)."""
        sums = [_per_stage(x.samples, "pipeshift_stage_step_seconds_sum") for x in (current, previous)]
        counts = [_per_stage(x.samples, "pipeshift_stage_step_seconds_count") for x in (current, previous)]
        layers = _per_stage(current.samples, "pipeshift_stage_layers")
        out = {}
        for stage, count in counts[0].items():
            steps = count - counts[1].get(stage, 0.0)
            seconds = sums[0].get(stage, 0.0) - sums[1].get(stage, 0.0)
            if steps < 0 or seconds < 0:  # the agent restarted: its counters count from zero
                steps, seconds = count, sums[0].get(stage, 0.0)
            if steps > 0 and layers.get(stage, 0) > 0:
                out[stage] = seconds / steps / layers[stage]
        return out
