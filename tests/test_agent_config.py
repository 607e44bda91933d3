"""Agent settings: every flag can come from PIPESHIFT_<FLAG>, the flag wins, bad values are named."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pipeshift.errors import UserError
from pipeshift.runtime.agent.config import DEFAULT_KV_BYTES, add_arguments, env_name, resolve


def parse(argv: list[str], env: dict[str, str]):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return resolve(parser.parse_args(argv), env)


BASE = {"PIPESHIFT_MODEL": "/models/tiny", "PIPESHIFT_LAYERS": "0:2"}


def test_every_setting_can_come_from_the_environment() -> None:
    env = {
        **BASE,
        "PIPESHIFT_STAGE_ID": "3",
        "PIPESHIFT_HOST": "0.0.0.0",
        "PIPESHIFT_DATA_PORT": "9001",
        "PIPESHIFT_CONTROL_PORT": "9002",
        "PIPESHIFT_KV_BYTES": "1048576",
        "PIPESHIFT_BLOCK_SIZE": "8",
        "PIPESHIFT_DTYPE": "float64",
        "PIPESHIFT_THREADS": "2",
        "PIPESHIFT_MAX_BATCH_TOKENS": "512",
        "PIPESHIFT_WARM": "true",
    }
    c = parse([], env)
    assert (c.model, c.start, c.end, c.stage_id, c.host) == (Path("/models/tiny"), 0, 2, 3, "0.0.0.0")
    assert (c.data_port, c.control_port, c.kv_bytes, c.block_size) == (9001, 9002, 1048576, 8)
    assert (c.dtype, c.threads, c.max_batch_tokens, c.warm) == ("float64", 2, 512, True)


def test_a_flag_wins_over_its_environment_variable() -> None:
    c = parse(["--layers", "2:5", "--dtype", "float32", "--warm", "0"],
              {**BASE, "PIPESHIFT_DTYPE": "float64", "PIPESHIFT_WARM": "1"})
    assert (c.start, c.end, c.dtype, c.warm) == (2, 5, "float32", False)


def test_unset_settings_take_their_documented_defaults() -> None:
    c = parse([], BASE)
    assert (c.host, c.data_port, c.control_port, c.block_size) == ("127.0.0.1", 0, 0, 16)
    assert c.kv_bytes == DEFAULT_KV_BYTES == 64 * 2**20
    assert c.threads is None and c.dtype == "float32" and c.warm is False


def test_a_missing_model_names_the_flag_and_the_variable() -> None:
    with pytest.raises(UserError, match=r"--model is required \(or set PIPESHIFT_MODEL\)"):
        parse(["--layers", "0:1"], {})


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        ([], {**BASE, "PIPESHIFT_LAYERS": "3:1"}, "PIPESHIFT_LAYERS='3:1'"),
        (["--layers", "x"], BASE, "--layers='x'"),
        ([], {**BASE, "PIPESHIFT_DATA_PORT": "70000"}, "PIPESHIFT_DATA_PORT='70000'"),
        (["--kv-bytes", "0"], BASE, "--kv-bytes='0'"),
        ([], {**BASE, "PIPESHIFT_DTYPE": "int8"}, "PIPESHIFT_DTYPE='int8'"),
        ([], {**BASE, "PIPESHIFT_THREADS": "two"}, "PIPESHIFT_THREADS='two'"),
        (["--warm", "maybe"], BASE, "--warm='maybe'"),
    ],
)
def test_a_bad_value_names_where_it_came_from(argv: list[str], env: dict[str, str], named: str) -> None:
    with pytest.raises(UserError, match=named.replace("(", r"\(")):
        parse(argv, env)


def test_env_names_follow_the_flag_spelling() -> None:
    assert env_name("--kv-bytes") == "PIPESHIFT_KV_BYTES"
    assert env_name("--stage-id") == "PIPESHIFT_STAGE_ID"
