"""The direct-scrape metric source: reads a frontend's `/metrics` and derives signals from two scrapes.

Histograms give a p95 over the buckets filled between the previous scrape and this one; counters
give rates over the same window. The first read has no window, so only gauges are known then.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from pipeshift.policy import exposition
from pipeshift.policy.exposition import Sample
from pipeshift.policy.signals import Signals
from pipeshift.policy.source import MetricsUnavailable


@dataclass(frozen=True)
class _Scrape:
    at: float
    samples: list[Sample]


class ScrapeSource:
    def __init__(self, url: str, timeout_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.url, self.timeout_s, self._clock = url, timeout_s, clock
        self._previous: _Scrape | None = None

    def _fetch(self) -> str:
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout_s) as response:
                return response.read().decode("utf-8")
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise MetricsUnavailable(f"cannot scrape {self.url}: {getattr(e, 'reason', e)}") from None

    def read(self) -> Signals:
        text = self._fetch()
        try:
            current = _Scrape(self._clock(), exposition.parse(text))
        except exposition.ExpositionError as e:
            raise MetricsUnavailable(f"{self.url}: {e}") from None
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
                       generated_tokens_rate=rate("pipeshift_generated_tokens_total"), **gauges)
