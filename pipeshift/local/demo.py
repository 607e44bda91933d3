"""`pipeshift demo`: the main job on an embedded default, on one machine, with nothing to configure.

It writes a small random Llama checkpoint (once, under `--workdir`), serves it through a 2-stage
pipeline of agent processes behind the OpenAI-compatible frontend, sends a burst of concurrent
streaming requests with a progress bar, and prints throughput and TTFT/TPOT percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.request
from pathlib import Path

from pipeshift.local.loadgen import Load, RequestTiming, drive, summarize
from pipeshift.local.serve import frontend_config, start_pipeline
from pipeshift.runtime.frontend import BackgroundFrontend
from pipeshift.runtime.model.make_model import make_model
from pipeshift.runtime.threads import configure_threads

HELP = "run a local pipeline on a small generated model under a burst of requests"
DEMO_MODEL = {"layers": 6, "hidden": 256, "heads": 8, "kv_heads": 4, "intermediate": 768, "vocab": 2048, "seed": 0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=Path(".pipeshift-demo"),
                        help="where the demo model is written (reused on later runs)")
    parser.add_argument("--layout", default="3,3", help="layers per stage (default 3,3)")
    parser.add_argument("--requests", type=int, default=32, help="requests in the burst (default 32)")
    parser.add_argument("--rate", type=float, default=16.0, help="arrivals per second (default 16)")
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=32)


def demo_model(workdir: Path) -> Path:
    path = workdir / "model"
    if not (path / "config.json").exists():
        print(f"writing a {DEMO_MODEL['layers']}-layer demo model to {path} ...", file=sys.stderr)
        make_model(path, **DEMO_MODEL)
    return path


class ProgressBar:
    """A one-line progress bar on stderr: requests done, and tokens so far."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.tokens = total, 0, 0

    def __call__(self, timing: RequestTiming) -> None:
        self.done += 1
        self.tokens += timing.tokens
        filled = 30 * self.done // self.total
        print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} requests, "
              f"{self.tokens} tokens", end="" if self.done < self.total else "\n", file=sys.stderr, flush=True)


def sample_completion(url: str, prompt: str) -> str:
    body = json.dumps({"prompt": prompt, "max_tokens": 24, "temperature": 0}).encode()
    request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.load(resp)["choices"][0]["text"]


def run(args: argparse.Namespace) -> int:
    configure_threads(1)
    model = demo_model(args.workdir)
    load = Load(rate=args.rate, requests=args.requests, prompt_tokens=args.prompt_tokens,
                max_tokens=args.max_tokens, warmup=2)
    print(f"starting a {len(args.layout.split(','))}-stage pipeline ({args.layout}) ...", file=sys.stderr)
    with start_pipeline(model, args.layout) as agents, \
            BackgroundFrontend(frontend_config(model, agents)) as frontend:
        print(f"serving on {frontend.url}; sample: {sample_completion(frontend.url, 'The pipeline')!r}")
        timings, wall = asyncio.run(drive(frontend.url, load, DEMO_MODEL["vocab"],
                                          on_done=ProgressBar(load.requests)))
    s = summarize(timings, wall)
    print(f"requests {s['requests']}, tokens {s['tokens']}, {s['throughput_tok_s']:.1f} tok/s, "
          f"{s['requests_per_s']:.2f} req/s")
    print(f"TTFT p50 {s['ttft_p50_s'] * 1e3:.1f} ms, p95 {s['ttft_p95_s'] * 1e3:.1f} ms; "
          f"TPOT p50 {s['tpot_p50_s'] * 1e3:.1f} ms, p95 {s['tpot_p95_s'] * 1e3:.1f} ms")
    return 0
