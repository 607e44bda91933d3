"""Live reconfiguration against restart and stop-copy: one fixed model, workload and change, every strategy.

Model: generated on the fly (`make_model`), 8 layers, hidden 512, 8 heads, 8 KV heads, intermediate 1024,
vocab 2048, float32: 2 × 8 × 64 × 4 B = 4 KiB of KV per token per layer. Change: `4,4 → 3,3,2`, in which a
new middle stage takes layer 3 from stage 0 and layers 4–5 from stage 1 (3 layers move). Workload: 24 long
requests of 1000 prompt tokens sent at once and decoding 256 tokens each (≈ 24k live tokens, so ≥ 256 MiB
of KV on the moving layers at the switch), plus, once they all stream, 32-token probes every 0.25 s whose
TTFT shows what a new request waits for. The switch starts 6 s after the last long request's first token.
Each run starts fresh agent processes; runs of different strategies alternate, so load on a shared host hits
all alike.

Strategies: `restart`, `stop-copy`, `live-drain` (live, drain switch), `live-epoch` (live, epoch switch),
`live-no-resize` (live with pools kept at their size, reconfigure's default switch), and beside them
`live-epoch-paced` (`live-epoch` with its pre-copy capped at 64 MB/s, see `SwitchBudget.precopy_bytes_per_s`:
a longer switch for less slowdown of serving); each `--repeats` times. Every figure is defined in
`_reconfig_measure`; the table shows medians over the repeats. The targets are judged on `live-epoch`.

Link: `_linkspeed` (sendall of 4 MiB chunks, 256 MiB in all, between two processes on 127.0.0.1), measured
3 times at the start and once more just before every run, because on a shared host the link's speed moves
with the load as much as the KV path's does; `link_bytes_per_s` is the median of all of them.
`kv_throughput_fraction` = the median, over the live strategy's runs, of `copy_bytes_per_s` ÷ the link
speed measured just before that run, where `copy_bytes_per_s` = bytes of all copy rounds of the run ÷ the
wall time of the orchestrator phases those rounds run in (`precopying`, plus `final_copy` for drain): KV
bytes moved per second of pre-copy, with the control calls between rounds and the waits for the sources'
compute workers counted against it. `bulk_round_fraction` is the same for the first round alone (its bytes
÷ its seconds summed over source→target pairs, which run concurrently, so it is a lower bound). The live
strategy is `live-epoch` when it ran, else `live-drain`. `kv_loaded_link_fraction` divides the same copy rate
by the link measured once more in every run after its tail, while the long requests still stream: on a small
host the loopback link is CPU as much as the KV path is, so this one compares the two under the same load,
and the idle figure shows what that load costs both.

Added stages are started before the load (`stage_start_ms`), as an operator creates new stage pods and waits
for them Ready before a change; only `restart` starts stages inside its switch, by definition.

Memory-tight scenario (`_reconfig_tight`): every stage has a device-memory budget (`--memory-bytes`: the
weights of 4 layers and one slab of KV), so the weight memory of layers a stage gives away becomes KV only
when pools are resized; `resize_ttft_ratio` = burst TTFT p95 of `live-no-resize` ÷ that of `live`, for the
change `4,4 → 3,3,2`.

Prints a table and writes bench/results/reconfig.json; `--json` prints that object instead of the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import _linkspeed

MODEL = {"layers": 8, "hidden": 512, "heads": 8, "kv_heads": 8, "intermediate": 1024, "vocab": 2048, "seed": 0}
PACED = "live-epoch-paced"
NAMES = ("restart", "stop-copy", "live-drain", "live-epoch", "live-no-resize", PACED)
CONTRACT = ("pause_ms", "switch_duration_ms", "kv_bytes_moved", "ttft_p95_overhead", "tpot_p95_overhead")
EXTRA = ("rounds", "copy_rounds", "pause_window_ms", "controller_pause_ms", "copy_bytes_per_s", "live_kv_bytes",
         "protocol_ttft_p95_overhead", "protocol_tpot_p95_overhead", "steady_ttft_p95_ms", "window_ttft_p95_ms",
         "steady_tpot_p95_ms", "window_tpot_p95_ms", "tokens_recomputed", "requests_lost", "fence_wait_ms_max",
         "kv_bytes_pushed", "kv_link_fraction", "bulk_round_fraction", "bulk_round_bytes_per_s", "link_bytes_per_s",
         "stage_start_ms", "link_loaded_bytes_per_s", "kv_loaded_link_fraction")
RESULTS = Path(__file__).parent / "results" / "reconfig.json"
KV_TARGET_BYTES = 256 * 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per strategy (default 5)")
    parser.add_argument("--quick", action="store_true",
                        help="a small version for CI: fewer and shorter requests, 1 repeat, 64 MiB link test, "
                             "one tight scenario; writes no results file unless --out is given")
    parser.add_argument("--strategies", default=",".join(NAMES), help="comma-separated subset to run")
    parser.add_argument("--tight-repeats", type=int, default=3, help="runs per memory-tight case (default 3)")
    parser.add_argument("--no-tight", action="store_true", help="skip the memory-tight scenario")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--out", type=Path, default=None, help=f"results file (default {RESULTS})")
    args = parser.parse_args(argv)
    for flag, value in (("--repeats", args.repeats), ("--tight-repeats", args.tight_repeats)):
        if value < 1:
            parser.error(f"{flag} {value} must be at least 1")
    unknown = [s for s in args.strategies.split(",") if s not in NAMES]
    if unknown:
        parser.error(f"--strategies: unknown {', '.join(unknown)}; valid: {', '.join(NAMES)}")
    given = " ".join(argv if argv is not None else sys.argv)
    if args.quick and "--repeats" not in given:
        args.repeats = 1
    if args.quick and "--tight-repeats" not in given:
        args.tight_repeats = 1
    if args.out is None and not args.quick:
        args.out = RESULTS
    return args


def median(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(name: str, runs: list[dict[str, Any]], why_not: str | None) -> dict[str, Any]:
    if why_not is not None:
        return {"available": False, "reason": why_not, **dict.fromkeys(CONTRACT), "runs": []}
    done = [r for r in runs if "failed" not in r]
    out: dict[str, Any] = {"available": True}
    for key in CONTRACT + EXTRA:
        out[key] = median([r.get(key) for r in done])
    out["switch"] = done[0]["switch"] if done else None
    out["outcomes"] = [r.get("outcome", "failed") for r in runs]
    out["failed_runs"] = [r["failed"] for r in runs if "failed" in r]
    out["runs"] = runs
    return out


def ratio(num: float | None, den: float | None) -> float | str | None:
    if num is None or den is None:
        return None
    if den <= 0:
        return "unbounded" if num > 0 else None
    return num / den


def invariants(strategies: dict[str, dict[str, Any]]) -> list[str]:
    """Violations of what every run must show whatever its speed."""
    problems = []
    for name, s in strategies.items():
        for i, run in enumerate(s["runs"]):
            where = f"{name} run {i + 1}"
            if "failed" in run:
                problems.append(f"{where}: {run['failed']}")
                continue
            if run["outcome"] != "committed":
                problems.append(f"{where}: outcome {run['outcome']}: {run['error']}")
            if run["requests_lost"]:
                problems.append(f"{where}: {run['requests_lost']} requests lost: {run['lost_errors']}")
            if name != "restart" and run["tokens_recomputed"] != 0:
                problems.append(f"{where}: {run['tokens_recomputed']} (position, layer) computations repeated")
            if name != "restart" and run["kv_bytes_moved"] < run["live_kv_bytes"]:
                problems.append(f"{where}: moved {run['kv_bytes_moved']} KV bytes < {run['live_kv_bytes']} live")
    return problems


def targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    s, live = report["strategies"], report["live"]
    if live is None:
        return {}
    pause = report["pause_ratios"]

    def check(value: Any, goal: float, below: bool = False) -> dict[str, Any]:
        met = None if value is None else (value == "unbounded" or (value < goal if below else value >= goal))
        return {"value": value, "target": f"{'<' if below else '>='} {goal}", "met": met}

    out = {
        f"{live} pause_ms": check(s[live]["pause_ms"], 5.0, below=True),
        f"restart/{live} pause": check(pause.get(f"restart/{live}"), 100.0),
        f"stop-copy/{live} pause": check(pause.get(f"stop-copy/{live}"), 10.0),
        f"{live} ttft_p95_overhead": check(s[live]["ttft_p95_overhead"], 0.05, below=True),
        f"{live} tpot_p95_overhead": check(s[live]["tpot_p95_overhead"], 0.05, below=True),
        "kv_throughput_fraction": check(report["kv_throughput_fraction"], 0.70),
        "kv_throughput_fraction (link under the same load)": check(report["kv_loaded_link_fraction"], 0.70),
        "resize_ttft_ratio": check(report["resize_ttft_ratio"], 2.5),
        "live KV moved (bytes)": check(s[live]["live_kv_bytes"], KV_TARGET_BYTES),
    }
    paced = s.get(PACED)
    if paced is not None and paced["available"] and paced["pause_ms"] is not None:
        # The same switch with its pre-copy capped, beside the targets it trades against (not instead of them).
        out |= {
            f"{PACED} pause_ms": check(paced["pause_ms"], 5.0, below=True),
            f"restart/{PACED} pause": check(ratio(s["restart"]["pause_ms"], paced["pause_ms"]), 100.0),
            f"stop-copy/{PACED} pause": check(ratio(s["stop-copy"]["pause_ms"], paced["pause_ms"]), 10.0),
            f"{PACED} ttft_p95_overhead": check(paced["ttft_p95_overhead"], 0.05, below=True),
            f"{PACED} tpot_p95_overhead": check(paced["tpot_p95_overhead"], 0.05, below=True),
            f"{PACED} kv_throughput_fraction": check(paced["kv_link_fraction"], 0.70),
        }
    return out


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}"


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:+.0f}%"


def table(report: dict[str, Any]) -> str:
    head = (f"{'strategy':<16} {'switch':>6} {'pause ms':>9} {'ctl pause':>9} {'switch ms':>9} {'KV MiB':>7} "
            f"{'live MiB':>8} {'rounds':>6} {'copy MB/s':>9} {'/link':>5} {'TTFT p95':>8} {'TPOT p95':>8} "
            f"{'recomp':>7} {'lost':>4}")
    lines = [head, "-" * len(head)]
    for name, s in report["strategies"].items():
        if not s["available"]:
            lines.append(f"{name:<16} not available: {s['reason']}")
            continue
        mib = 2**20

        def num(key: str, scale: float = 1.0, s: dict[str, Any] = s) -> str:
            return "-" if s[key] is None else f"{s[key] / scale:.0f}"

        lines.append(
            f"{name:<16} {s['switch'] or '-':>6} {_ms(s['pause_ms']):>9} {_ms(s['controller_pause_ms']):>9} "
            f"{num('switch_duration_ms'):>9} {num('kv_bytes_moved', mib):>7} {num('live_kv_bytes', mib):>8} "
            f"{num('rounds'):>6} {num('copy_bytes_per_s', 1e6):>9} {_pct_plain(s['kv_link_fraction']):>5} "
            f"{_pct(s['ttft_p95_overhead']):>8} "
            f"{_pct(s['tpot_p95_overhead']):>8} {num('tokens_recomputed'):>7} {num('requests_lost'):>4}")
    lines.append("")
    trials = report["link"]["trials_bytes_per_s"]
    lines.append(f"link: median {report['link_bytes_per_s'] / 1e6:.0f} MB/s of {len(trials)} (range "
                 f"{min(trials) / 1e6:.0f}-{max(trials) / 1e6:.0f}); KV pre-copy throughput / link = "
                 f"{_pct_plain(report['kv_throughput_fraction'])}, first round alone "
                 f"{_pct_plain(report['bulk_round_fraction'])} (live = {report['live']}); against the link measured "
                 f"under the same serving load {_pct_plain(report['kv_loaded_link_fraction'])}")
    lines.append("pause ratios (client pause_ms): " + ", ".join(
        f"{k} {v if isinstance(v, str) or v is None else f'{v:.0f}x'}" for k, v in report["pause_ratios"].items()))
    for to, t in report.get("tight", {}).get("scenarios", {}).items():
        r = t["ratio_p95"]
        lines.append(f"memory-tight 4,4 -> {to}: burst TTFT p95 live {_ms(t['live']['burst_ttft_p95_ms'])} ms, "
                     f"no-resize {_ms(t['live-no-resize']['burst_ttft_p95_ms'])} ms, no-resize/live "
                     f"{'-' if r is None else f'{r:.2f}'}")
    if report["targets"]:
        lines.append("")
        lines += [f"target {k}: {v['value'] if not isinstance(v['value'], float) else round(v['value'], 3)} "
                  f"(want {v['target']}) {'met' if v['met'] else 'MISSED' if v['met'] is False else 'n/a'}"
                  for k, v in report["targets"].items()]
    if report["problems"]:
        lines += ["", "PROBLEMS:"] + [f"  {p}" for p in report["problems"]]
    return "\n".join(lines)


def _pct_plain(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def quick_settings(args: argparse.Namespace) -> tuple[Any, Any, dict[str, int]]:
    """The workload, tight scenario and link test of a full run, or the small ones of `--quick`."""
    from _reconfig_run import Workload
    from _reconfig_tight import Tight

    if not args.quick:
        return Workload(), Tight(), {"trials": 3, "total": _linkspeed.TOTAL}
    workload = Workload(long=4, long_prompt=256, long_max_tokens=160, probe_rate=3.0, steady_s=1.0, settle_s=0.3,
                        tail_s=0.3, kv_bytes=64 * 2**20)
    tight = Tight(scenarios=("3,3,2",), background=1, background_prompt=64, background_max_tokens=128, burst=6,
                  burst_prompt=64, burst_max_tokens=16, concurrent=2)
    return workload, tight, {"trials": 1, "total": 64 * 2**20}


def link_fractions(figures: dict[str, Any], link_now: float) -> dict[str, Any]:
    """The run's KV copy rates as fractions of the link speed measured just before it (idle: no pipeline
    running), and the copy rate as a fraction of the link measured under the run's serving load."""
    out: dict[str, Any] = {"link_bytes_per_s": link_now}
    for key, rate in (("kv_link_fraction", "copy_bytes_per_s"), ("bulk_round_fraction", "bulk_round_bytes_per_s")):
        value = figures.get(rate)
        out[key] = None if value is None else value / link_now
    loaded, copy = figures.get("link_loaded_bytes_per_s"), figures.get("copy_bytes_per_s")
    out["kv_loaded_link_fraction"] = None if loaded is None or copy is None else copy / loaded
    return out


