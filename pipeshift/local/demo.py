"""`pipeshift demo`: a live layout change under streaming load, on one machine, with nothing to configure.

It serves a generated 8-layer model (or `--model`) through local stage processes, replays a workload on
the `--from` layout as the reference, replays it again while changing to `--to` mid-run, and reports
lost requests, token equality with the reference, the client-side pause and the switch's costs.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pipeshift.api import Layout, plan_moves
from pipeshift.control import STRATEGIES, ReconfigReport
from pipeshift.control.counters import stage_layer_tokens, tokens_recomputed
from pipeshift.local.live import LivePipeline
from pipeshift.local.loadgen import PlannedRequest, StreamResult, percentile, poisson_requests, replay
from pipeshift.local.policy_demo import run_policy
from pipeshift.local.processes import start_agents
from pipeshift.local.reconfigure_endpoint import check_strategy
from pipeshift.local.serve import frontend_config, model_layout
from pipeshift.local.trace import workload
from pipeshift.placement import ModelProfile
from pipeshift.runtime.frontend import BackgroundFrontend
from pipeshift.runtime.model.config import LlamaConfig
from pipeshift.runtime.model.make_model import make_model
from pipeshift.runtime.threads import configure_threads

HELP = "change a local pipeline's layout live under streaming load and report what the clients saw"
DEMO_MODEL = {"layers": 8, "hidden": 256, "heads": 8, "kv_heads": 4, "intermediate": 768, "vocab": 2048, "seed": 0}
SPANNING_TARGET = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=Path(".pipeshift-demo"),
                        help="where the demo model is written (reused on later runs)")
    parser.add_argument("--model", type=Path, default=None, help="serve this model instead of the demo model")
    parser.add_argument("--from", dest="old", default="4,4", help="layout before the change (default 4,4)")
    parser.add_argument("--to", dest="new", default="3,3,2", help="layout after the change (default 3,3,2)")
    parser.add_argument("--strategy", default="live", help=f"one of {', '.join(STRATEGIES)} (default live)")
    parser.add_argument("--switch", default="drain", choices=["drain"], help="how the switch hands over")
    parser.add_argument("--requests", type=int, default=32, help="requests in the workload (default 32)")
    parser.add_argument("--rate", type=float, default=12.0, help="Poisson arrivals per second (default 12)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace", type=Path, default=None,
                        help="replay arrivals and lengths from a CSV of TIMESTAMP,ContextTokens,GeneratedTokens")
    parser.add_argument("--speedup", type=float, default=1.0, help="divide trace inter-arrival times by this")
    parser.add_argument("--prompt-tokens", type=int, default=48, help="longest prompt (default 48)")
    parser.add_argument("--max-tokens", type=int, default=48, help="longest output (default 48)")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--policy", type=Path, default=None,
                        help="let this autoscaling policy change the layout while the load rises and falls "
                             "(instead of --from/--to); --rate is then the peak rate")
    parser.add_argument("--linger", type=float, default=5.0,
                        help="with --policy: seconds the policy keeps deciding after the last request (default 5)")


def demo_model(workdir: Path) -> Path:
    """The demo model, written once; its directory is named by its shape so a changed shape gets a new one."""
    path = workdir / "model-{layers}L-h{hidden}-v{vocab}-s{seed}".format(**DEMO_MODEL)
    if not (path / "config.json").exists():
        print(f"writing a {DEMO_MODEL['layers']}-layer demo model to {path} ...", file=sys.stderr)
        make_model(path, **DEMO_MODEL)
    return path


class Progress:
    """One line on stderr: the phase, requests done, and tokens so far."""

    def __init__(self, phase: str, total: int) -> None:
        self.phase, self.total, self.done, self.tokens = phase, total, 0, 0

    def __call__(self, result: StreamResult) -> None:
        self.done += 1
        self.tokens += len(result.tokens)
        filled = 30 * self.done // self.total
        print(f"\r{self.phase:<10} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} requests, "
              f"{self.tokens} tokens", end="" if self.done < self.total else "\n", file=sys.stderr, flush=True)




async def replay_with_change(url: str, planned: list[PlannedRequest], pipeline: LivePipeline, to: str,
                             strategy: str) -> tuple[list[StreamResult], ReconfigReport, float, float]:
    """Replays `planned` and starts the change once `SPANNING_TARGET` requests stream at once (or, if the
    load never gets there, at the last arrival); returns results, report, switch start and end."""
    tasks: list[asyncio.Task[StreamResult]] = []
    switch: dict[str, Any] = {}
    watcher: list[asyncio.Task[None]] = []

    def started(growing: list[asyncio.Task[StreamResult]]) -> None:
        nonlocal tasks
        tasks = growing
        watcher.append(asyncio.create_task(changer()))

    async def changer() -> None:
        target = min(SPANNING_TARGET, len(planned))
        while True:
            live = sum(1 for t in tasks if not t.done())
            if live >= target or (len(tasks) == len(planned) and live > 0) or len(tasks) == len(planned) == 0:
                break
            await asyncio.sleep(0.005)
        switch["start"] = time.perf_counter()
        switch["report"] = await asyncio.to_thread(pipeline.change, url, to, strategy)
        switch["end"] = time.perf_counter()

    results = await replay(url, planned, Progress("live", len(planned)), started=started)
    await watcher[0]
    return results, switch["report"], switch["start"], switch["end"]


def token_gaps(result: StreamResult) -> list[tuple[float, float]]:
    """(end time, gap) between consecutive tokens, the first gap measured from sending (TTFT)."""
    times = [result.sent, *result.token_times]
    return [(b, b - a) for a, b in itertools.pairwise(times) if b > a or a == result.sent]


def latency(results: list[StreamResult]) -> dict[str, float | None]:
    ttft = [r.token_times[0] - r.sent for r in results if r.token_times]
    tpot = [(r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1)
            for r in results if len(r.token_times) > 1]

    def ms(values: list[float], q: float) -> float | None:
        if not values:
            return None
        return 1e3 * (statistics.median(values) if q == 0.5 else percentile(values, q))

    return {"ttft_p50_ms": ms(ttft, 0.5), "ttft_p95_ms": ms(ttft, 0.95),
            "tpot_p50_ms": ms(tpot, 0.5), "tpot_p95_ms": ms(tpot, 0.95)}


def weights_moved(model: Path, args: argparse.Namespace) -> int:
    """Layer weights the new layout's stages loaded: the moved layers', or every layer's on a restart."""
    profile = ModelProfile.from_path(model, dtype="float32")
    per_layer = profile.layer_matmul_params + 2 * profile.hidden_size
    old, new = Layout.parse(args.old), Layout.parse(args.new)
    layers = new.num_layers if args.strategy == "restart" else len(plan_moves(old, new).moves)
    return layers * per_layer * torch.finfo(getattr(torch, args.dtype)).bits // 8


