"""Decode step time of the single-stage engine against `transformers` on the same random checkpoint.

Both run greedy decode over a prefilled prompt with the same dtype and thread count (transformers
with its KV cache and SDPA attention); each cell is the median of 5 timed runs after a warm-up.
Ours runs twice: with the KV pool in one slab (as `generate` sizes it) and in the 64-block slabs a
resizable agent pool uses. Writes bench/results/engine.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import LlamaForCausalLM

from pipeshift.api import Layout
from pipeshift.runtime.kv import SeqSpan
from pipeshift.runtime.model.checkpoint import ModelDir
from pipeshift.runtime.model.make_model import make_model
from pipeshift.runtime.pipeline import Pipeline
from pipeshift.runtime.threads import configure_threads

MODELS = {
    "4L-h256": {"layers": 4, "hidden": 256, "heads": 4, "kv_heads": 2, "intermediate": 704, "vocab": 2048},
    "8L-h512": {"layers": 8, "hidden": 512, "heads": 8, "kv_heads": 4, "intermediate": 1408, "vocab": 2048},
}
BATCHES = (1, 8)
PROMPT_TOKENS = 32
STEPS = 32
RUNS = 5
RESULTS = Path(__file__).parent / "results" / "engine.json"
logger = logging.getLogger("bench.engine")


Step = tuple[float, float]  # seconds per decode step: wall clock, and CPU time of this process


def _interleaved_medians(runners: dict[str, Callable[[], Step]]) -> dict[str, Step]:
    """Runs alternate between engines so load from other processes hits all of them alike; CPU time
    is reported too because on a shared host it is far less noisy than the wall clock."""
    samples: dict[str, list[Step]] = {name: [] for name in runners}
    for attempt in range(RUNS + 1):
        for name, run_once in runners.items():
            step = run_once()
            if attempt:  # the first round warms allocators, kernels and the rope table
                samples[name].append(step)
    return {name: (statistics.median(w for w, _ in values), statistics.median(c for _, c in values))
            for name, values in samples.items()}


def _clock() -> Step:
    return time.perf_counter(), time.process_time()


def _per_step(started: Step) -> Step:
    wall, cpu = _clock()
    return (wall - started[0]) / STEPS, (cpu - started[1]) / STEPS


def ours(model: ModelDir, prompts: torch.Tensor, dtype: torch.dtype, slab_blocks: int) -> Callable[[], Step]:
    pipeline = Pipeline(model, Layout.from_sizes([model.config.num_layers]), dtype=dtype, slab_blocks=slab_blocks)
    batch = prompts.shape[0]
    seq_ids = iter(range(10**9))

    def run_once() -> Step:
        ids = [next(seq_ids) for _ in range(batch)]
        for seq in ids:
            pipeline.reserve(seq, PROMPT_TOKENS + STEPS + 1)
        logits = pipeline.forward([SeqSpan(s, 0, PROMPT_TOKENS) for s in ids], prompts.reshape(-1))
        started = _clock()
        for step in range(STEPS):
            tokens = logits.argmax(-1)
            logits = pipeline.forward([SeqSpan(s, PROMPT_TOKENS + step, 1) for s in ids], tokens)
        elapsed = _per_step(started)
        for seq in ids:
            pipeline.release(seq)
        return elapsed

    return run_once


def reference(path: Path, prompts: torch.Tensor, dtype: torch.dtype) -> Callable[[], Step]:
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()

    @torch.inference_mode()
    def run_once() -> Step:
        out = model(prompts, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
        started = _clock()
        for _ in range(STEPS):
            tokens = logits.argmax(-1, keepdim=True)
            out = model(tokens, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
        return _per_step(started)

    return run_once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch threads for both engines (default: as pipeshift picks)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    transformers.logging.set_verbosity_error()
    threads = configure_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in MODELS.items():
            path = make_model(Path(tmp) / name, seed=0, **shape)
            model = ModelDir(path)
            for batch in BATCHES:
                gen = torch.Generator().manual_seed(batch)
                prompts = torch.randint(2, shape["vocab"], (batch, PROMPT_TOKENS), generator=gen)
                runners = {
                    "pipeshift": ours(model, prompts, dtype, slab_blocks=1024),
                    "pipeshift_small_slabs": ours(model, prompts, dtype, slab_blocks=64),
                    "transformers": reference(path, prompts, dtype),
                }
                t = _interleaved_medians(runners)
                rows.append({"model": name, "batch": batch,
                             **{f"{engine}_ms": round(wall * 1e3, 3) for engine, (wall, _) in t.items()},
                             **{f"{engine}_cpu_ms": round(cpu * 1e3, 3) for engine, (_, cpu) in t.items()},
                             "speedup": round(t["transformers"][0] / t["pipeshift"][0], 2),
                             "cpu_speedup": round(t["transformers"][1] / t["pipeshift"][1], 2)})
                logger.info("%s batch %d: %s", name, batch, rows[-1])
    print(f"decode step in ms (median of {RUNS}; CPU time in brackets), {args.dtype}, {threads} threads, "
          f"prompt {PROMPT_TOKENS}, {STEPS} steps")
    print(f"{'model':<9}{'batch':>6}{'pipeshift':>20}{'64-block slabs':>20}{'transformers':>20}{'speedup':>16}")
    for r in rows:
        cells = [f"{r[f'{e}_ms']:.3f} ({r[f'{e}_cpu_ms']:.3f})"
                 for e in ("pipeshift", "pipeshift_small_slabs", "transformers")]
        speedup = f"{r['speedup']:.2f} ({r['cpu_speedup']:.2f})"
        print(f"{r['model']:<9}{r['batch']:>6}{cells[0]:>20}{cells[1]:>20}{cells[2]:>20}{speedup:>16}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"dtype": args.dtype, "threads": threads, "prompt_tokens": PROMPT_TOKENS, "steps": STEPS, "runs": RUNS,
            "torch": torch.__version__, "transformers": transformers.__version__}
    args.out.write_text(json.dumps({"config": meta, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
