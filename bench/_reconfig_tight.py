"""The memory-tight scenario: every stage has a fixed memory (`--memory-bytes`) that its weights mostly fill, so
requests queue for the few KV blocks left, and a layout change gives layers away; run with pool resizing
(`live`) and without it (`live-no-resize`).

Each stage's memory is the weights of 4 layers of the bench model plus the head (the larger of the first and
last stages' extras) plus a pool that holds the `background` requests and exactly `concurrent` burst requests
over those 4 layers, in whole slabs. The background requests stream through the change (so KV moves); right
after the change returns a burst of `burst` requests arrives at once and queues for blocks. TTFT of the burst
is what the layout's real capacity decides: `resize_ttft_ratio` = burst TTFT without resizing ÷ burst TTFT
with it (p50 and p95 alike; the headline uses p95).

What it shows: in `4,4 → 3,3,2` stage 0 gives one layer away and stage 1 two. With `live` the commit turns
their weights' memory into KV (each pool becomes memory − the weights it now holds, `agent/epoch.planned_pool`):
with the defaults every pool starts at one slab (64 blocks) and stage 0, which binds, ends at 3, so it serves
about three times the burst requests at once; with `live-no-resize` the pools keep their launch size and the
freed memory sits idle. A stage the change adds starts with memory − its weights either way. The burst's
requests decode long (112 tokens after a 16-token prompt) so that TTFT is decided by waiting for blocks.

A change in which a stage takes layers (`4,4 → 3,5`) is not run: without resizing, its weights cannot fit
beside an unchanged pool, so that change is refused and aborts (`tests/test_memory_budget.py`).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _reconfig_measure import p
from _reconfig_run import ClientPlan, change, client, progress, prompts, running_pipeline

from pipeshift.local.processes import http_json
from pipeshift.placement.profile import ModelProfile

SLAB_BLOCKS = 64  # the agent pool's slab: it allocates and frees whole slabs
# Strategy names as `_reconfig_run.STRATEGIES` knows them: both use reconfigure's default switch.
TIGHT_STRATEGIES = {"live": "live-default", "live-no-resize": "live-no-resize"}


@dataclass(frozen=True)
class Tight:
    old: str = "4,4"
    scenarios: tuple[str, ...] = ("3,3,2",)
    background: int = 1
    background_prompt: int = 32
    background_max_tokens: int = 96
    burst: int = 32
    burst_prompt: int = 16
    burst_max_tokens: int = 112
    concurrent: int = 1
    seed: int = 7

    def kv_bytes(self, block_size: int, block_bytes: int, layers: int = 4) -> int:
        """A pool that holds the background requests and `concurrent` burst requests over `layers` layers,
        rounded up to whole slabs as the agent's pool allocates them (so the bytes given are the pool's)."""
        per_layer = (self.background * math.ceil((self.background_prompt + self.background_max_tokens) / block_size)
                     + self.concurrent * math.ceil((self.burst_prompt + self.burst_max_tokens) / block_size))
        return math.ceil(per_layer * layers / SLAB_BLOCKS) * SLAB_BLOCKS * block_bytes

    def memory_bytes(self, model_dir: Path, block_size: int, block_bytes: int, layers: int = 4) -> int:
        """Each stage's memory: the float32 weights of `layers` layers and the head and final norm, plus the pool
        of `kv_bytes`. A 4-layer stage's weights then leave exactly that pool (a first stage's embeddings are
        no larger than the head and norm)."""
        model = ModelProfile.from_path(model_dir, "float32")
        weights = layers * model.layer_weight_bytes + model.head_bytes
        return weights + self.kv_bytes(block_size, block_bytes, layers)


def pools(urls: dict[int, str], token: str | None) -> dict[str, int]:
    return {str(sid): int(http_json(url + "/info", token=token)[1]["kv"]["total_blocks"])
            for sid, url in sorted(urls.items())}


def run_tight(model_dir: Path, name: str, to: str, tight: Tight, vocab: int, block: tuple[int, int],
              label: str) -> dict[str, Any]:
    memory = tight.memory_bytes(model_dir, *block)
    # The added stage starts before the load, so the change begins while the background requests still stream.
    with running_pipeline(model_dir, tight.old, memory_bytes=memory, prestart_for=to) as running:
        background = [(q, tight.background_max_tokens)
                      for q in prompts(tight.background, tight.background_prompt, vocab, tight.seed)]
        plan = ClientPlan(running.frontend.url, background, 0.0, 1, 1, vocab, tight.seed)
        with client(plan) as c:
            c.expect("prefilled")
            before = pools(running.pipeline.urls, running.token)
            report, start, end = change(running, to, TIGHT_STRATEGIES[name])
            burst = [(q, tight.burst_max_tokens)
                     for q in prompts(tight.burst, tight.burst_prompt, vocab, tight.seed + 1)]
            c.conn.send(("burst", burst))
            after = pools(running.pipeline.urls, running.token)
            records = c.finish()
    ttft = [r["token_times"][0] - r["sent"] for r in records if r["kind"] == "burst" and r["token_times"]]
    lost = sum(1 for r in records if r["finish"] not in ("stop", "length"))
    progress(f"  {label}: {report['outcome']}, burst TTFT p95 {1e3 * (p(ttft, 0.95) or 0):.0f} ms, pools {before} -> "
             f"{after}")
    return {
        "outcome": report["outcome"], "error": report["error"], "switch": report["switch"],
        "switch_duration_ms": (end - start) * 1e3, "kv_bytes_moved": report["kv_bytes_moved"],
        "memory_bytes": memory, "pool_blocks_before": before, "pool_blocks_after": after,
        "burst_ttft_p50_ms": None if not ttft else 1e3 * statistics.median(ttft),
        "burst_ttft_p95_ms": None if not ttft else 1e3 * (p(ttft, 0.95) or 0.0),
        "requests": len(records), "requests_lost": lost, "at": time.time(),
    }
