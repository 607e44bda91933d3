"""Loads request traces in the Azure LLM inference CSV format (`TIMESTAMP,ContextTokens,GeneratedTokens`)
as replayable requests whose lengths fit the served model.
"""

from __future__ import annotations

import argparse
import csv
import random
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from pipeshift.errors import UserError
from pipeshift.local.loadgen import PlannedRequest

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def load_trace(path: Path, *, requests: int, vocab: int, context: int, max_prompt: int, max_tokens: int,
               seed: int = 0, speedup: float = 1.0) -> list[PlannedRequest]:
    """The first `requests` rows: arrivals relative to the first row divided by `speedup`; lengths scaled
    down together so the longest prompt is at most `max_prompt` and output at most `max_tokens`, and
    each request fits `context`. Prompt token ids are random (traces carry lengths only)."""
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not set(COLUMNS) <= set(reader.fieldnames):
                raise UserError(f"--trace {path}: expected the header {','.join(COLUMNS)}, got {reader.fieldnames}")
            rows = []
            for number, row in enumerate(reader, start=2):
                if len(rows) == requests:
                    break
                try:
                    rows.append((datetime.fromisoformat(row["TIMESTAMP"].strip()[:26]),
                                 int(row["ContextTokens"]), int(row["GeneratedTokens"])))
                except (TypeError, ValueError) as error:
                    raise UserError(f"--trace {path} line {number}: {error}") from None
    except OSError as error:
        raise UserError(f"--trace {path}: {error.strerror}") from None
    if not rows:
        raise UserError(f"--trace {path}: no requests in it")
    rng = random.Random(seed)
    first = min(r[0] for r in rows)
    prompt_scale = min(1.0, max_prompt / max(max(r[1] for r in rows), 1))
    output_scale = min(1.0, max_tokens / max(max(r[2] for r in rows), 1))
    planned = []
    for stamp, ctx, gen in sorted(rows):
        out = max(1, min(round(gen * output_scale), context - 1))
        prompt = max(1, min(round(ctx * prompt_scale), context - out))
        planned.append(PlannedRequest((stamp - first).total_seconds() / speedup,
                                      [rng.randrange(2, vocab) for _ in range(prompt)], out))
    return planned


def workload(args: argparse.Namespace, vocab: int, context: int,
             synthetic: Callable[..., list[PlannedRequest]]) -> list[PlannedRequest]:
    """The demo's requests: replayed from `--trace` when given, else `synthetic(requests, rate, ...)`."""
    if args.requests < 1 or args.rate <= 0 or args.speedup <= 0:
        raise UserError("--requests, --rate and --speedup must be positive")
    if args.trace is not None:
        return load_trace(args.trace, requests=args.requests, vocab=vocab, context=context,
                          max_prompt=args.prompt_tokens, max_tokens=args.max_tokens, seed=args.seed,
                          speedup=args.speedup)
    return synthetic(args.requests, args.rate, seed=args.seed, vocab=vocab, prompt_tokens=args.prompt_tokens,
                     max_tokens=args.max_tokens)
