"""`pipeshift reconfigure` against a real `pipeshift serve` process: a 2,2 -> 1,3 change under streaming
load completes every request with the tokens of an unchanged in-process run (float64), and mistakes are
one-line errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import torch
from _streaming import Result, assert_all_match, eos_oracle, stream_tokens

ENV = os.environ | {"PIPESHIFT_THREADS": "1"}
CLI = [sys.executable, "-m", "pipeshift.cli"]


@pytest.fixture(scope="module")
def model(model_factory: Callable[..., Path]) -> Path:
    torch.set_num_threads(1)
    return model_factory(layers=4, tie_embeddings=True)


@pytest.fixture(scope="module")
def served(model: Path) -> Iterator[tuple[str, str]]:
    """(frontend URL, reconfigure endpoint) of a `serve` process on the 2,2 layout."""
    proc = subprocess.Popen([*CLI, "serve", "--model", str(model), "--layout", "2,2", "--port", "0",
                                   "--dtype", "float64", "--kv-bytes", str(8 << 20)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        serving, endpoint = proc.stdout.readline(), proc.stdout.readline()
        assert serving.startswith("serving ") and endpoint.startswith("reconfigure endpoint on "), (
            serving + endpoint + proc.stderr.read())
        yield serving.split(" on ", 1)[1].strip(), endpoint.split(" on ", 1)[1].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def reconfigure(frontend: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "reconfigure", "--frontend", frontend, *args], capture_output=True, text=True,
                          env=ENV, timeout=300)


def test_reconfigure_changes_a_serving_pipeline_without_losing_or_changing_a_token(
    model: Path, served: tuple[str, str]
) -> None:
    url, _ = served
    rng = random.Random(7)
    requests = [([rng.randrange(2, 300) for _ in range(rng.randint(3, 20))], rng.randint(200, 300)) for _ in range(5)]

    async def scenario() -> tuple[subprocess.CompletedProcess[str], list[Result]]:
        seen: list[int] = []
        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(stream_tokens(session, url, p, n, seen)) for p, n in requests]
            while sum(seen) < 10:
                await asyncio.sleep(0.01)
            # A cap high enough not to slow the test: it must still reach every source's pre-copy call.
            done = await asyncio.to_thread(reconfigure, url, "--to", "1,3", "--precopy-rate", "1e9", "--json")
            return done, list(await asyncio.gather(*tasks))

    done, results = asyncio.run(scenario())
    assert done.returncode == 0, done.stdout + done.stderr
    answer = json.loads(done.stdout)
    assert answer["layout"] == "1,3" and answer["report"]["outcome"] == "committed"
    assert answer["report"]["kv_bytes_moved"] > 0 and answer["report"]["switch"] == "epoch"  # the default
    assert_all_match(requests, results, eos_oracle(model))
    back = reconfigure(url, "--to", "2,2", "--switch", "drain")  # `--switch` reaches the change; back to 2,2
    assert back.returncode == 0, back.stdout + back.stderr
    assert re.search(r"^switch\s+drain$", back.stdout, re.M) and re.search(r"^layout now\s+2,2$", back.stdout, re.M)


def test_reconfigure_to_a_layout_that_does_not_fit_the_model_is_a_one_line_error(served: tuple[str, str]) -> None:
    """Through the endpoint `serve` printed, the direct form of the command."""
    done = subprocess.run([*CLI, "reconfigure", "--endpoint", served[1], "--to", "2,3"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("pipeshift reconfigure: error:") and "2,3" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_reconfigure_without_a_server_is_a_one_line_error() -> None:
    done = reconfigure("http://127.0.0.1:9", "--to", "2,2")
    assert done.returncode == 2 and "no answer" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("rate", ["0", "-5", "fast", "inf"])
def test_a_bad_precopy_rate_is_refused_before_anything_is_asked(rate: str) -> None:
    done = reconfigure("http://127.0.0.1:9", "--to", "2,2", "--precopy-rate", rate)
    assert done.returncode == 2 and f"--precopy-rate {rate!r}" in done.stderr, done.stderr
    assert "no answer" not in done.stderr
