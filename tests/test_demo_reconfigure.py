"""`pipeshift demo --json` as a user runs it: a live change under load that loses no request, changes no token
against the reference run on the old layout (near-ties excepted outside float64), is timed while at least 8
requests stream across the switch, measures the weights it moved from the agents' counters, and draws the plot.
The `--json` fields that issue 4 names are a contract: every one is checked here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from pipeshift.runtime.model.checkpoint import layer_keys

# The fields issue 4 names for `pipeshift demo --json`, with their types.
CONTRACT: dict[str, type | tuple[type, ...]] = {
    "strategy": str, "switch": str, "from": str, "to": str, "requests_completed": int, "requests_lost": int,
    "requests_spanning_switch": int, "tokens_recomputed": int, "outputs_match_reference": bool,
    "near_tie_divergences": int, "pause_ms": float, "switch_duration_ms": float, "precopy_rounds": int,
    "kv_bytes_moved": int, "weights_bytes_moved": int, "steady": dict, "switch_window": dict,
}
LATENCY = {"ttft_p50_ms", "ttft_p95_ms", "tpot_p50_ms", "tpot_p95_ms"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def demo(*flags: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeshift.cli", "demo", *flags], capture_output=True, text=True,
                          timeout=timeout, env=os.environ | {"PIPESHIFT_THREADS": "1"})


def check_contract(result: dict[str, Any]) -> None:
    for name, kind in CONTRACT.items():
        assert isinstance(result.get(name), kind), (name, result.get(name))
    for part in ("steady", "switch_window"):
        assert set(result[part]) == LATENCY
        assert all(isinstance(v, float) and v > 0 for v in result[part].values()), result[part]


def layer_bytes(workdir: Path, layers: list[int], element_bytes: int) -> int:
    """The layers' weights at `element_bytes` per value, from the demo checkpoint's own tensor shapes."""
    (checkpoint,) = workdir.glob("model-*/model.safetensors")
    keys = {k for layer in layers for k in layer_keys(layer)}
    with safe_open(str(checkpoint), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in keys) * element_bytes


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One demo model for the runs below (the demo writes it on first use and reuses it)."""
    return tmp_path_factory.mktemp("demo")


def test_demo_changes_the_layout_live_losing_nothing_matching_the_reference_and_plots(
        workdir: Path, tmp_path: Path) -> None:
    plot = tmp_path / "latency.png"
    done = demo("--json", "--workdir", str(workdir), "--requests", "20", "--rate", "30", "--max-tokens", "32",
                "--prompt-tokens", "16", "--plot", str(plot))
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    result = json.loads(done.stdout)
    check_contract(result)
    assert (result["strategy"], result["switch"], result["from"], result["to"], result["outcome"]) == (
        "live", "epoch", "4,4", "3,3,2", "committed")
    assert result["requests_completed"] == 20 and result["requests_lost"] == 0
    assert result["tokens_recomputed"] == 0 and result["requests_spanning_switch"] >= 8
    assert result["outputs_match_reference"] and result["divergences"] == result["near_tie_divergences"] == 0
    assert result["precopy_rounds"] >= 1 and result["kv_bytes_moved"] > 0
    assert result["switch_duration_ms"] > 0 and result["pause_ms"] >= 0
    # The new middle stage loaded layers 3, 4 and 5 (float64) when it started; nothing else moved weights.
    assert result["weights_bytes_moved"] == layer_bytes(workdir, [3, 4, 5], 8)
    assert result["weights_bytes_streamed"] == 0 and result["stage_start_ms"] > 0
    png = plot.read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000 and result["plot"] == str(plot)
    assert result["plot_compared_switch"] == "drain"  # the plot puts the same change under drain beside it


def test_demo_in_float32_from_a_trace_with_weights_from_the_source(workdir: Path, tmp_path: Path) -> None:
    """A trace in the Azure format replayed 4× faster, `4,4 → 3,5` over the drain switch with layer 3 streamed
    from stage 0: the same guarantees, and divergences (if any) only at near-ties."""
    trace = tmp_path / "trace.csv"
    rows = [f"2023-11-16 18:15:{46 + i // 10}.{i % 10}00000,{300 + 37 * i},{40 + 13 * (i % 7)}" for i in range(24)]
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    done = demo("--json", "--workdir", str(workdir), "--trace", str(trace), "--speedup", "4", "--requests", "24",
                "--max-tokens", "48", "--prompt-tokens", "24", "--dtype", "float32", "--to", "3,5",
                "--weights", "source", "--switch", "drain")
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    result = json.loads(done.stdout)
    check_contract(result)
    assert (result["switch"], result["to"], result["weights"], result["outcome"]) == ("drain", "3,5", "source",
                                                                                     "committed")
    assert result["requests_completed"] == 24 and result["requests_lost"] == 0 and result["tokens_recomputed"] == 0
    assert result["requests_spanning_switch"] >= 8
    assert result["outputs_match_reference"] and result["near_tie_divergences"] == result["divergences"]
    # Layer 3 travelled from stage 0 to stage 1 in float32, over the network: the only weights that moved.
    assert result["weights_bytes_moved"] == result["weights_bytes_streamed"] == layer_bytes(workdir, [3], 4)
    assert result["stage_start_ms"] is None  # no stage was added


def test_demo_rejects_an_unknown_strategy_in_one_line(tmp_path: Path) -> None:
    done = demo("--strategy", "teleport", "--workdir", str(tmp_path), timeout=60)
    assert done.returncode == 2 and "teleport" in done.stderr and "live-no-resize" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_demo_refuses_a_workload_too_small_to_span_the_switch_naming_the_flags(tmp_path: Path) -> None:
    done = demo("--requests", "5", "--workdir", str(tmp_path), timeout=60)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--requests 5" in done.stderr and "--rate" in done.stderr and "8" in done.stderr
    assert not list(tmp_path.iterdir())  # refused before writing the model or starting anything


def test_demo_refuses_weights_from_the_source_for_a_restart(tmp_path: Path) -> None:
    done = demo("--strategy", "restart", "--weights", "source", "--workdir", str(tmp_path), timeout=60)
    assert done.returncode == 2 and "--weights source" in done.stderr and "restart" in done.stderr
