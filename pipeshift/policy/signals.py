"""What the decision loop reads each interval, whichever source produced it; None means no data.

The names are those of docs/metrics.md: `pipeshift_ttft_seconds`, `pipeshift_tpot_seconds`
(histograms → p95 over the window), `pipeshift_requests_running`, `pipeshift_requests_queued`
(gauges), `pipeshift_requests_total`, `pipeshift_prompt_tokens_total`,
`pipeshift_generated_tokens_total` (counters → per-second rates).
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Signals:
    ttft_p95: float | None = None  # seconds
    tpot_p95: float | None = None  # seconds
    queued: float | None = None  # requests
    running: float | None = None  # requests
    request_rate: float | None = None  # finished requests/s
    prompt_tokens_rate: float | None = None  # tokens/s
    generated_tokens_rate: float | None = None  # tokens/s

    @property
    def idle(self) -> bool:
        """Known to be idle: nothing running or queued and nothing finishing (missing data is not idle)."""
        return self.running == 0 and self.queued == 0 and not self.request_rate

    @property
    def demand(self) -> bool:
        return bool(self.running or self.queued or self.request_rate)

    def mean_tokens(self, rate: float | None) -> float | None:
        """Tokens per finished request for a token rate, when both are known and positive."""
        if rate and self.request_rate:
            return rate / self.request_rate
        return None


SIGNALS = tuple(f.name for f in fields(Signals))