def tight_summary(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    scenarios = {}
    for to, by_name in runs.items():
        sides = {name: {"burst_ttft_p50_ms": median([r.get("burst_ttft_p50_ms") for r in rs]),
                        "burst_ttft_p95_ms": median([r.get("burst_ttft_p95_ms") for r in rs]),
                        "runs": rs} for name, rs in by_name.items()}
        fixed, resized = sides["live-no-resize"], sides["live"]
        scenarios[to] = {**sides,
                         "ratio_p50": ratio(fixed["burst_ttft_p50_ms"], resized["burst_ttft_p50_ms"]),
                         "ratio_p95": ratio(fixed["burst_ttft_p95_ms"], resized["burst_ttft_p95_ms"])}
    return {"scenarios": scenarios}


def tight_problems(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    problems = []
    for to, by_name in runs.items():
        for name, rs in by_name.items():
            for i, r in enumerate(rs):
                where = f"tight 4,4 -> {to} {name} run {i + 1}"
                if "failed" in r:
                    problems.append(f"{where}: {r['failed']}")
                elif r["outcome"] != "committed" or r["requests_lost"]:
                    problems.append(f"{where}: outcome {r['outcome']} ({r['error']}), {r['requests_lost']} lost")
    return problems


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from _reconfig_run import progress, run_once, unavailable
    from _reconfig_tight import run_tight

    from pipeshift.api import Layout, plan_moves
    from pipeshift.runtime.model.make_model import make_model
    from pipeshift.runtime.threads import configure_threads

    configure_threads(1)
    workload, tight, link_test = quick_settings(args)
    names = [n for n in NAMES if n in args.strategies.split(",")]
    why_not = {n: unavailable(n) for n in NAMES}
    load_before = os.getloadavg()
    progress("measuring the loopback link ...")
    link = _linkspeed.link_speed(**link_test)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    tight_runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        to: {"live": [], "live-no-resize": []} for to in tight.scenarios}
    block = (16, 2 * 16 * MODEL["kv_heads"] * (MODEL["hidden"] // MODEL["heads"]) * 4)
    with tempfile.TemporaryDirectory(prefix="pipeshift-bench-reconfig-") as tmp:
        model_dir = make_model(Path(tmp) / "model", **MODEL)
        for rep in range(max(args.repeats, args.tight_repeats)):
            for name in names:
                if why_not[name] is not None or rep >= args.repeats:
                    continue
                label = f"{name} {rep + 1}/{args.repeats}"
                link_now = _linkspeed.measure_once(link_test["total"])
                link["trials_bytes_per_s"].append(link_now)
                progress(f"{label}: link {link_now / 1e6:.0f} MB/s; starting a fresh {workload.old} pipeline ...")
                try:
                    figures = run_once(model_dir, name, workload, MODEL["vocab"], label, link_test["total"])
                except Exception as error:  # one broken run is reported, the others still count
                    figures = {"failed": f"{type(error).__name__}: {error}"}
                    progress(f"  {label}: FAILED: {error}")
                runs[name].append(figures | link_fractions(figures, link_now))
            for to in tight.scenarios if not args.no_tight and rep < args.tight_repeats else ():
                for name in ("live", "live-no-resize"):
                    label = f"tight {to} {name} {rep + 1}/{args.tight_repeats}"
                    progress(f"{label}: ...")
                    try:
                        tight_runs[to][name].append(run_tight(model_dir, name, to, tight, MODEL["vocab"], block, label))
                    except Exception as error:
                        tight_runs[to][name].append({"failed": f"{type(error).__name__}: {error}"})
                        progress(f"  {label}: FAILED: {error}")
    strategies = {n: summarize(n, runs.get(n, []), why_not[n] or (None if n in names else "not selected"))
                  for n in NAMES}
    ran = [n for n in ("live-epoch", "live-drain") if strategies[n]["available"] and strategies[n]["pause_ms"]
           is not None]
    live = ran[0] if ran else None
    pause_ratios = {f"{a}/{b}": ratio(strategies[a].get("pause_ms"), strategies[b].get("pause_ms"))
                    for a in ("restart", "stop-copy") for b in ("live-epoch", "live-drain")}
    controller_ratios = {f"{a}/{b}": ratio(strategies[a].get("controller_pause_ms"),
                                           strategies[b].get("controller_pause_ms"))
                         for a in ("restart", "stop-copy") for b in ("live-epoch", "live-drain")}
    tight_out = tight_summary(tight_runs) if not args.no_tight else {"scenarios": {}}
    headline = tight_out["scenarios"].get("3,3,2") or next(iter(tight_out["scenarios"].values()), None)
    link["bytes_per_s"] = statistics.median(link["trials_bytes_per_s"])
    import torch

    report: dict[str, Any] = {
        "model": MODEL | {"dtype": "float32", "kv_bytes_per_token_per_layer": block[1] // block[0]},
        "change": {"from": workload.old, "to": workload.new,
                   "moved_layers": len(plan_moves(Layout.parse(workload.old), Layout.parse(workload.new)).moves)},
        "workload": asdict(workload), "tight_workload": asdict(tight), "repeats": args.repeats,
        "tight_repeats": args.tight_repeats, "quick": args.quick,
        "machine": {"cpus": len(os.sched_getaffinity(0)), "machine": platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "link": link, "link_bytes_per_s": link["bytes_per_s"],
        "strategies": strategies, "live": live,
        "pause_ratios": pause_ratios, "controller_pause_ratios": controller_ratios,
        "kv_throughput_fraction": strategies[live]["kv_link_fraction"] if live else None,
        "kv_loaded_link_fraction": strategies[live]["kv_loaded_link_fraction"] if live else None,
        "bulk_round_fraction": strategies[live]["bulk_round_fraction"] if live else None,
        "resize_ttft_ratio": None if headline is None else headline["ratio_p95"],
        "tight": tight_out,
    }
    report["targets"] = targets(report)
    report["problems"] = invariants(strategies) + tight_problems(tight_runs)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    report = run_all(args)
    report["bench_seconds"] = time.time() - started
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report))
    else:
        print(table(report))
        if args.out is not None:
            print(f"wrote {args.out}")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
