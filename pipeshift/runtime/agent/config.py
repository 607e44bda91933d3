"""The agent's settings: each comes from a `--flag`, else from `PIPESHIFT_<FLAG>`, else a default.

Pods are configured through the environment and people through flags, so both must be complete.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeshift.errors import UserError

DTYPES = ("float32", "float64", "bfloat16", "float16")
DEFAULT_KV_BYTES = 64 * 2**20
DEFAULT_MAX_BATCH_TOKENS = 8192


def env_name(flag: str) -> str:
    """`--kv-bytes` → `PIPESHIFT_KV_BYTES`."""
    return "PIPESHIFT_" + flag.lstrip("-").upper().replace("-", "_")


def parse_layers(text: str) -> tuple[int, int]:
    """`START:END`, half-open like the layout: `0:3` holds layers 0, 1 and 2."""
    start_s, sep, end_s = text.partition(":")
    try:
        start, end = int(start_s), int(end_s)
    except ValueError:
        start = end = -1
    if not sep or start < 0 or end <= start:
        raise ValueError(f"{text!r} is not a layer range START:END with 0 <= START < END, such as 0:3")
    return start, end


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(f"{port} is not a port in 0..65535 (0 picks a free one)")
    return port


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{value} must be at least 1")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"{value} must be at least 0")
    return value


def _switch(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("0", "1", "true", "false", "yes", "no"):
        raise ValueError(f"{text!r} is not one of 1, 0, true, false, yes, no")
    return value in ("1", "true", "yes")


def _dtype(text: str) -> str:
    if text not in DTYPES:
        raise ValueError(f"{text!r} is not one of {', '.join(DTYPES)}")
    return text


@dataclass(frozen=True)
class _Option:
    flag: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    metavar: str


_OPTIONS: tuple[_Option, ...] = (
    _Option("--model", Path, None, "model directory (config.json, safetensors, tokenizer)", "DIR"),
    _Option("--layers", parse_layers, None, "half-open layer range this stage holds, e.g. 0:3", "START:END"),
    _Option("--stage-id", _non_negative, 0, "this stage's id (labels metrics, reported by /info)", "N"),
    _Option("--host", str, "127.0.0.1", "address both servers bind to", "HOST"),
    _Option("--data-port", _port, 0, "data-plane port; 0 picks a free one", "PORT"),
    _Option("--control-port", _port, 0, "control API port; 0 picks a free one", "PORT"),
    _Option("--kv-bytes", _positive, DEFAULT_KV_BYTES, "memory budget of the KV pool in bytes", "BYTES"),
    _Option("--memory-bytes", _positive, None, "device memory of this stage for weights and KV together: the pool "
            "gets what the weights leave, and live changes trade weights for KV (instead of --kv-bytes)", "BYTES"),
    _Option("--block-size", _positive, 16, "tokens per KV block", "TOKENS"),
    _Option("--dtype", _dtype, "float32", f"weights and activations dtype: {', '.join(DTYPES)}", "DTYPE"),
    _Option("--threads", _positive, None, "torch threads (default: cores / processes on this host)", "N"),
    _Option("--warm", _switch, False, "touch the read workspaces at start, sized for one layer of a full pool: for a "
            "stage started to join a running pipeline, whose first steps would otherwise fault that memory in while "
            "every sequence waits", "1|0"),
    _Option(
        "--max-batch-tokens",
        _positive,
        DEFAULT_MAX_BATCH_TOKENS,
        "largest micro-batch (tokens) a frame may carry; bigger frames are refused",
        "TOKENS",
    ),
)


@dataclass(frozen=True)
class AgentConfig:
    model: Path
    start: int
    end: int
    stage_id: int = 0
    host: str = "127.0.0.1"
    data_port: int = 0
    control_port: int = 0
    kv_bytes: int = DEFAULT_KV_BYTES
    # When set, `kv_bytes` is unused: the pool is this memory less the weights held (see `Stage`).
    memory_bytes: int | None = None
    block_size: int = 16
    dtype: str = "float32"
    threads: int | None = None
    # Prefault the read workspaces at start (see `RunningAgent._warm`): for stages that join a running pipeline.
    warm: bool = False
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags default to None so that `resolve` can tell "not given" from "given the default"."""
    for opt in _OPTIONS:
        shown = "" if opt.default is None else f" (default {opt.default})"
        parser.add_argument(
            opt.flag, default=None, metavar=opt.metavar, help=f"{opt.help}{shown}; env {env_name(opt.flag)}"
        )


def resolve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Merge flags over environment over defaults, naming the flag and variable of any bad value."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    given: dict[str, str] = {}  # flag -> where its value came from
    for opt in _OPTIONS:
        dest = opt.flag.lstrip("-").replace("-", "_")
        raw, source = getattr(args, dest, None), opt.flag
        if raw is None and env_name(opt.flag) in env:
            raw, source = env[env_name(opt.flag)], env_name(opt.flag)
        if raw is None:
            values[dest] = opt.default
            continue
        given[opt.flag] = source
        try:
            values[dest] = opt.parse(raw)
        except ValueError as e:
            raise UserError(f"{source}={raw!r}: {e}") from None
    if "--memory-bytes" in given and "--kv-bytes" in given:
        raise UserError(f"--memory-bytes (given as {given['--memory-bytes']}) and --kv-bytes (given as "
                        f"{given['--kv-bytes']}) exclude each other: with a memory budget the KV pool is what the "
                        "weights leave of it; give one of them")
    for required in ("--model", "--layers"):
        if values[required.lstrip("-")] is None:
            raise UserError(f"{required} is required (or set {env_name(required)})")
    start, end = values.pop("layers")
    return AgentConfig(start=start, end=end, **values)
