"""Workloads from a trace window: arrival rate and nearest-rank p95 lengths, checked against numpy."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest

from pipeshift.errors import UserError
from pipeshift.placement import LengthDist, Slo, Workload


def test_a_trace_window_gives_rate_means_and_p95s() -> None:
    rng = random.Random(4)
    trace = sorted((rng.uniform(0, 600), rng.randint(10, 4000), rng.randint(1, 900)) for _ in range(3000))
    window = [r for r in trace if 120 <= r[0] < 420]
    w = Workload.from_trace(trace, start=120, end=420)
    prompts, outputs = np.array([r[1] for r in window]), np.array([r[2] for r in window])
    assert w.rate == pytest.approx(len(window) / 300)
    assert w.prompt.mean == pytest.approx(prompts.mean()) and w.output.mean == pytest.approx(outputs.mean())
    assert w.prompt.p95 == np.percentile(prompts, 95, method="inverted_cdf")
    assert w.output.p95 == np.percentile(outputs, 95, method="inverted_cdf")


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Workload.from_trace([(5.0, 10, 10)], start=10, end=20), "no requests"),
    (lambda: Workload.from_trace([], start=10, end=10), "is empty"),
    (lambda: LengthDist(100, 50), "need 1 <= mean <= p95"),
    (lambda: Workload(-1, LengthDist.fixed(1), LengthDist.fixed(1)), "must be a finite number >= 0"),
    (lambda: Slo(0, 0.1), "SLO targets must be positive"),
])
def test_impossible_workloads_are_rejected_with_the_reason(make: Callable[[], object], message: str) -> None:
    with pytest.raises(UserError, match=message):
        make()
