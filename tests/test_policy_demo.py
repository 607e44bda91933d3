"""`pipeshift demo --policy`: a policy changes a local pipeline's layout live while load rises and falls,
each decision reported with its reason, and no request is lost; plus the load shape and the start layout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeshift.errors import UserError
from pipeshift.local.policy_demo import initial_layout, rising_and_falling
from pipeshift.policy import parse_policy

# A TPOT target no CPU pipeline meets: the first window with finished streams is a breach, so the
# policy must scale up while requests stream, and scale back down once the load has gone.
TIGHT_POLICY = {
    "name": "tight", "mode": "latency",
    "targets": {"ttft_p95_seconds": 5.0, "tpot_p95_seconds": 0.001, "max_queue": 64},
    "stages": {"min": 1, "max": 3}, "pools": [{"name": "cpu"}],
    "scale_up": {"stabilization_seconds": 0, "cooldown_seconds": 1},
    "scale_down": {"stabilization_seconds": 1, "cooldown_seconds": 1},
    "reconfiguration": {"max_switches_per_hour": 60},
    "metrics": {"interval_seconds": 0.5, "scrape": {"url": "http://127.0.0.1:1/metrics"}},
}


def test_a_breaching_policy_changes_the_layout_live_and_reports_why_losing_nothing(tmp_path: Path) -> None:
    policy = tmp_path / "tight.yaml"
    policy.write_text(yaml.safe_dump(TIGHT_POLICY))
    done = subprocess.run(
        [sys.executable, "-m", "pipeshift.cli", "demo", "--policy", str(policy), "--json", "--workdir",
         str(tmp_path), "--requests", "24", "--rate", "8", "--max-tokens", "24", "--prompt-tokens", "16",
         "--linger", "3"],
        capture_output=True, text=True, timeout=120, env=os.environ | {"PIPESHIFT_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["requests"] == 24 and result["requests_completed"] == 24 and result["requests_lost"] == 0
    assert result["start"] == "8"
    decisions = result["decisions"]
    for d in decisions:
        assert set(d) == {"at_s", "kind", "from", "to", "reason", "outcome", "pause_ms", "error"}
        assert d["reason"].strip()
    committed = [d for d in decisions if d["outcome"] == "committed"]
    assert committed, decisions
    first = committed[0]
    assert first["kind"] == "scale_up" and "TPOT" in first["reason"] and first["to"].count(",") >= 1
    assert first["pause_ms"] is not None and first["pause_ms"] >= 0
    # The changes chain: each starts where the previous one left the pipeline, and the last is what runs.
    at = result["start"]
    for d in committed:
        assert d["from"] == at, decisions
        at = d["to"]
    assert result["final"] == at
    assert [d["at_s"] for d in decisions] == sorted(d["at_s"] for d in decisions)


def test_the_synthetic_load_rises_then_falls_like_a_triangle() -> None:
    n, peak = 4000, 50.0
    planned = rising_and_falling(n, peak, seed=1, vocab=100, prompt_tokens=8, max_tokens=8)
    arrivals = [p.arrival_s for p in planned]
    span = 2 * n / peak
    assert len(planned) == n and arrivals == sorted(arrivals) and arrivals[0] >= 0 and arrivals[-1] <= span
    # A triangle puts 1/8 of its mass in each outer quarter and 3/8 in each inner one.
    quarters = [sum(1 for a in arrivals if q * span / 4 <= a < (q + 1) * span / 4) / n for q in range(4)]
    for got, want in zip(quarters, (1 / 8, 3 / 8, 3 / 8, 1 / 8), strict=True):
        assert abs(got - want) < 0.03, quarters
    assert all(4 <= len(p.prompt) <= 8 and 4 <= p.max_tokens <= 8 for p in planned)


@pytest.mark.parametrize(("stages", "layers"), [(1, 8), (3, 8), (4, 10), (5, 5)])
def test_the_start_layout_has_the_policys_minimum_stages_split_evenly(stages: int, layers: int) -> None:
    policy = parse_policy(yaml.safe_dump(TIGHT_POLICY | {"stages": {"min": stages}}))
    layout = initial_layout(policy, layers)
    assert len(layout) == stages and sum(layout.sizes) == layers
    assert max(layout.sizes) - min(layout.sizes) <= 1


def test_a_minimum_above_the_layer_count_is_refused_naming_both() -> None:
    policy = parse_policy(yaml.safe_dump(TIGHT_POLICY | {"stages": {"min": 9}}))
    with pytest.raises(UserError, match=r"stages\.min is 9.*only 8 layers"):
        initial_layout(policy, 8)
