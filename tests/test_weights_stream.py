"""Weights streamed from the source stage (`weights="source"`): a target whose checkpoint directory lacks the
shard of the layer it takes over still completes the change, with exact float64 outputs, because it fetched
that layer from the stage that computed it — and the same change reading the checkpoint aborts.

Stage 0 runs from the whole checkpoint; stage 1 from a copy without `model-00002-of-00004.safetensors`
(layers 2-3). `4,4 → 3,5` moves layer 3 from stage 0 to stage 1. Agents and frontend share a control
token, so the target's fetch is authenticated like every control call.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from _streaming import assert_exact, assert_holds_exactly, oracle, recomputed, spanning, stats, streaming, under_load
from safetensors import safe_open
from safetensors.torch import load as load_safetensors

from pipeshift.api import Layout, StagePlan, plan_moves
from pipeshift.control import reconfigure
from pipeshift.errors import UserError
from pipeshift.local.processes import LocalAgents, http_json, start_agents
from pipeshift.runtime.frontend.background import BackgroundFrontend
from pipeshift.runtime.frontend.config import FrontendConfig
from pipeshift.runtime.model.checkpoint import layer_keys
from pipeshift.runtime.model.make_model import make_model

LAYERS = 8
VOCAB = 300
TOKEN = "weights-test-token"
MISSING_SHARD = "model-00002-of-00004.safetensors"  # layers 2 and 3 of 8 over 4 shards


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The whole checkpoint, and a copy lacking the shard that holds layers 2-3."""
    root = tmp_path_factory.mktemp("weights")
    full = make_model(root / "full", layers=LAYERS, hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=VOCAB,
                      seed=21, shards=4)
    partial = root / "partial"
    shutil.copytree(full, partial)
    (partial / MISSING_SHARD).unlink()
    return full, partial


class TwoStages:
    """`4,4` with each stage started from its own checkpoint directory, behind a frontend."""

    def __init__(self, full: Path, partial: Path) -> None:
        self.groups: list[LocalAgents] = []
        for stage, model in ((StagePlan(0, "local", 0, 4), full), (StagePlan(1, "local", 4, 8), partial)):
            self.groups.append(start_agents(model, [stage], dtype="float64", kv_bytes=8 << 20, threads=1,
                                            token=TOKEN))
        self.urls = {g.agents[0].stage_id: g.agents[0].control_url for g in self.groups}
        config = FrontendConfig(model_dir=full, port=0, control_token=TOKEN,
                                stages=tuple(u.removeprefix("http://") for u in self.urls.values()))
        self.frontend = BackgroundFrontend(config)

    def close(self) -> None:
        self.frontend.stop()
        for group in self.groups:
            group.stop()


@pytest.fixture
def pipeline(model_dirs: tuple[Path, Path]) -> Iterator[TwoStages]:
    running = TwoStages(*model_dirs)
    try:
        yield running
    finally:
        running.close()


def layer_bytes(model: Path, layer: int, dtype: torch.dtype) -> int:
    """The layer's weights in `dtype`, from the checkpoint's own tensor shapes."""
    total = 0
    for shard in model.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k in layer_keys(layer))  # noqa: SIM118
    return total * torch.finfo(dtype).bits // 8