def recomputed_layer_tokens(pipeline: LivePipeline, report: ReconfigReport, planned: list[PlannedRequest],
                            results: list[StreamResult], token: str | None) -> int:
    """The agents' own (position, layer) counters against what every request served (the reference run
    and the live run, on the same agents) needed; stages that left were read before they stopped."""
    counted = list(stage_layer_tokens(pipeline.urls.values(), token).values())
    counted += [int(stats["layer_tokens_computed"]) for stats in report.departed_stats.values()]
    served = [(len(p.prompt), len(r.tokens)) for p, r in zip(planned * 2, results, strict=True)]
    return tokens_recomputed(counted, served, pipeline.layout.num_layers)


def measure(args: argparse.Namespace, reference: list[StreamResult], live: list[StreamResult],
            report: ReconfigReport, start: float, end: float) -> dict[str, Any]:
    spanning = [r for r in live if r.sent <= end and r.ended >= start]
    steady = reference  # the same workload without a change: the steady state to compare the switch with
    steady_gaps = [g for r in steady for _, g in token_gaps(r)[1:]]
    window_gaps = [g for r in spanning for t, g in token_gaps(r)[1:] if t >= start and t - g <= end]
    p99 = percentile(steady_gaps, 0.99) if steady_gaps else 0.0
    diverged = sum(1 for a, b in zip(reference, live, strict=True) if a.tokens != b.tokens)
    ok = [r for r in live if r.finish in ("stop", "length")]
    return {
        "strategy": args.strategy, "switch": args.switch, "from": args.old, "to": args.new,
        "dtype": args.dtype, "outcome": report.outcome, "error": report.error,
        "requests": len(live), "requests_completed": len(ok), "requests_lost": len(live) - len(ok),
        "requests_spanning_switch": len(spanning),
        "outputs_match_reference": diverged == 0,
        "near_tie_divergences": diverged,
        "pause_ms": max(0.0, (max(window_gaps, default=0.0) - p99) * 1e3),
        "controller_pause_ms": report.pause_ms,
        "switch_duration_ms": report.switch_duration_ms,
        "precopy_rounds": report.precopy_rounds, "kv_bytes_moved": report.kv_bytes_moved,
        "steady": latency(steady), "switch_window": latency(spanning),
    }


def table(result: dict[str, Any]) -> str:
    rows: list[tuple[str, Any]] = [(k, v) for k, v in result.items() if not isinstance(v, dict)]
    for part in ("steady", "switch_window"):
        rows += [(f"{part} {k}", "-" if v is None else f"{v:.1f}") for k, v in result[part].items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {f'{v:.1f}' if isinstance(v, float) else v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    configure_threads(1)
    check_strategy(args.strategy)
    model = args.model if args.model is not None else demo_model(args.workdir)
    if args.policy is not None:
        return run_policy(args, model)
    config = LlamaConfig.from_file(model / "config.json")
    old = model_layout(model, args.old)
    model_layout(model, args.new)
    planned = workload(args, config.vocab_size, config.max_position_embeddings, poisson_requests)
    print(f"starting the {args.old} pipeline ...", file=sys.stderr)
    with start_agents(model, old, dtype=args.dtype) as agents, \
            BackgroundFrontend(frontend_config(model, agents)) as frontend:
        pipeline = LivePipeline(model, agents, old, dtype=args.dtype, token=frontend.frontend.config.control_token)
        try:
            reference = asyncio.run(replay(frontend.url, planned, Progress("reference", len(planned))))
            live, report, start, end = asyncio.run(
                replay_with_change(frontend.url, planned, pipeline, args.new, args.strategy))
            recomputed = recomputed_layer_tokens(pipeline, report, planned, reference + live,
                                                 frontend.frontend.config.control_token)
        finally:
            frontend.stop()
            pipeline.stop()
    result = measure(args, reference, live, report, start, end) | {
        "tokens_recomputed": recomputed, "weights_bytes_moved": weights_moved(model, args)}
    print(json.dumps(result) if args.json else table(result))
    return 0 if result["outcome"] == "committed" and result["requests_lost"] == 0 else 1
