"""`pipeshift demo --json` as a user runs it: a live change under load that loses no request, changes no
token against the reference run on the old layout, and is timed while at least 8 requests stream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_demo_changes_the_layout_live_losing_nothing_and_matching_the_reference(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipeshift.cli", "demo", "--json", "--workdir", str(tmp_path), "--requests", "16",
         "--rate", "60", "--max-tokens", "24", "--prompt-tokens", "16"],
        capture_output=True, text=True, timeout=240, env=os.environ | {"PIPESHIFT_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert (result["strategy"], result["from"], result["to"], result["outcome"]) == ("live", "4,4", "3,3,2",
                                                                                   "committed")
    assert result["requests_completed"] == 16 and result["requests_lost"] == 0
    assert result["tokens_recomputed"] == 0 and result["weights_bytes_moved"] > 0
    assert result["requests_spanning_switch"] >= 8
    assert result["outputs_match_reference"] and result["near_tie_divergences"] == 0
    assert result["precopy_rounds"] >= 1 and result["kv_bytes_moved"] >= 0
    assert result["switch_duration_ms"] > 0 and result["pause_ms"] >= 0
    for part in ("steady", "switch_window"):
        assert set(result[part]) == {"ttft_p50_ms", "ttft_p95_ms", "tpot_p50_ms", "tpot_p95_ms"}


def test_demo_rejects_an_unknown_strategy_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pipeshift.cli", "demo", "--strategy", "teleport",
                           "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "teleport" in done.stderr and "live-no-resize" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
