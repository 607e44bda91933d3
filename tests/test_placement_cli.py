"""`pipeshift plan`: the table, the `--json` and `--current` contract, and infeasible requests."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeshift.cli import main

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
            "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "torch_dtype": "bfloat16"}
POOLS = "pools:\n  - {name: cheap, gpu: l4, count: 4}\n  - {name: fast, gpu: l40s, count: 2, cost_per_hour: 1.1}\n"


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "llama-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_8B))
    pools = tmp_path / "pools.yaml"
    pools.write_text(POOLS)
    return model, pools


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_has_the_contract_shape(files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model, pools = files
    code, out, _ = run(capsys, "--model", str(model), "--pools", str(pools), "--rate", "2", "--prompt-len", "512",
                       "--output-len", "128", "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) == {"stages", "predicted"}
    assert all(set(s) == {"pool", "layers"} for s in data["stages"])
    ranges = [tuple(s["layers"]) for s in data["stages"]]
    assert ranges[0][0] == 0 and ranges[-1][1] == 32  # end exclusive
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert {s["pool"] for s in data["stages"]} <= {"cheap", "fast"}
    predicted = data["predicted"]
    for key in ("ttft_p95_s", "tpot_p95_s", "throughput_tokens_per_s", "cost_per_hour", "slo_met", "stages"):
        assert key in predicted
    assert all(s["memory_bytes"]["total"] <= s["memory_bytes"]["capacity"] for s in predicted["stages"])


def test_current_reads_the_json_it_wrote_and_keeps_it(files: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:
    model, pools = files
    args = ["--model", str(model / "config.json"), "--pools", str(pools), "--rate", "2", "--prompt-len", "512",
            "--output-len", "128", "--json"]
    _, first, _ = run(capsys, *args)
    current = tmp_path / "plan.json"
    current.write_text(first)
    code, second, _ = run(capsys, *args, "--current", str(current))
    assert code == 0
    assert json.loads(second)["stages"] == json.loads(first)["stages"]
    assert json.loads(second)["predicted"]["bytes_moved"] == 0


def test_the_table_lists_each_stage_and_the_predictions(files: tuple[Path, Path],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    model, pools = files
    code, out, _ = run(capsys, "--model", str(model), "--pools", str(pools), "--rate", "1", "--prompt-len", "256",
                       "--output-len", "64", "--mode", "cost")
    assert code == 0
    lines = out.splitlines()
    assert "cost mode" in lines[0]
    rows = [line for line in lines if line.split() and line.split()[0].isdigit()]
    assert rows and all(line.split()[1] in ("cheap", "fast") for line in rows)
    assert any(line.startswith("TTFT p95") for line in lines) and any("$" in line for line in lines)


def test_an_infeasible_request_exits_non_zero_with_the_reason(files: tuple[Path, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = files
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text("pools:\n  - {name: one, gpu: l4, count: 1, memory_gb: 8}\n")
    code, out, err = run(capsys, "--model", str(model), "--pools", str(tiny), "--rate", "1", "--prompt-len", "256",
                         "--output-len", "64")
    assert code != 0 and out == ""
    assert "needs 16 GB of weights; pools offer 8 GB" in err


@pytest.mark.parametrize(("text", "message"), [
    ("pools:\n  - {name: a, gpu: h100, count: 1}\n", "pools.0: gpu 'h100' is not in the catalogue; use one of"),
    ("pools:\n  - {name: a, gpu: l4, count: 1, memory: 3}\n", "pools.0.memory: unknown key 'memory'; valid keys"),
    ("pools:\n  - {name: a, gpu: l4, count: 0}\n", "pools.0.count: Input should be greater than or equal to 1"),
    ("pools: []\n", "pools: List should have at least 1 item"),
])
def test_a_bad_pools_file_names_the_field(files: tuple[Path, Path], tmp_path: Path, text: str, message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = files
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    code, _, err = run(capsys, "--model", str(model), "--pools", str(bad), "--rate", "1", "--prompt-len", "256",
                       "--output-len", "64")
    assert code != 0 and f"{bad}: {message}" in err


def test_plan_never_loads_torch(files: tuple[Path, Path]) -> None:
    model, pools = files
    code = ("import sys; from pipeshift.cli import main; "
            f"rc = main(['plan', '--model', {str(model)!r}, '--pools', {str(pools)!r}, '--rate', '1', "
            "'--prompt-len', '64', '--output-len', '16', '--json']); "
            "assert rc == 0; assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
