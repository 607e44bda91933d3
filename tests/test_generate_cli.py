"""`pipeshift generate` (and `make-model`) on the command line: the output contract, greedy tokens
equal to `transformers`, and one-line errors (exit code 2) naming the file, key or flag at fault."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerFast

from pipeshift.cli import main
from pipeshift.errors import UserError
from pipeshift.runtime.threads import ENV_VAR, thread_count

PROMPT = "Return a new list containing"


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    threads = torch.get_num_threads()
    try:
        code = main(list(args))
    finally:
        torch.set_num_threads(threads)  # generate sets the process's threads; keep the test process at 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("mode", [[], ["--in-process"]], ids=["agent-processes", "in-process"])
def test_json_output_is_the_greedy_continuation_of_transformers(tiny_model: Path, hf_model: Callable,
                                                                capsys: pytest.CaptureFixture[str],
                                                                mode: list[str]) -> None:
    """By default the stages are agent processes behind the frontend (real sockets and HTTP)."""
    code, out, err = run_cli(capsys, "generate", "--model", str(tiny_model), "--layout", "2,1",
                             "--prompt", PROMPT, "--max-tokens", "10", "--dtype", "float64", "--json", *mode)
    assert (code, err) == (0, "")
    result = json.loads(out)
    assert set(result) == {"token_ids", "text"}
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_model)
    prompt = tokenizer(PROMPT).input_ids
    reference = hf_model(tiny_model, torch.float64).generate(torch.tensor([prompt]), max_new_tokens=10,
                                                             do_sample=False, pad_token_id=1)
    assert result["token_ids"] == reference[0, len(prompt) :].tolist()
    assert result["text"] == tokenizer.decode(result["token_ids"], skip_special_tokens=True)


def test_text_output_and_prompt_ids_agree_with_json(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["generate", "--model", str(tiny_model), "--prompt-ids", "0,17,42,99", "--max-tokens", "6"]
    code, out, _ = run_cli(capsys, *common, "--json")
    assert code == 0
    result = json.loads(out)
    assert 1 <= len(result["token_ids"]) <= 6
    code, out, _ = run_cli(capsys, *common, "--layout", "1,1,1")
    assert code == 0
    assert out == result["text"] + "\n"


def test_real_entry_point_runs_generate(tiny_model: Path) -> None:
    env = os.environ | {ENV_VAR: "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeshift.cli", "--debug", "generate", "--model", str(tiny_model),
                           "--prompt-ids", "5,6", "--max-tokens", "3", "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["token_ids"]) <= 3
    assert "torch uses 1 threads" in proc.stderr


def damaged(src: Path, dst: Path, edit: Callable[[Path], None]) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def edit_config(change: dict) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(config | change))

    return apply


def drop_tensor(key: str) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        tensors = load_file(str(path / "model.safetensors"))
        del tensors[key]
        save_file(tensors, str(path / "model.safetensors"))

    return apply


def remove(name: str) -> Callable[[Path], None]:
    return lambda path: (path / name).unlink()


def write(name: str, text: str) -> Callable[[Path], None]:
    return lambda path: (path / name).write_text(text)


def no_key(key: str) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        del config[key]
        (path / "config.json").write_text(json.dumps(config))

    return apply


@pytest.mark.parametrize(("edit", "expected"), [
    (remove("config.json"), ["config.json", "not found"]),
    (write("config.json", "{\n  \"hidden_size\": 64,\n"), ["config.json", "not valid JSON", "line 3"]),
    (no_key("num_hidden_layers"), ["config.json", "missing required key 'num_hidden_layers'"]),
    (edit_config({"hidden_act": "gelu"}), ["config.json", "hidden_act = 'gelu'", "'silu'"]),
    (edit_config({"attention_bias": True}), ["config.json", "attention_bias = True"]),
    (edit_config({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}), ["rope_type = 'yarn'", "'llama3'"]),
    (edit_config({"architectures": ["Qwen2ForCausalLM"]}), ["architectures = 'Qwen2ForCausalLM'"]),
    (remove("model.safetensors"), ["no model.safetensors or model.safetensors.index.json"]),
    (drop_tensor("model.layers.2.mlp.gate_proj.weight"),
     ["model.safetensors", "no tensor 'model.layers.2.mlp.gate_proj.weight'"]),
    (remove("tokenizer.json"), ["tokenizer.json", "not found"]),
], ids=["no-config", "bad-json", "no-key", "gelu", "attention-bias", "yarn", "architecture", "no-weights",
        "no-tensor", "no-tokenizer"])
def test_bad_model_directory_is_a_one_line_error(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 edit: Callable[[Path], None], expected: list[str]) -> None:
    model = damaged(tiny_model, tmp_path / "m", edit)
    code, out, err = run_cli(capsys, "generate", "--model", str(model), "--prompt", "hi", "--max-tokens", "2")
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("pipeshift generate: error: ")
    for fragment in expected:
        assert fragment in err


@pytest.mark.parametrize(("args", "expected"), [
    (["--layout", "2,2"], "covers 4 layers; the model has 3"),
    (["--layout", "2,x"], "comma-separated layer counts"),
    (["--prompt-ids", "1,300"], "token id 300 is outside the vocabulary 0..299"),
    (["--prompt-ids", "1,a"], "--prompt-ids '1,a' must be comma-separated integers"),
    (["--max-tokens", "0"], "--max-tokens 0 must be at least 1"),
    (["--max-tokens", "5000"], "max_position_embeddings"),
    (["--threads", "0"], "--threads 0 must be at least 1"),
])
def test_bad_flags_are_one_line_errors(tiny_model: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                       expected: str) -> None:
    base = {"--prompt-ids": "1,2", "--max-tokens": "3"}
    flags = [item for k, v in (base | dict(zip(args[::2], args[1::2], strict=True))).items() for item in (k, v)]
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_model), *flags)
    assert code == 2
    assert expected in err and err.count("\n") == 1


def test_missing_model_directory_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert code == 2
    assert f"{tmp_path / 'nope'}: not a model directory" in err


def test_make_model_cli_reports_bad_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "make-model", str(tmp_path / "m"), "--vocab", "100")
    assert code == 2
    assert "--vocab 100 is too small" in err


def test_thread_count_prefers_flag_then_env_then_cores_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    cpus = sorted(os.sched_getaffinity(0))
    assert thread_count(None, processes_on_host=1) == len(cpus)
    assert thread_count(None, processes_on_host=2 * len(cpus)) == 1  # never zero
    try:
        os.sched_setaffinity(0, cpus[:1])  # a container limited to one core
        assert thread_count(None, processes_on_host=1) == 1
    finally:
        os.sched_setaffinity(0, cpus)
    monkeypatch.setenv(ENV_VAR, "5")
    assert thread_count(None, processes_on_host=3) == 5
    assert thread_count(2, processes_on_host=3) == 2
    monkeypatch.setenv(ENV_VAR, "many")
    with pytest.raises(UserError, match=f"{ENV_VAR}='many' must be a positive integer"):
        thread_count(None)
