"""`pipeshift demo`: a live layout change under streaming load, on one machine, with nothing to configure.

It serves a generated 8-layer model (or `--model`) through local stage processes, replays a workload on
the `--from` layout as the reference, replays it again while changing to `--to` mid-run, and reports
lost requests, token equality with the reference (near-ties excepted outside float64: `neartie`), the
client-side pause, the switch's costs and how many requests streamed across it (at least 8:
`demo_change`); `--plot` draws the token latencies with the phases (`plot`). What is reported and how it
is measured: `demo_report`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeshift.api import ReconfigPlan, plan_moves
from pipeshift.control import STRATEGIES, SWITCHES, WEIGHTS
from pipeshift.errors import UserError
from pipeshift.local import plot
from pipeshift.local.demo_change import SPANNING_TARGET, LiveRun, StandbyPipeline, replay_with_change, too_few
from pipeshift.local.demo_report import (
    agent_stats,
    clock_offset,
    fresh_stages,
    measure,
    recomputed_layer_tokens,
    spanning,
    table,
    weights_moved,
)
from pipeshift.local.loadgen import PlannedRequest, StreamResult, poisson_requests, replay
from pipeshift.local.neartie import compare
from pipeshift.local.policy_demo import run_policy
from pipeshift.local.processes import start_agents
from pipeshift.local.reconfigure_endpoint import check_strategy
from pipeshift.local.serve import frontend_config, model_layout
from pipeshift.local.trace import workload
from pipeshift.runtime.frontend import BackgroundFrontend
from pipeshift.runtime.model.config import LlamaConfig
from pipeshift.runtime.model.make_model import make_model
from pipeshift.runtime.threads import configure_threads

HELP = "change a local pipeline's layout live under streaming load and report what the clients saw"
DEMO_MODEL = {"layers": 8, "hidden": 256, "heads": 8, "kv_heads": 4, "intermediate": 768, "vocab": 2048, "seed": 0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=Path(".pipeshift-demo"),
                        help="where the demo model is written (reused on later runs)")
    parser.add_argument("--model", type=Path, default=None, help="serve this model instead of the demo model")
    parser.add_argument("--from", dest="old", default="4,4", help="layout before the change (default 4,4)")
    parser.add_argument("--to", dest="new", default="3,3,2", help="layout after the change (default 3,3,2)")
    parser.add_argument("--strategy", default="live", help=f"one of {', '.join(STRATEGIES)} (default live)")
    parser.add_argument("--switch", default="epoch", choices=SWITCHES,
                        help="how a live strategy hands over: epoch (no pause, default) or drain")
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
    parser.add_argument("--weights", default="checkpoint", choices=WEIGHTS,
                        help="where stages that take over layers get their weights: their checkpoint (default) or "
                             "streamed from the stage that computes them now")
    parser.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                        help="draw every token's latency over time with the change's phases shaded (needs "
                             "pipeshift[plot]); with a live strategy the same change under the other --switch is "
                             "run too and drawn beside it")
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


def check(args: argparse.Namespace) -> None:
    """What can be refused before anything starts."""
    check_strategy(args.strategy)
    if args.weights == "source" and args.strategy == "restart":
        raise UserError("--weights source needs running source stages, but --strategy restart stops them first")
    if args.plot is not None and args.policy is not None:
        raise UserError("--plot draws one --from/--to change; it is not available with --policy")
    if args.plot is not None:
        plot.require_matplotlib()
    if args.policy is None and args.requests < SPANNING_TARGET:
        raise too_few(SPANNING_TARGET, f"--requests {args.requests} is below {SPANNING_TARGET}")


def panel(args: argparse.Namespace, change: Change, switch: str) -> plot.Panel:
    """One run's token latencies and its phases on the clients' clock."""
    live, report = change.live.results, change.live.report
    zero = min(r.sent for r in live)
    series = [plot.token_gaps(r.sent, r.token_times, zero) for r in live]
    anchors = {} if report is None else {"holding": report.held_unix, "committing": report.resumed_unix}
    spans = plot.phase_spans(report.phases_ms if report is not None else {}, anchors=anchors,
                             change_start_unix=change.live.start + change.offset, zero_unix=zero + change.offset)
    return plot.Panel(series, spans, f"{args.strategy}, {switch} switch")


def compared_switch(args: argparse.Namespace) -> str | None:
    """With a live strategy the plot also shows the other switch on the same workload."""
    if args.plot is None or args.strategy not in ("live", "live-no-resize"):
        return None
    return "drain" if args.switch == "epoch" else "epoch"


@dataclass
class Change:
    """One run of the workload with the change in it (and the reference run before it, when asked)."""

    live: LiveRun
    offset: float
    reference: list[StreamResult]
    recomputed: int
    moved: int
    streamed: int
    stage_start_ms: float | None


def change_once(args: argparse.Namespace, model: Path, plan: ReconfigPlan, planned: list[PlannedRequest],
                switch: str, *, reference: list[StreamResult] | None = None) -> Change:
    """Start the `--from` pipeline, replay the reference (unless given), then replay again changing to `--to`."""
    print(f"starting the {args.old} pipeline ...", file=sys.stderr)
    with start_agents(model, plan.old, dtype=args.dtype) as agents, \
            BackgroundFrontend(frontend_config(model, agents)) as frontend:
        token = frontend.frontend.config.control_token
        pipeline = StandbyPipeline(model, agents, plan.old, dtype=args.dtype, token=token)
        try:
            added = [plan.new.stage(sid) for sid in plan.added] if args.strategy != "restart" else []
            stage_start_ms = pipeline.prestart(added) if added else None
            replayed = reference is None
            if reference is None:
                reference = asyncio.run(replay(frontend.url, planned, Progress("reference", len(planned))))
            offset = clock_offset()
            live = asyncio.run(replay_with_change(
                frontend.url, planned,
                lambda hook: pipeline.change(frontend.url, args.new, args.strategy, weights=args.weights,
                                             before_hold=hook, switch=switch),
                Progress(f"live ({switch})", len(planned))))
            counted = reference + live.results if replayed else live.results
            recomputed = recomputed_layer_tokens(pipeline, live.report, planned, counted, token)
            departed = live.report.departed_stats if live.report is not None else {}
            moved, streamed = weights_moved(agent_stats(pipeline, token), departed, fresh_stages(plan, args.strategy))
        finally:
            frontend.stop()
            pipeline.stop()
    if live.error is not None:
        raise live.error
    return Change(live, offset, reference, recomputed, moved, streamed, stage_start_ms)


def run(args: argparse.Namespace) -> int:
    configure_threads(1)
    check(args)
    model = args.model if args.model is not None else demo_model(args.workdir)
    if args.policy is not None:
        return run_policy(args, model)
    config = LlamaConfig.from_file(model / "config.json")
    plan = plan_moves(model_layout(model, args.old), model_layout(model, args.new))
    if plan.is_noop:
        raise UserError(f"--to {args.new} is the --from layout; nothing to change")
    planned = workload(args, config.vocab_size, config.max_position_embeddings, poisson_requests)
    if len(planned) < SPANNING_TARGET:
        raise too_few(SPANNING_TARGET, f"the workload has {len(planned)} requests (--requests, --trace)")
    main = change_once(args, model, plan, planned, args.switch)
    reference, live = main.reference, main.live
    across = spanning(live.results, live.report, main.offset)
    comparison = compare(model, args.dtype, [p.prompt for p in planned], [r.tokens for r in reference],
                         [r.tokens for r in live.results])
    other = compared_switch(args)
    result = measure(args, reference, live.results, live.report, live.start, live.end, across, comparison) | {
        "tokens_recomputed": main.recomputed, "weights_bytes_moved": main.moved,
        "weights_bytes_streamed": main.streamed, "stage_start_ms": main.stage_start_ms,
        "plot": None if args.plot is None else str(args.plot), "plot_compared_switch": other}
    if args.plot is not None:
        panels = [panel(args, main, args.switch)]
        if other is not None:
            compared = change_once(args, model, plan, planned, other, reference=reference)
            panels.append(panel(args, compared, other))
            result["plot_compared_pause_ms"] = measure(
                args, reference, compared.live.results, compared.live.report, compared.live.start, compared.live.end,
                [], comparison)["pause_ms"]
        plot.save(args.plot, panels, f"{args.old} → {args.new}, weights from {args.weights}, {args.dtype}")
    print(json.dumps(result) if args.json else table(result))
    if result["outcome"] == "committed" and len(across) < SPANNING_TARGET:
        print(f"pipeshift demo: error: {too_few(SPANNING_TARGET, f'only {len(across)} requests streamed across')}",
              file=sys.stderr)
        return 1
    ok = result["outcome"] == "committed" and result["requests_lost"] == 0 and result["outputs_match_reference"]
    honest = result["tokens_recomputed"] == 0 or args.strategy == "restart"  # a restart recomputes: its point
    return 0 if ok and honest else 1
