"""Planner solve time on Llama-sized models over 4-16 devices in 1-4 pools, and its gap to brute force.

Each cell is the median of 5 solves (pure Python, one thread). The gap table runs the exhaustive
solver on small instances (up to 12 layers, 4 devices, 3 pools) and compares objective values.
Writes bench/results/planner.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import time
from pathlib import Path

from pipeshift.errors import UserError
from pipeshift.placement import LengthDist, ModelProfile, PlacementRequest, Slo, Workload, make_pool, plan
from pipeshift.placement.catalogue import CATALOGUE
from pipeshift.placement.estimate import MODES, Mode, objective
from pipeshift.placement.exhaustive import exhaustive

MODELS = {
    32: ModelProfile("llama-3-8b", 32, 4096, 32, 8, 128, 14336, 128256),
    80: ModelProfile("llama-3-70b", 80, 8192, 64, 8, 128, 28672, 128256),
    126: ModelProfile("llama-3.1-405b", 126, 16384, 128, 8, 128, 53248, 128256),
}
GPUS = ("h200", "h100-80gb", "a100-80gb", "l40s")
WORKLOAD = Workload(rate=2.0, prompt=LengthDist(512, 2048), output=LengthDist(256, 512))
SLO = Slo(ttft_p95_s=2.0, tpot_p95_s=0.1)
RESULTS = Path(__file__).parent / "results" / "planner.json"


def pools_for(devices: int, n_pools: int) -> tuple:
    share, extra = divmod(devices, n_pools)
    return tuple(make_pool(f"pool{i}", GPUS[i], share + (i < extra)) for i in range(n_pools))


def solve_times(repeats: int) -> list[dict]:
    rows = []
    for layers, model in MODELS.items():
        for devices in (4, 8, 16):
            for n_pools in (1, 2, 3, 4):
                for mode in MODES:
                    request = PlacementRequest(model, pools_for(devices, n_pools), WORKLOAD, SLO, mode=mode)
                    times, outcome = [], ""
                    for _ in range(repeats):
                        start = time.perf_counter()
                        try:
                            placement = plan(request)
                            outcome = (f"{len(placement.layout)} stages, "
                                       f"{'SLO met' if placement.estimate.slo_met else 'SLO missed'}")
                        except UserError as e:
                            outcome = f"infeasible: {str(e)[:60]}"
                        times.append(time.perf_counter() - start)
                    rows.append({"layers": layers, "devices": devices, "pools": n_pools, "mode": mode,
                                 "solve_ms": statistics.median(times) * 1e3, "outcome": outcome})
    return rows


def random_instance(rng: random.Random, mode: Mode) -> PlacementRequest:
    layers = rng.randint(6, 12)
    model = ModelProfile("small", layers, 4096, 32, 8, 128, 11008, 32000)
    pools, total = [], 0
    for i in range(rng.randint(1, 3)):
        count = min(rng.randint(1, 3), 4 - total)
        if count < 1:
            break
        total += count
        pools.append(make_pool(f"p{i}", rng.choice(sorted(CATALOGUE)), count, memory_gb=rng.uniform(0.8, 3.5),
                               interconnect_gbps=rng.choice([0.5, 5.0, 50.0]),
                               cost_per_hour=rng.choice([0.5, 1.0, 2.0, 3.0])))
    workload = Workload(rng.choice([0.0, 1.0, 5.0]), LengthDist(rng.choice([64, 512]), 2048), LengthDist(64, 128))
    return PlacementRequest(model, tuple(pools), workload, Slo(rng.uniform(0.02, 0.5), rng.uniform(0.002, 0.05)),
                            mode=mode)


def brute_force_gaps(instances: int, seed: int) -> dict:
    rng = random.Random(seed)
    compared, worst, plan_s, brute_s, plans = 0, 0.0, 0.0, 0.0, 0
    for _ in range(instances):
        request = random_instance(rng, rng.choice(MODES))
        start = time.perf_counter()
        ref = exhaustive(request.cost_model(), request.mode, request.stage_range())
        brute_s += time.perf_counter() - start
        start = time.perf_counter()
        try:
            got = plan(request).estimate
        except UserError:
            got = None
        plan_s += time.perf_counter() - start
        if ref is None or got is None:
            assert ref is None and got is None, "the planner and brute force disagree on feasibility"
            continue
        plans += ref.plans_evaluated
        key = objective(request.mode if got.slo_met else "latency", got.bottleneck_s, got.cost_per_hour)
        worst = max([worst, *((a - b) / b for a, b in zip(key, ref.objective, strict=False) if b > 0)])
        compared += 1
    return {"instances": instances, "feasible_compared": compared, "max_relative_gap": worst,
            "planner_ms_per_instance": plan_s / instances * 1e3,
            "brute_force_ms_per_instance": brute_s / instances * 1e3,
            "brute_force_plans_per_instance": plans / max(compared, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gap-instances", type=int, default=200)
    args = parser.parse_args()
    rows = solve_times(args.repeats)
    gaps = brute_force_gaps(args.gap_instances, seed=0)
    print(f"{'layers':>6} {'devices':>7} {'pools':>5} {'mode':<8} {'solve ms':>9}  outcome")
    for r in rows:
        print(f"{r['layers']:>6} {r['devices']:>7} {r['pools']:>5} {r['mode']:<8} {r['solve_ms']:>9.1f}  "
              f"{r['outcome']}")
    target = [r["solve_ms"] for r in rows if r["layers"] == 80 and r["devices"] == 16]
    print(f"\n80 layers x 16 devices: worst median solve {max(target):.1f} ms (target < 100 ms)")
    print(f"brute force on {gaps['feasible_compared']} feasible small instances (<= 12 layers, <= 4 devices, "
          f"<= 3 pools): max relative objective gap {gaps['max_relative_gap']:.2e}; "
          f"{gaps['planner_ms_per_instance']:.2f} ms planner vs {gaps['brute_force_ms_per_instance']:.1f} ms "
          f"brute force per instance")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"python": platform.python_version(), "machine": platform.machine(),
                                   "repeats": args.repeats, "solve": rows, "brute_force": gaps,
                                   "worst_80x16_ms": max(target), "finite": all(math.isfinite(r["solve_ms"])
                                                                                for r in rows)}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
