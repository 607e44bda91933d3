"""A parser for the Prometheus text exposition format and the quantile of a histogram's buckets.

Written here rather than taken from `prometheus_client` so the operator image (which has no
runtime dependencies) can scrape a frontend directly. Quantiles follow PromQL's
`histogram_quantile`: linear interpolation inside the bucket that holds the rank.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})?\s+(\S+)(?:\s+(-?\d+))?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


class ExpositionError(ValueError):
    """Text that is not Prometheus exposition format; the message quotes the line."""


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


def _labels(text: str, line: str) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        if m is None:
            raise ExpositionError(f"bad label set in line {line!r}")
        out[m.group(1)] = re.sub(r"\\[\\\"n]", lambda e: _UNESCAPE[e.group(0)], m.group(2))
        pos = m.end()
    return out


def _value(text: str, line: str) -> float:
    try:
        return float(text)  # accepts +Inf, -Inf and NaN as Prometheus writes them
    except ValueError:
        raise ExpositionError(f"bad sample value {text!r} in line {line!r}") from None


def parse(text: str) -> list[Sample]:
    samples = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            raise ExpositionError(f"not a sample line: {line!r}")
        samples.append(Sample(m.group(1), _labels(m.group(2) or "", line), _value(m.group(3), line)))
    return samples


def total(samples: Iterable[Sample], name: str) -> float | None:
    """The sum over every label set of `name`, or None when the metric is absent."""
    values = [s.value for s in samples if s.name == name]
    return math.fsum(values) if values else None


def buckets(samples: Iterable[Sample], histogram: str) -> dict[float, float]:
    """Cumulative bucket counts by upper bound, summed over every other label (PromQL's `sum by (le)`)."""
    out: dict[float, float] = {}
    for s in samples:
        if s.name == f"{histogram}_bucket" and "le" in s.labels:
            le = _value(s.labels["le"], f"le={s.labels['le']}")
            out[le] = out.get(le, 0.0) + s.value
    return out


def quantile(q: float, cumulative: Mapping[float, float]) -> float | None:
    """`histogram_quantile(q, ...)` over cumulative bucket counts; None without observations."""
    bounds = sorted(cumulative)
    if not bounds or bounds[-1] != math.inf:
        return None
    count = cumulative[math.inf]
    if count <= 0:
        return None
    rank = q * count
    prev_bound, prev_count = 0.0, 0.0
    for bound in bounds:
        c = cumulative[bound]
        if c >= rank:
            if bound == math.inf:
                return prev_bound  # the rank is beyond the last finite bucket: its bound is all we know
            if c == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (c - prev_count)
        prev_bound, prev_count = bound, c
    return prev_bound


def delta(now: Mapping[float, float], before: Mapping[float, float]) -> dict[float, float]:
    """Bucket counts observed between two scrapes; a counter reset (a restart) counts from zero."""
    if any(now.get(b, 0.0) < c for b, c in before.items()):
        return dict(now)
    return {b: c - before.get(b, 0.0) for b, c in now.items()}
