"""Serving throughput, TTFT and TPOT through 1, 2 and 3 stage processes at a fixed request rate.

For each layout: start the agents (OS processes) and the frontend, warm up, then send requests at a
fixed rate (open loop: arrivals do not wait for answers) as streaming completions, each with the same
prompt length and `max_tokens` (EOS ignored so every request generates the same number of tokens).
The load generator runs in its own process, so its work never competes with the frontend's event
loop for the GIL. TTFT is arrival to first token; TPOT is (end - first token) / (tokens - 1), both
measured by the client. Prints a table and writes bench/results/serving.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import platform
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeshift.local.loadgen import Load, RequestTiming, drive, summarize
from pipeshift.local.processes import start_agents
from pipeshift.runtime.frontend import BackgroundFrontend, FrontendConfig
from pipeshift.runtime.model.make_model import make_model

MODEL = {"layers": 6, "hidden": 256, "heads": 8, "kv_heads": 4, "intermediate": 768, "vocab": 4096, "seed": 0}
LAYOUTS = ("6", "3,3", "2,2,2")
RESULTS = Path(__file__).parent / "results" / "serving.json"
logger = logging.getLogger("bench.serving")


def client_process(url: str, load: Load, vocab: int, out: Any) -> None:
    timings, wall = asyncio.run(drive(url, load, vocab))
    out.send(([asdict(t) for t in timings], wall))


def run_layout(model_dir: Path, layout: str, load: Load) -> dict[str, Any]:
    with start_agents(model_dir, layout, dtype="float32") as agents:
        config = FrontendConfig(
            model_dir=model_dir,
            port=0,
            max_queue=10 * load.requests,
            stages=tuple(f"{a.host}:{a.control_port}" for a in agents.agents),
        )
        with BackgroundFrontend(config) as frontend:
            receive, send = multiprocessing.get_context("spawn").Pipe(duplex=False)
            client = multiprocessing.get_context("spawn").Process(
                target=client_process, args=(frontend.url, load, MODEL["vocab"], send)
            )
            client.start()
            raw, wall = receive.recv()
            client.join()
    timings = [RequestTiming(**t) for t in raw]
    return {"layout": layout, "stages": len(layout.split(",")), **summarize(timings, wall)}


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'layout':>8} {'stages':>6} {'tok/s':>8} {'req/s':>6} {'TTFT p50':>9} {'TTFT p95':>9} "
        f"{'TPOT p50':>9} {'TPOT p95':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['layout']:>8} {r['stages']:>6} {r['throughput_tok_s']:>8.1f} {r['requests_per_s']:>6.2f} "
            f"{r['ttft_p50_s'] * 1e3:>7.1f}ms {r['ttft_p95_s'] * 1e3:>7.1f}ms "
            f"{r['tpot_p50_s'] * 1e3:>7.1f}ms {r['tpot_p95_s'] * 1e3:>7.1f}ms"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=8.0, help="requests per second (default 8)")
    parser.add_argument("--requests", type=int, default=48, help="timed requests per layout (default 48)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=4, help="concurrent untimed requests first")
    parser.add_argument("--layouts", default=";".join(LAYOUTS), help="';'-separated layouts of 6 layers")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load = Load(
        rate=args.rate,
        requests=args.requests,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        warmup=args.warmup,
    )
    with tempfile.TemporaryDirectory(prefix="pipeshift-bench-") as tmp:
        model_dir = make_model(Path(tmp) / "model", **MODEL)
        rows = [run_layout(model_dir, layout, load) for layout in args.layouts.split(";")]
    print(table(rows))
    report = {
        "model": MODEL,
        "load": asdict(load),
        "dtype": "float32",
        "cpus": len(os.sched_getaffinity(0)),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
