"""The memory-tight scenario: KV pools so small that requests queue for blocks, and a layout change that
changes each stage's layer count, run with pool resizing (`live`) and without it (`live-no-resize`).

Each stage's pool holds the `background` requests plus exactly `concurrent` burst requests while it serves
4 layers. The background requests stream through the change (so KV moves); right after the change returns
a burst of `burst` requests arrives at once and queues for blocks. TTFT of the burst is what a layout's
real capacity decides: `resize_ttft_ratio` = burst TTFT without resizing ÷ burst TTFT with it (p50 and p95
alike; the headline uses p95).

What resizing does in pipeshift (`agent/reconfig.py`, commit with `resize`): a pool is layer-agnostic, so
blocks freed by departing layers serve the staying layers with or without resizing; resizing then sets
each pool to its old blocks-per-layer × its new layer count, growing stages that gained layers and
shrinking those that lost some. Both scenarios run so the table shows either side of that.
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

SLAB_BLOCKS = 64  # the agent pool's slab: it allocates and frees whole slabs
# Strategy names as `_reconfig_run.STRATEGIES` knows them: both use reconfigure's default switch.
TIGHT_STRATEGIES = {"live": "live-default", "live-no-resize": "live-no-resize"}


@dataclass(frozen=True)
class Tight:
    old: str = "4,4"
    scenarios: tuple[str, ...] = ("3,3,2", "3,5")
    background: int = 2
    background_prompt: int = 192
    background_max_tokens: int = 256
    burst: int = 24
    burst_prompt: int = 192
    burst_max_tokens: int = 64
    concurrent: int = 6
    seed: int = 7

    def kv_bytes(self, block_size: int, block_bytes: int, layers: int = 4) -> int:
        """A pool that holds the background requests and `concurrent` burst requests over `layers` layers,
        rounded up to whole slabs as the agent's pool allocates them (so the bytes given are the pool's)."""
        per_layer = (self.background * math.ceil((self.background_prompt + self.background_max_tokens) / block_size)
                     + self.concurrent * math.ceil((self.burst_prompt + self.burst_max_tokens) / block_size))
        return math.ceil(per_layer * layers / SLAB_BLOCKS) * SLAB_BLOCKS * block_bytes


def pools(urls: dict[int, str], token: str | None) -> dict[str, int]:
    return {str(sid): int(http_json(url + "/info", token=token)[1]["kv"]["total_blocks"])
            for sid, url in sorted(urls.items())}


def run_tight(model_dir: Path, name: str, to: str, tight: Tight, vocab: int, block: tuple[int, int],
              label: str) -> dict[str, Any]:
    kv_bytes = tight.kv_bytes(*block)
    with running_pipeline(model_dir, tight.old, kv_bytes) as running:
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
        "pool_blocks_before": before, "pool_blocks_after": after,
        "burst_ttft_p50_ms": None if not ttft else 1e3 * statistics.median(ttft),
        "burst_ttft_p95_ms": None if not ttft else 1e3 * (p(ttft, 0.95) or 0.0),
        "requests": len(records), "requests_lost": lost, "at": time.time(),
    }
