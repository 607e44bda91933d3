"""The agent's control API, driven over HTTP against a real agent process configured only by env vars.

The agent runs with a control token (from a file), so every protected route is also a token test.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeshift.local.processes import http_json, stop_processes
from pipeshift.runtime.model.make_model import make_model
from pipeshift.runtime.transport import FrameClient, HandshakeRefused

TOKEN = "s3cret-token"
HIDDEN, HEADS, KV_HEADS, LAYERS, VOCAB, BLOCK = 32, 4, 2, 4, 300, 8
KV_BYTES = 256 * 1024
# Independent of the code under test: K and V, block_size tokens, kv heads x head dim, float32.
BLOCK_BYTES = 2 * BLOCK * KV_HEADS * (HIDDEN // HEADS) * 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_model(
        tmp_path_factory.mktemp("control") / "tiny",
        layers=LAYERS,
        hidden=HIDDEN,
        heads=HEADS,
        kv_heads=KV_HEADS,
        intermediate=64,
        vocab=VOCAB,
        seed=3,
    )


def agent_env(model_dir: Path | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPESHIFT_")}
    if model_dir is not None:
        env["PIPESHIFT_MODEL"] = str(model_dir)
    return env | extra


class Agent:
    def __init__(self, process: subprocess.Popen[bytes], ports: dict[str, int]) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{ports['control_port']}"
        self.data_port = ports["data_port"]

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = TOKEN
    ) -> tuple[int, dict[str, Any]]:
        return http_json(self.url + path, method, body, token)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            return response.read().decode()


@pytest.fixture(scope="module")
def agent(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")
    env = agent_env(
        model_dir,
        PIPESHIFT_LAYERS="0:2",
        PIPESHIFT_STAGE_ID="5",
        PIPESHIFT_THREADS="1",
        PIPESHIFT_KV_BYTES=str(KV_BYTES),
        PIPESHIFT_BLOCK_SIZE=str(BLOCK),
        PIPESHIFT_CONTROL_TOKEN_FILE=str(token_file),
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeshift.cli", "agent"],
        env=env,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        line = process.stdout.readline()  # type: ignore[union-attr]
        assert line, f"the agent exited with {process.wait()} before reporting its ports"
        handle = Agent(process, json.loads(line))
        deadline = time.monotonic() + 60
        while handle.call("GET", "/health", token=None)[0] != 200:
            assert time.monotonic() < deadline, "the agent never became healthy"
            time.sleep(0.05)
        yield handle
    finally:
        stop_processes([process], 10)


def test_environment_variables_alone_configure_the_agent(agent: Agent) -> None:
    status, info = agent.call("GET", "/info")
    assert status == 200
    assert info["stage_id"] == 5 and info["layers"] == [0, 2] and info["num_layers"] == LAYERS
    assert (info["hidden_size"], info["vocab_size"], info["dtype"], info["block_size"]) == (
        HIDDEN,
        VOCAB,
        "float32",
        BLOCK,
    )
    kv = info["kv"]
    assert kv["block_bytes"] == BLOCK_BYTES
    assert 0 < kv["total_blocks"] * BLOCK_BYTES <= KV_BYTES
    assert kv["used_blocks"] == kv["reserved_blocks"] == 0 and kv["free_blocks"] == kv["total_blocks"]
    assert info["data"] == {"host": "127.0.0.1", "port": agent.data_port}
    assert info["downstream"] is None and info["epoch"] == 0


def test_health_and_metrics_are_open_but_everything_else_needs_the_token(agent: Agent) -> None:
    assert agent.call("GET", "/health", token=None)[0] == 200
    assert "pipeshift_kv_blocks_capacity" in agent.metrics()
    for method, path in [("GET", "/info"), ("GET", "/stats"), ("POST", "/pool/resize"), ("POST", "/route")]:
        body = {"request_id": "x", "blocks": 1} if method == "POST" else None
        assert agent.call(method, path, body, token=None)[0] == 401, path
        assert agent.call(method, path, body, token="wrong")[0] == 401, path
    assert agent.call("GET", "/stats")[0] == 200


def test_the_data_plane_refuses_a_peer_without_the_token(agent: Agent) -> None:
    async def scenario() -> None:
        with pytest.raises(HandshakeRefused, match="wrong control token"):
            await FrameClient.connect(
                "127.0.0.1", agent.data_port, role="frontend", stage_id=0, token="wrong"
            )
        client = await FrameClient.connect(
            "127.0.0.1", agent.data_port, role="frontend", stage_id=0, token=TOKEN
        )
        await client.close()

    asyncio.run(scenario())


def test_a_repeated_request_id_returns_the_first_answer_without_acting_again(agent: Agent) -> None:
    total = agent.call("GET", "/info")[1]["kv"]["total_blocks"]
    first = agent.call("POST", "/pool/resize", {"request_id": "grow-1", "blocks": total + 100})
    assert first[0] == 200 and first[1]["kv"]["total_blocks"] >= total + 100
    grown = first[1]["kv"]["total_blocks"]
    assert agent.call("POST", "/pool/resize", {"request_id": "grow-1", "blocks": total + 100}) == first
    assert agent.call("GET", "/info")[1]["kv"]["total_blocks"] == grown
    status, answer = agent.call("POST", "/pool/resize", {"request_id": "grow-1", "blocks": total})
    assert status == 409 and "different call" in answer["error"]
    shrunk = agent.call("POST", "/pool/resize", {"request_id": "shrink-1", "blocks": total})
    assert shrunk[0] == 200 and total <= shrunk[1]["kv"]["total_blocks"] < grown
    capacity = float(shrunk[1]["kv"]["total_blocks"])
    assert f'pipeshift_kv_blocks_capacity{{stage="5"}} {capacity}' in agent.metrics()


def test_layers_can_be_unloaded_and_loaded_at_the_end_of_the_range(agent: Agent) -> None:
    status, info = agent.call("POST", "/layers/unload", {"request_id": "u1", "start": 1, "end": 2})
    assert status == 200 and info["layers"] == [0, 1]
    assert 'pipeshift_stage_layers{stage="5"} 1.0' in agent.metrics()
    status, info = agent.call("POST", "/layers/load", {"request_id": "l1", "start": 1, "end": 3})
    assert status == 200 and info["layers"] == [0, 3]
    status, answer = agent.call("POST", "/layers/unload", {"request_id": "u2", "start": 0, "end": 3})
    assert status == 409 and "never all of it" in answer["error"]
    status, answer = agent.call("POST", "/layers/load", {"request_id": "l2", "start": 3, "end": 9})
    assert status == 400 and "0..4" in answer["error"]
    status, info = agent.call("POST", "/layers/unload", {"request_id": "u3", "start": 2, "end": 3})
    assert status == 200 and info["layers"] == [0, 2]


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        ("/pool/resize", {"blocks": 3}, "request_id"),
        ("/pool/resize", {"request_id": "b1", "blocks": "many"}, "blocks"),
        ("/pool/resize", {"request_id": "b2", "blocks": 0}, "blocks"),
        ("/layers/load", {"request_id": "b3", "start": -1, "end": 2}, "start"),
        ("/route", {"request_id": "b4", "downstream": 7}, "downstream"),
        ("/route", {"request_id": "b5", "downstream": "nowhere"}, "host:port"),
        ("/route", {"request_id": "b6", "downstream": "127.0.0.1:1", "extra": 1}, "extra"),
        ("/reconfig/precopy", {"request_id": "b7", "reconfig_id": "r", "target": "127.0.0.1:1", "layers": [0],
                               "max_bytes_per_s": 0}, "max_bytes_per_s"),
        ("/reconfig/precopy", {"request_id": "b8", "reconfig_id": "r", "target": "127.0.0.1:1", "layers": [0],
                               "max_bytes_per_s": "fast"}, "max_bytes_per_s"),
    ],
)
def test_a_bad_body_is_a_400_naming_the_field(
    agent: Agent, path: str, body: dict[str, Any], named: str
) -> None:
    status, answer = agent.call("POST", path, body)
    assert status == 400 and named in answer["error"]


def test_malformed_json_is_a_400(agent: Agent) -> None:
    request = urllib.request.Request(
        agent.url + "/pool/resize",
        data=b"{not json",
        method="POST",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=10)
    assert raised.value.code == 400


def test_route_records_the_downstream(agent: Agent) -> None:
    status, answer = agent.call("POST", "/route", {"request_id": "r1", "downstream": "127.0.0.1:9"})
    assert status == 200 and answer["downstream"] == "127.0.0.1:9"
    assert agent.call("GET", "/info")[1]["downstream"] == "127.0.0.1:9"


def test_metrics_pass_promtool(agent: Agent) -> None:
    checked = subprocess.run(
        ["/usr/bin/promtool", "check", "metrics"],
        input=agent.metrics().encode(),
        capture_output=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()


def test_a_missing_model_is_a_one_line_error_naming_flag_and_variable() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipeshift.cli", "agent", "--layers", "0:1"],
        env=agent_env(None),
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "--model" in lines[0] and "PIPESHIFT_MODEL" in lines[0]
