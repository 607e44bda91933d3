"""`pipeshift plan`: choose a layout for a model on GPU pools and print it with its predictions.

With `--json` the output is one object `{"stages": [{"pool", "layers": [start, end]}], "predicted": {...}}`
(`end` exclusive), the same shape `--current` reads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeshift.api import Layout
from pipeshift.jsonfile import read_json_object
from pipeshift.placement.estimate import MODES
from pipeshift.placement.planner import Placement, PlacementRequest, plan
from pipeshift.placement.pools import load_pools
from pipeshift.placement.profile import DTYPE_BYTES, ModelProfile
from pipeshift.placement.workload import LengthDist, Slo, Workload

HELP = "choose a pipeline layout (pool and layer range per stage) for a model on GPU pools"
GB = 1e9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, metavar="DIR_or_config.json",
                        help="a model directory or its config.json")
    parser.add_argument("--pools", type=Path, required=True, metavar="pools.yaml",
                        help="pools: [{name, gpu, count}, ...] with optional per-pool overrides")
    parser.add_argument("--rate", type=float, required=True, metavar="R", help="arrival rate, requests/s")
    parser.add_argument("--prompt-len", type=float, required=True, metavar="P", help="mean prompt tokens")
    parser.add_argument("--output-len", type=float, required=True, metavar="O", help="mean output tokens")
    parser.add_argument("--prompt-p95", type=float, metavar="TOKENS", help="p95 prompt tokens (default: the mean)")
    parser.add_argument("--output-p95", type=float, metavar="TOKENS", help="p95 output tokens (default: the mean)")
    parser.add_argument("--ttft", type=float, default=2.0, metavar="SECONDS", help="TTFT p95 target (default 2)")
    parser.add_argument("--tpot", type=float, default=0.1, metavar="SECONDS", help="TPOT p95 target (default 0.1)")
    parser.add_argument("--mode", choices=MODES, default="latency",
                        help="latency: fastest plan meeting the SLOs; cost: cheapest plan meeting them")
    parser.add_argument("--current", type=Path, metavar="plan.json",
                        help="the running layout, in the --json shape: moves are charged against gains")
    parser.add_argument("--migration-horizon", type=float, default=3600.0, metavar="SECONDS",
                        help="time over which a move's cost is amortised (default 3600)")
    parser.add_argument("--min-stages", type=int, default=1, metavar="N")
    parser.add_argument("--max-stages", type=int, metavar="N")
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), help="weight dtype (default: from config.json)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def read_layout(path: Path) -> Layout:
    data = read_json_object(path, "--current takes the JSON that `pipeshift plan --json` prints",
                            expected="an object with stages: [{pool, layers: [start, end]}, ...]")
    return Layout.from_json(data)


def run(args: argparse.Namespace) -> int:
    workload = Workload(rate=args.rate,
                        prompt=LengthDist(args.prompt_len, args.prompt_p95 or args.prompt_len),
                        output=LengthDist(args.output_len, args.output_p95 or args.output_len))
    request = PlacementRequest(
        model=ModelProfile.from_path(args.model, dtype=args.dtype), pools=load_pools(args.pools),
        workload=workload, slo=Slo(args.ttft, args.tpot), mode=args.mode,
        current=read_layout(args.current) if args.current else None,
        migration_horizon_seconds=args.migration_horizon, min_stages=args.min_stages, max_stages=args.max_stages)
    placement = plan(request)
    if args.json:
        print(json.dumps(placement.to_json(), indent=2))
    else:
        print(table(request, placement))
    return 0


def table(request: PlacementRequest, p: Placement) -> str:
    e = p.estimate
    gpu = {pool.name: pool.gpu for pool in request.pools}
    status = "SLOs met" if e.slo_met else "SLOs NOT met: the fastest plan that fits is shown"
    lines = [f"{request.model.name}: {len(p.layout)} stages, {p.mode} mode, {status}",
             f"{'stage':>5}  {'pool':<12} {'gpu':<10} {'layers':<10} {'step ms':>8} {'weights GB':>10} "
             f"{'KV GB':>7} {'act GB':>7} {'used/cap GB':>12}"]
    for i, s in enumerate(e.stages):
        mem = s.memory
        lines.append(f"{i:>5}  {s.pool:<12} {gpu[s.pool]:<10} {f'{s.start}-{s.end - 1}':<10} "
                     f"{s.step_seconds * 1e3:>8.2f} {mem.weights / GB:>10.2f} {mem.kv / GB:>7.2f} "
                     f"{mem.activations / GB:>7.2f} {f'{mem.total / GB:.1f}/{mem.capacity / GB:.1f}':>12}")
    lines += [
        f"TTFT p95 {e.ttft_p95_s * 1e3:.1f} ms (target {p.slo.ttft_p95_s * 1e3:g}), "
        f"TPOT p95 {e.tpot_p95_s * 1e3:.2f} ms (target {p.slo.tpot_p95_s * 1e3:g})",
        f"throughput {e.throughput_tokens_per_s:.0f} tokens/s at {e.concurrency:.1f} concurrent requests, "
        f"{e.micro_batches} micro-batches in flight",
        f"cost ${e.cost_per_hour:.2f}/h",
    ]
    if request.current is not None:
        lines.append(f"from {request.current.short()}: {p.bytes_moved / GB:.2f} GB moved, "
                     f"about {p.move_seconds:.1f} s of transfer")
    return "\n".join(lines)
