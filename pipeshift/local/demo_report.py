"""What `pipeshift demo` reports, from what the clients saw and what the agents counted (nothing from a profile).

- `requests_spanning_switch`: requests with a token before serving was held (or the frontend armed the new
  epoch) and another after it resumed, on the clients' clock.
- `pause_ms`: the largest token gap any request saw in the change's window minus the steady-state p99 gap
  (the same workload on the old layout, without a change).
- `weights_bytes_moved`: weight bytes the targets loaded from their checkpoint or received from a source for
  the change, summed from the agents' `/stats` (a stage the change started counts everything it loaded).
- `tokens_recomputed`: the agents' (position, layer) counters against what the requests needed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pipeshift.api import ReconfigPlan
from pipeshift.control import ReconfigReport
from pipeshift.control.counters import stage_layer_tokens, tokens_recomputed
from pipeshift.local.live import LivePipeline
from pipeshift.local.loadgen import PlannedRequest, StreamResult, percentile
from pipeshift.local.neartie import Comparison
from pipeshift.local.plot import token_gaps
from pipeshift.local.processes import http_json


def latency(results: Iterable[StreamResult]) -> dict[str, float | None]:
    results = list(results)
    ttft = [r.token_times[0] - r.sent for r in results if r.token_times]
    tpot = [(r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1)
            for r in results if len(r.token_times) > 1]

    def ms(values: list[float], q: float) -> float | None:
        if not values:
            return None
        return 1e3 * (statistics.median(values) if q == 0.5 else percentile(values, q))

    return {"ttft_p50_ms": ms(ttft, 0.5), "ttft_p95_ms": ms(ttft, 0.95),
            "tpot_p50_ms": ms(tpot, 0.5), "tpot_p95_ms": ms(tpot, 0.95)}


def gaps(result: StreamResult) -> list[tuple[float, float]]:
    """(token time, gap in s) of every token after the first, on the perf_counter clock; tokens that arrived in
    one chunk with the previous one (gap 0) are not gaps."""
    return [(t, ms / 1e3) for t, ms in token_gaps(result.sent, result.token_times, 0.0)[1:] if ms > 0]


def spanning(results: Sequence[StreamResult], report: ReconfigReport | None, clock_offset: float) -> list[int]:
    """Indices of requests that streamed a token before the switch began and one after it ended;
    `clock_offset` = time.time() − time.perf_counter() (the report's times are wall-clock)."""
    if report is None or report.held_unix is None or report.resumed_unix is None:
        return []
    held, resumed = report.held_unix - clock_offset, report.resumed_unix - clock_offset
    return [i for i, r in enumerate(results) if r.token_times and r.token_times[0] < held
            and r.token_times[-1] > resumed]


def clock_offset() -> float:
    return time.time() - time.perf_counter()


def weights_moved(current: Mapping[int, Mapping[str, Any]], departed: Mapping[int, Mapping[str, Any]],
                  fresh: Iterable[int]) -> tuple[int, int]:
    """(bytes moved, of which received from sources): what each agent took in since the change began. Stages in
    `fresh` (started for the change) count all they loaded; the others what they loaded beyond start-up."""
    fresh = set(fresh)
    moved = received = 0
    for sid, stats in current.items():
        moved += int(stats["weights_bytes_loaded"]) + int(stats["weights_bytes_received"])
        moved -= 0 if sid in fresh else int(stats["weights_bytes_initial"])
        received += int(stats["weights_bytes_received"])
    for stats in departed.values():
        moved += int(stats["weights_bytes_loaded"]) + int(stats["weights_bytes_received"])
        moved -= int(stats["weights_bytes_initial"])
        received += int(stats["weights_bytes_received"])
    return moved, received


def agent_stats(pipeline: LivePipeline, token: str | None) -> dict[int, dict[str, Any]]:
    answers = {sid: http_json(url + "/stats", token=token) for sid, url in pipeline.urls.items()}
    bad = {sid: answer for sid, (status, answer) in answers.items() if status != 200}
    if bad:
        raise RuntimeError(f"/stats failed on stages {sorted(bad)}: {bad}")
    return {sid: answer for sid, (_, answer) in answers.items()}


def fresh_stages(plan: ReconfigPlan, strategy: str) -> list[int]:
    """The stages whose processes the change started: every new one on a restart, else the added ones."""
    return [s.stage_id for s in plan.new] if strategy == "restart" else list(plan.added)


def recomputed_layer_tokens(pipeline: LivePipeline, report: ReconfigReport | None, planned: list[PlannedRequest],
                            results: list[StreamResult], token: str | None) -> int:
    """The agents' own (position, layer) counters against what every request served on these agents needed
    (`results`: the reference run and the live run, or the live run alone, each in `planned` order); stages
    that left were read before they stopped."""
    counted = list(stage_layer_tokens(pipeline.urls.values(), token).values())
    if report is not None:
        counted += [int(stats["layer_tokens_computed"]) for stats in report.departed_stats.values()]
    runs = len(results) // len(planned)
    served = [(len(p.prompt), len(r.tokens)) for p, r in zip(planned * runs, results, strict=True)]
    return tokens_recomputed(counted, served, pipeline.layout.num_layers)


def measure(args: argparse.Namespace, reference: list[StreamResult], live: list[StreamResult],
            report: ReconfigReport | None, start: float, end: float, across: list[int],
            comparison: Comparison) -> dict[str, Any]:
    window = [r for r in live if r.sent <= end and r.ended >= start]
    steady_gaps = [g for r in reference for _, g in gaps(r)]
    window_gaps = [g for r in window for t, g in gaps(r) if t >= start and t - g <= end]
    p99 = percentile(steady_gaps, 0.99) if steady_gaps else 0.0
    ok = [r for r in live if r.finish in ("stop", "length")]
    return {
        "strategy": args.strategy, "switch": report.switch if report is not None else args.switch,
        "from": args.old, "to": args.new, "weights": args.weights, "dtype": args.dtype,
        "outcome": report.outcome if report is not None else "not started",
        "error": report.error if report is not None else None,
        "requests": len(live), "requests_completed": len(ok), "requests_lost": len(live) - len(ok),
        "requests_spanning_switch": len(across),
        "outputs_match_reference": comparison.matches, "divergences": comparison.divergences,
        "near_tie_divergences": comparison.near_ties,
        "pause_ms": max(0.0, (max(window_gaps, default=0.0) - p99) * 1e3),
        "controller_pause_ms": report.pause_ms if report is not None else 0.0,
        "switch_duration_ms": report.switch_duration_ms if report is not None else 0.0,
        "fence_wait_ms_max": report.fence_wait_ms_max if report is not None else 0.0,
        "precopy_rounds": report.precopy_rounds if report is not None else 0,
        "kv_bytes_moved": report.kv_bytes_moved if report is not None else 0,
        "phases_ms": dict(report.phases_ms) if report is not None else {},
        "steady": latency(reference), "switch_window": latency(live[i] for i in across),
    }


def table(result: dict[str, Any]) -> str:
    rows: list[tuple[str, Any]] = [(k, v) for k, v in result.items() if not isinstance(v, dict)]
    for part in ("steady", "switch_window"):
        rows += [(f"{part} {k}", "-" if v is None else f"{v:.1f}") for k, v in result[part].items()]
    rows += [(f"phase {k}", f"{v:.1f} ms") for k, v in result.get("phases_ms", {}).items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {f'{v:.1f}' if isinstance(v, float) else v}" for k, v in rows)
