"""The OpenAI-compatible API over real HTTP, in front of real agent processes (2 stages, float64).

Oracles: the in-process engine for greedy outputs, the tokenizer for text, `promtool` for /metrics.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch

from pipeshift.api import Layout
from pipeshift.local.processes import LocalAgents, start_agents
from pipeshift.runtime.frontend.background import BackgroundFrontend
from pipeshift.runtime.frontend.config import FrontendConfig
from pipeshift.runtime.frontend.served_model import ServedModel
from pipeshift.runtime.frontend.stages import StageUnreachable
from pipeshift.runtime.model.checkpoint import ModelDir
from pipeshift.runtime.pipeline import Pipeline

LAYOUT = "2,1"
TOKEN = "api-test-control-token"
API_KEY = "api-test-key"
VOCAB = 320


@pytest.fixture(scope="module")
def model_dir(model_factory: Callable[..., Path]) -> Path:
    return model_factory(layers=3, hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=VOCAB, seed=5)


@pytest.fixture(scope="module")
def agents(model_dir: Path) -> Iterator[LocalAgents]:
    with start_agents(
        model_dir, LAYOUT, dtype="float64", kv_bytes=2 << 20, threads=1, token=TOKEN
    ) as running:
        yield running


def frontend_config(model_dir: Path, agents: LocalAgents, **overrides: Any) -> FrontendConfig:
    settings: dict[str, Any] = {
        "model_dir": model_dir,
        "port": 0,
        "control_token": TOKEN,
        "api_key": API_KEY,
        "stages": tuple(f"{a.host}:{a.control_port}" for a in agents.agents),
    }
    return FrontendConfig(**(settings | overrides))


@pytest.fixture(scope="module")
def server(model_dir: Path, agents: LocalAgents) -> Iterator[BackgroundFrontend]:
    with BackgroundFrontend(frontend_config(model_dir, agents)) as running:
        yield running


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Pipeline:
    return Pipeline(ModelDir(model_dir), Layout.parse(LAYOUT), dtype=torch.float64)


@pytest.fixture(scope="module")
def served(model_dir: Path) -> ServedModel:
    return ServedModel.load(model_dir)


AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def call(
    url: str,
    method: str = "POST",
    body: Any = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession() as session:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        async with session.request(
            method, url, data=data, headers=AUTH if headers is None else headers
        ) as resp:
            text = await resp.text()
            try:
                payload = json.loads(text)
            except json.JSONDecodeError:
                payload = text
            return resp.status, payload, dict(resp.headers)


def post(
    server: BackgroundFrontend, path: str, body: Any = None, **kw: Any
) -> tuple[int, Any, dict[str, str]]:
    return asyncio.run(call(server.url + path, "POST", body, **kw))


def get(server: BackgroundFrontend, path: str, **kw: Any) -> tuple[int, Any, dict[str, str]]:
    return asyncio.run(call(server.url + path, "GET", **kw))


def sse_events(text: str) -> list[Any]:
    """The data lines of an event stream, parsed (the final `[DONE]` kept as a string)."""
    events = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_greedy_completion_equals_the_engine(
    server: BackgroundFrontend, engine: Pipeline, served: ServedModel
) -> None:
    prompt = "Return the list of"
    status, body, _ = post(
        server,
        "/v1/completions",
        {
            "model": served.name,
            "prompt": prompt,
            "max_tokens": 12,
            "temperature": 0,
            "return_token_ids": True,
        },
    )
    assert status == 200, body
    ids = served.encode(prompt)
    expected = engine.generate([ids], 12, stop_ids=served.config.eos_token_ids)[0]
    choice = body["choices"][0]
    assert choice["token_ids"] == expected
    assert choice["text"] == served.decode(expected)
    assert choice["finish_reason"] == ("stop" if expected[-1] in served.config.eos_token_ids else "length")
    assert body["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": len(expected),
        "total_tokens": len(ids) + len(expected),
    }
    assert body["object"] == "text_completion"


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_streaming_equals_non_streaming(server: BackgroundFrontend, endpoint: str) -> None:
    if endpoint == "/v1/completions":
        base: dict[str, Any] = {"prompt": "The value of", "max_tokens": 14, "ignore_eos": True}
    else:
        base = {
            "messages": [{"role": "user", "content": "Say something"}],
            "max_tokens": 14,
            "ignore_eos": True,
        }
    base |= {"temperature": 0.8, "top_p": 0.9, "seed": 1234, "return_token_ids": True}
    status, whole, _ = post(server, endpoint, base)
    assert status == 200, whole
    status, text, headers = post(
        server, endpoint, base | {"stream": True, "stream_options": {"include_usage": True}}
    )
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert usage["usage"] == whole["usage"] and usage["choices"] == []
    choice = whole["choices"][0]
    if endpoint == "/v1/completions":
        streamed = "".join(c["choices"][0]["text"] for c in chunks)
        assert streamed == choice["text"]
    else:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert streamed == choice["message"]["content"]
        assert whole["object"] == "chat.completion" and chunks[1]["object"] == "chat.completion.chunk"
    assert [t for c in chunks for t in c["choices"][0].get("token_ids", [])] == choice["token_ids"]
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"] == "length"
    assert len(choice["token_ids"]) == 14


def test_chat_uses_the_models_template(
    server: BackgroundFrontend, engine: Pipeline, served: ServedModel
) -> None:
    messages = [{"role": "system", "content": "be short"}, {"role": "user", "content": "hello"}]
    status, body, _ = post(
        server,
        "/v1/chat/completions",
        {"messages": messages, "max_tokens": 6, "temperature": 0, "return_token_ids": True},
    )
    assert status == 200, body
    prompt = served.encode(served.chat.render(messages), add_special_tokens=False)
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert (
        body["choices"][0]["token_ids"]
        == engine.generate([prompt], 6, stop_ids=served.config.eos_token_ids)[0]
    )


def test_stop_strings_end_the_text_before_them(server: BackgroundFrontend, served: ServedModel) -> None:
    base = {"prompt": [5, 6, 7, 8], "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    _, free, _ = post(server, "/v1/completions", base)
    text = free["choices"][0]["text"]
    stop = text[4:6]
    assert len(stop) == 2
    _, stopped, _ = post(server, "/v1/completions", base | {"stop": [stop]})
    assert stopped["choices"][0]["text"] == text[: text.find(stop)]
    assert stopped["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"prompt": "hi", "max_tokens": -1}, "max_tokens", "greater than or equal to 1"),
        ({"prompt": "hi", "max_tokens": 10**9}, "max_tokens", "less than or equal to"),
        ({"prompt": "hi", "max_tokens": 4000}, "max_tokens", "context of 2048 tokens"),
        ({"prompt": "hi", "model": "gpt-4"}, "model", "unknown model 'gpt-4'"),
        ({"prompt": "hi", "temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"prompt": "hi", "top_p": 0}, "top_p", "greater than 0"),
        ({"prompt": [3] * 3000}, "prompt", "at most 2047"),
        ({"prompt": [3, VOCAB]}, "prompt", f"token id {VOCAB} is outside"),
        ({"prompt": "hi", "n": 3}, "n", "Input should be 1"),
        ({"max_tokens": 3}, "prompt", "Field required"),
    ],
)
def test_bad_completion_bodies_get_400_naming_the_field(
    server: BackgroundFrontend, body: dict[str, Any], param: str, fragment: str
) -> None:
    status, answer, _ = post(server, "/v1/completions", body)
    assert status == 400
    assert answer["error"]["param"] == param
    assert fragment in answer["error"]["message"] and param in answer["error"]["message"]


def test_malformed_json_and_bad_messages_get_400(server: BackgroundFrontend) -> None:
    status, answer, _ = post(server, "/v1/completions", raw=b'{"prompt": "hi",')
    assert status == 400 and "not valid JSON" in answer["error"]["message"]
    status, answer, _ = post(
        server, "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}
    )
    assert status == 400 and answer["error"]["param"] == "messages[0].role"


def test_models_health_and_metrics(server: BackgroundFrontend, served: ServedModel, tmp_path: Path) -> None:
    status, models, _ = get(server, "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == [served.name]
    status, health, _ = get(server, "/health", headers={})
    assert status == 200 and health["status"] == "ok" and [s["up"] for s in health["stages"]] == [True, True]
    status, text, headers = get(server, "/metrics", headers={})
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for name in (
        "pipeshift_ttft_seconds_bucket",
        "pipeshift_requests_total",
        'pipeshift_stage_up{stage="1"} 1.0',
    ):
        assert name in text
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is needed to check the exposition format"
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_api_key_and_control_token_are_enforced(server: BackgroundFrontend) -> None:
    body = {"prompt": "hi", "max_tokens": 1}
    assert post(server, "/v1/completions", body, headers={})[0] == 401
    assert post(server, "/v1/completions", body, headers={"Authorization": "Bearer wrong"})[0] == 401
    assert post(server, "/v1/completions", body)[0] == 200
    assert get(server, "/control/state", headers=AUTH)[0] == 401
    status, state, _ = get(server, "/control/state", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and state["reserved_blocks"] == [0, 0]


def test_a_frontend_with_the_wrong_control_token_is_refused_by_the_agents(
    model_dir: Path, agents: LocalAgents
) -> None:
    with pytest.raises(StageUnreachable, match="401"):
        BackgroundFrontend(frontend_config(model_dir, agents, control_token="not-the-token"))
