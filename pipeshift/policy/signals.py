"""What the decision loop reads each interval, whichever source produced it; None means no data.

The names are those of docs/metrics.md: `pipeshift_ttft_seconds`, `pipeshift_tpot_seconds`
(histograms → p95 over the window), `pipeshift_requests_running`, `pipeshift_requests_queued`
(gauges), `pipeshift_requests_total`, `pipeshift_prompt_tokens_total`,
`pipeshift_generated_tokens_total` (counters → per-second rates), and per stage (label `stage`, the
stage id) `pipeshift_stage_step_seconds` / `pipeshift_stage_layers` for the planner's calibration.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Signals:
    ttft_p95: float | None = None  # seconds
    tpot_p95: float | None = None  # seconds
    queued: float | None = None  # requests
    running: float | None = None  # requests
    request_rate: float | None = None  # finished requests/s
    prompt_tokens_rate: float | None = None  # tokens/s
    generated_tokens_rate: float | None = None  # tokens/s
    step_seconds_per_layer: Mapping[str, float] = field(default_factory=dict)  # mean step / layers, by stage

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


SCALARS = ("ttft_p95", "tpot_p95", "queued", "running", "request_rate", "prompt_tokens_rate",
           "generated_tokens_rate")
PER_STAGE = "step_seconds_per_layer"
