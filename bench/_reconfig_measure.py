"""What one benchmark run's client records and controller report say, reduced to the benchmark's figures.

Every time is a Unix time. A request record (see `_reconfig_client`) has `sent`, `token_times`, `prompt_tokens`,
`tokens`, `finish`. Definitions, applied alike to every strategy:

- steady window: from `settle_s` after the last long request's first token to the switch start; switch
  window: from the call of `reconfigure` to its return.
- decode gap: the time between two consecutive tokens of one request (the first token's wait is TTFT, not a
  gap). A gap belongs to a window when the two overlap.
- TTFT of a window: probes *sent* in it, first token − sent. TPOT of a window: its decode gaps.
- `*_p95_overhead`: p95 in the switch window ÷ p95 in the steady window − 1 (0.05 = 5 % slower).
  `protocol_*_p95_overhead`: the same from the end of the controller's `starting` phase (an added stage's
  process start, which on a small host slows serving by CPU contention alone) to the switch's end.
- `pause_ms`: the longest decode gap overlapping the switch's critical interval, minus the steady p99 gap
  (never below 0). The critical interval is the controller's hold → resume (`held_unix`, `resumed_unix`)
  when the report has both, else the whole switch window. `pause_window_ms` is the same over the whole
  window (the demo's definition), which also catches stalls outside the hold, e.g. from CPU contention.
- `live_kv_bytes`: a lower bound computed from the client side alone: every request that received tokens
  before the critical interval and after it was live across it, holding KV for its prompt and all but the
  last token seen before it, in whole blocks, on each moved layer.
- `copy_bytes_per_s`: bytes of every copy round ÷ wall time of the phases those rounds run in (`precopying`
  and `final_copy` of the controller's phase clock), so control-call latency between rounds counts against it.
  `bulk_round_bytes_per_s`: the first round alone, its bytes ÷ its seconds summed over source→target pairs.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from pipeshift.local.loadgen import percentile

Record = dict[str, Any]
COPY_PHASES = ("precopying", "final_copy")


def decode_gaps(record: Record) -> list[tuple[float, float]]:
    """(start, end) of each gap between consecutive tokens of one request."""
    return list(itertools.pairwise(record["token_times"]))


def gaps_in(records: Iterable[Record], lo: float, hi: float) -> list[float]:
    return [b - a for r in records for a, b in decode_gaps(r) if b >= lo and a <= hi]


def ttfts_sent_in(records: Iterable[Record], lo: float, hi: float, kind: str = "probe") -> list[float]:
    return [r["token_times"][0] - r["sent"] for r in records
            if r["kind"] == kind and r["token_times"] and lo <= r["sent"] <= hi]


def p(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.median(values) if q == 0.5 else percentile(list(values), q)


def overhead(window: float | None, steady: float | None) -> float | None:
    if window is None or steady is None or steady <= 0:
        return None
    return window / steady - 1.0


def live_kv_bytes(records: Iterable[Record], lo: float, hi: float, *, block_size: int, block_bytes: int,
                  moved_layers: int) -> int:
    total = 0
    for r in records:
        times = r["token_times"]
        before = sum(1 for t in times if t < lo)
        if before and times[-1] > hi:
            total += math.ceil((r["prompt_tokens"] + before - 1) / block_size) * block_bytes * moved_layers
    return total


def copy_rate(report: dict[str, Any]) -> float | None:
    moved = sum(int(r["bytes"]) for r in report.get("rounds", []))
    seconds = sum(report.get("phases_ms", {}).get(name, 0.0) for name in COPY_PHASES) / 1e3
    return moved / seconds if moved and seconds > 0 else None


def bulk_rate(report: dict[str, Any]) -> float | None:
    """The first copy round's bytes ÷ its seconds summed over pairs (pairs run at once: a lower bound)."""
    rounds = report.get("rounds", [])
    if not rounds or not rounds[0]["bytes"] or rounds[0]["seconds"] <= 0:
        return None
    return float(rounds[0]["bytes"]) / float(rounds[0]["seconds"])


