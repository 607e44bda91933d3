"""The load a layout must carry and the latency it must keep: arrival rate, lengths, SLO targets.

Lengths are described by a mean (throughput, KV) and a p95 (the TTFT of a long prompt, KV
reservation for long outputs); a trace window gives both from samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pipeshift.errors import UserError


@dataclass(frozen=True)
class LengthDist:
    mean: float
    p95: float

    def __post_init__(self) -> None:
        if not (self.mean >= 1 and self.p95 >= self.mean and math.isfinite(self.p95)):
            raise UserError(f"token length mean {self.mean} / p95 {self.p95}: need 1 <= mean <= p95")

    @classmethod
    def fixed(cls, tokens: float) -> LengthDist:
        return cls(float(tokens), float(tokens))

    @classmethod
    def from_samples(cls, samples: Sequence[int]) -> LengthDist:
        if not samples:
            raise UserError("a trace window with no requests has no length distribution")
        ordered = sorted(samples)
        p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
        return cls(max(1.0, sum(ordered) / len(ordered)), max(1.0, float(p95)))


@dataclass(frozen=True)
class Workload:
    """`rate` in requests/s; `min_concurrency` raises the KV sizing when requests are seen queuing."""

    rate: float
    prompt: LengthDist
    output: LengthDist
    min_concurrency: float = 0.0

    def __post_init__(self) -> None:
        if not (self.rate >= 0 and math.isfinite(self.rate)):
            raise UserError(f"arrival rate {self.rate} req/s: must be a finite number >= 0")
        if self.min_concurrency < 0:
            raise UserError(f"min_concurrency {self.min_concurrency}: must be >= 0")

    @classmethod
    def from_trace(cls, records: Iterable[tuple[float, int, int]], start: float, end: float) -> Workload:
        """`records` are (arrival time s, prompt tokens, output tokens); only arrivals in [start, end) count."""
        if end <= start:
            raise UserError(f"trace window [{start}, {end}) is empty; end must be after start")
        window = [(p, o) for t, p, o in records if start <= t < end]
        return cls(rate=len(window) / (end - start), prompt=LengthDist.from_samples([p for p, _ in window]),
                   output=LengthDist.from_samples([o for _, o in window]))


@dataclass(frozen=True)
class Slo:
    ttft_p95_s: float
    tpot_p95_s: float

    def __post_init__(self) -> None:
        if not (self.ttft_p95_s > 0 and self.tpot_p95_s > 0):
            raise UserError(f"SLO targets must be positive: TTFT {self.ttft_p95_s} s, TPOT {self.tpot_p95_s} s")

    def scaled(self, factor: float) -> Slo:
        return Slo(self.ttft_p95_s * factor, self.tpot_p95_s * factor)