def get(url: str, token: str | None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def test_the_source_serves_its_layers_as_checkpoint_tensors_behind_the_token(
        pipeline: TwoStages, model_dirs: tuple[Path, Path]) -> None:
    source = pipeline.urls[0]
    status, payload = get(f"{source}/reconfig/weights?layers=3,0", TOKEN)
    assert status == 200, payload
    served = load_safetensors(payload)
    with safe_open(str(model_dirs[0] / "model-00001-of-00004.safetensors"), framework="pt") as first, \
            safe_open(str(model_dirs[0] / MISSING_SHARD), framework="pt") as second:
        expected = {k: first.get_tensor(k) for k in first.keys() if k.startswith("model.layers.0.")}  # noqa: SIM118 (safe_open is not iterable)
        expected |= {k: second.get_tensor(k) for k in second.keys() if k.startswith("model.layers.3.")}  # noqa: SIM118
        expected["model.embed_tokens.weight"] = first.get_tensor("model.embed_tokens.weight")
    assert set(served) == set(expected)  # layer 0 brings the embeddings; nothing else comes along
    for key, tensor in expected.items():
        assert served[key].dtype == torch.float64 and torch.equal(served[key], tensor.to(torch.float64)), key
    assert get(f"{source}/reconfig/weights?layers=3", None)[0] == 401
    assert get(f"{source}/reconfig/weights?layers=3", "wrong")[0] == 401
    status, answer = get(f"{source}/reconfig/weights?layers=5", TOKEN)
    assert status == 409 and b"[0, 4)" in answer
    status, answer = get(f"{source}/reconfig/weights?layers=three", TOKEN)
    assert status == 400 and b"layers" in answer


def test_a_target_without_the_shard_takes_the_layer_from_the_source_and_outputs_stay_exact(
        pipeline: TwoStages, model_dirs: tuple[Path, Path]) -> None:
    full, _ = model_dirs
    plan = plan_moves(Layout.parse("4,4"), Layout.parse("3,5"))
    assert [(m.layer, m.src_stage, m.dst_stage) for m in plan.moves] == [(3, 0, 1)]
    before = stats(pipeline.urls[1], TOKEN)

    # Reading the checkpoint cannot work on this target: the change aborts naming the missing shard.
    refused = reconfigure(pipeline.frontend.url, dict(pipeline.urls), plan, token=TOKEN)
    assert refused.outcome == "aborted" and MISSING_SHARD in str(refused.error), refused.error
    assert_holds_exactly(pipeline.urls, plan.old, TOKEN)

    def change(requests: list) -> object:
        return reconfigure(pipeline.frontend.url, dict(pipeline.urls), plan, token=TOKEN, weights="source",
                           before_hold=streaming(requests, at_least=2))

    report, requests = under_load(pipeline.frontend.url, change, random.Random(7), VOCAB)
    assert report.outcome == "committed", report.error
    assert spanning(requests, report) >= 2
    assert_exact(requests, oracle(full))
    assert_holds_exactly(pipeline.urls, plan.new, TOKEN)
    after = stats(pipeline.urls[1], TOKEN)
    # Layer 3 arrived over the network, in float64; nothing more was read from the checkpoint after start-up.
    assert after["weights_bytes_received"] == layer_bytes(full, 3, torch.float64) > 0
    assert after["weights_bytes_loaded"] == before["weights_bytes_loaded"] == after["weights_bytes_initial"]
    assert stats(pipeline.urls[0], TOKEN)["weights_bytes_received"] == 0
    assert recomputed(list(pipeline.urls.values()), [report], requests, LAYERS, TOKEN) == 0


def test_weights_from_the_source_are_refused_for_a_restart_and_an_unknown_source_is_named() -> None:
    plan = plan_moves(Layout.parse("4,4"), Layout.parse("3,5"))
    urls = {0: "http://127.0.0.1:9", 1: "http://127.0.0.1:9"}
    with pytest.raises(UserError, match="restart"):
        reconfigure("http://127.0.0.1:9", urls, plan, strategy="restart", weights="source")
    with pytest.raises(UserError, match=r"'disk'.*checkpoint, source"):
        reconfigure("http://127.0.0.1:9", urls, plan, weights="disk")


def test_pipeshift_reconfigure_weights_source_streams_the_layer_of_a_served_pipeline(
        model_factory: Callable[..., Path]) -> None:
    """`pipeshift serve` on 2,2, then `pipeshift reconfigure --to 1,3 --weights source`: layer 1 reaches stage 1
    over the network, and a request served afterwards has the oracle's tokens."""
    model = model_factory(layers=4)
    env = os.environ | {"PIPESHIFT_THREADS": "1"}
    cli = [sys.executable, "-m", "pipeshift.cli"]
    serve = subprocess.Popen([*cli, "serve", "--model", str(model), "--layout", "2,2", "--port", "0", "--dtype",
                              "float64"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        serving, endpoint = serve.stdout.readline(), serve.stdout.readline()  # type: ignore[union-attr]
        assert endpoint.startswith("reconfigure endpoint on "), serving + endpoint
        url, endpoint = serving.split(" on ", 1)[1].strip(), endpoint.split(" on ", 1)[1].strip()
        done = subprocess.run([*cli, "reconfigure", "--frontend", url, "--to", "1,3", "--weights", "source", "--json"],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout)["layout"] == "1,3"
        stages = http_json(endpoint + "/layout")[1]["stages"]
        assert stats(stages["1"])["weights_bytes_received"] == layer_bytes(model, 1, torch.float64)
        assert stats(stages["0"])["loaded_layers"] == [0]
        prompt = [3, 14, 15, 92, 65]
        status, answer = http_json(url + "/v1/completions", "POST", {"prompt": prompt, "max_tokens": 12,
                                   "temperature": 0, "ignore_eos": True, "return_token_ids": True})
        assert status == 200 and answer["choices"][0]["token_ids"] == oracle(model)(prompt, 12)
    finally:
        serve.terminate()
        serve.wait(timeout=60)