def measure(records: list[Record], report: dict[str, Any], *, steady: tuple[float, float],
            switch: tuple[float, float], block_size: int, block_bytes: int, moved_layers: int) -> dict[str, Any]:
    """The figures of one run (see the module docstring for every definition)."""
    held, resumed = report.get("held_unix"), report.get("resumed_unix")
    critical = (held, resumed) if held is not None and resumed is not None else switch
    steady_gaps = gaps_in(records, *steady)
    window_gaps = gaps_in(records, *switch)
    critical_gaps = gaps_in(records, *critical)
    p99 = p(steady_gaps, 0.99) or 0.0
    steady_ttft, window_ttft = ttfts_sent_in(records, *steady), ttfts_sent_in(records, *switch)
    figures = {
        "steady_ttft_p50_ms": p(steady_ttft, 0.5), "steady_ttft_p95_ms": p(steady_ttft, 0.95),
        "window_ttft_p50_ms": p(window_ttft, 0.5), "window_ttft_p95_ms": p(window_ttft, 0.95),
        "steady_tpot_p50_ms": p(steady_gaps, 0.5), "steady_tpot_p95_ms": p(steady_gaps, 0.95),
        "window_tpot_p50_ms": p(window_gaps, 0.5), "window_tpot_p95_ms": p(window_gaps, 0.95),
    }
    figures = {k: None if v is None else v * 1e3 for k, v in figures.items()}
    phases = report.get("phases_ms", {})
    protocol = (switch[0] + (phases.get("planned", 0.0) + phases.get("starting", 0.0)) / 1e3, switch[1])
    protocol_ttft = p(ttfts_sent_in(records, *protocol), 0.95)
    protocol_tpot = p(gaps_in(records, *protocol), 0.95)
    lost = [r for r in records if r["finish"] not in ("stop", "length")]
    return {
        "pause_ms": max(0.0, max(critical_gaps, default=0.0) - p99) * 1e3,
        "pause_window_ms": max(0.0, max(window_gaps, default=0.0) - p99) * 1e3,
        "pause_interval": "hold-resume" if critical is not switch else "switch window",
        "controller_pause_ms": report.get("pause_ms"),
        "switch_duration_ms": (switch[1] - switch[0]) * 1e3,
        "controller_switch_duration_ms": report.get("switch_duration_ms"),
        "kv_bytes_moved": int(report.get("kv_bytes_moved", 0)),
        "live_kv_bytes": live_kv_bytes(records, *critical, block_size=block_size, block_bytes=block_bytes,
                                       moved_layers=moved_layers),
        "rounds": int(report.get("precopy_rounds", 0)),
        "copy_rounds": len(report.get("rounds", [])),
        "copy_bytes_per_s": copy_rate(report),
        "bulk_round_bytes_per_s": bulk_rate(report),
        "ttft_p95_overhead": overhead(figures["window_ttft_p95_ms"], figures["steady_ttft_p95_ms"]),
        "tpot_p95_overhead": overhead(figures["window_tpot_p95_ms"], figures["steady_tpot_p95_ms"]),
        "protocol_ttft_p95_overhead": overhead(protocol_ttft, p(steady_ttft, 0.95)),
        "protocol_tpot_p95_overhead": overhead(protocol_tpot, p(steady_gaps, 0.95)),
        **figures,
        "samples": {"steady_probes": len(steady_ttft), "window_probes": len(window_ttft),
                    "steady_gaps": len(steady_gaps), "window_gaps": len(window_gaps)},
        "requests": len(records),
        "requests_lost": len(lost),
        "lost_errors": sorted({str(r["error"]) for r in lost})[:3],
        "phases_ms": report.get("phases_ms", {}),
        "copy_round_stats": report.get("rounds", []),
        "fence_waits": report.get("fence_waits"),
        "fence_wait_ms_max": report.get("fence_wait_ms_max"),
        "kv_bytes_pushed": report.get("kv_bytes_pushed"),
        "outcome": report.get("outcome"),
        "error": report.get("error"),
    }
