"""`pipeshift frontend`: serve the OpenAI-compatible API in front of already running stage agents.

Every flag can also be set as `PIPESHIFT_FRONTEND_<FLAG>` (pods are configured through the environment);
a flag wins over the environment. Secrets come only from the environment (see `config`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path

from pipeshift.errors import UserError
from pipeshift.runtime.frontend.config import FrontendConfig
from pipeshift.runtime.frontend.server import start_frontend
from pipeshift.runtime.threads import configure_threads

HELP = "serve the OpenAI-compatible API through running stage agents"
logger = logging.getLogger(__name__)

_FLAGS: tuple[tuple[str, type, object, str], ...] = (
    ("--model", Path, None, "model directory (config.json, tokenizer.json, tokenizer_config.json)"),
    (
        "--stages",
        str,
        None,
        "the agents' control addresses in pipeline order, e.g. 127.0.0.1:9001,127.0.0.1:9002; "
        "empty: start scaled to zero (requests wait for POST /control/recover)",
    ),
    ("--host", str, "127.0.0.1", "address to bind"),
    ("--port", int, 8000, "HTTP port (0 picks a free one)"),
    ("--model-name", str, None, "name clients use in `model` (default: the model directory's name)"),
    ("--slots", int, None, "micro-batches in flight (default: number of stages, at least 2)"),
    ("--max-batch-tokens", int, 2048, "token cap of one micro-batch"),
    ("--max-queue", int, 256, "requests that may wait for KV blocks before new ones get HTTP 429"),
    ("--step-timeout", float, 30.0, "seconds a micro-batch may take through the pipeline"),
    ("--default-max-tokens", int, 16, "max_tokens when a request gives none"),
    ("--recover-timeout", float, 0.0, "seconds requests wait for a stage that died to be replaced (0: they fail)"),
    ("--zero-wait-timeout", float, 60.0, "seconds requests wait for stages while scaled to zero (then HTTP 503)"),
)


def env_name(flag: str) -> str:
    return "PIPESHIFT_FRONTEND_" + flag.lstrip("-").upper().replace("-", "_")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, _, default, text in _FLAGS:
        shown = "" if default is None else f" (default {default})"
        parser.add_argument(flag, default=None, help=f"{text}{shown}; env {env_name(flag)}")


def config_from(args: argparse.Namespace, environ: dict[str, str] | None = None) -> FrontendConfig:
    env = dict(os.environ) if environ is None else environ
    values: dict[str, object] = {}
    for flag, kind, default, _ in _FLAGS:
        dest = flag.lstrip("-").replace("-", "_")
        raw, source = getattr(args, dest, None), flag
        if raw is None and env_name(flag) in env:
            raw, source = env[env_name(flag)], env_name(flag)
        try:
            values[dest] = default if raw is None else kind(raw)
        except ValueError:
            raise UserError(f"{source}={raw!r} is not a valid {kind.__name__}") from None
    if values["model"] is None or values["stages"] is None:
        missing = "--model" if values["model"] is None else "--stages"
        raise UserError(f"{missing} is required (or set {env_name(missing)})")
    stages = tuple(s.strip() for s in str(values.pop("stages")).split(",") if s.strip())
    try:
        return FrontendConfig(
            model_dir=values.pop("model"),
            stages=stages,
            step_timeout_s=values.pop("step_timeout"),  # type: ignore[arg-type]
            recover_timeout_s=values.pop("recover_timeout"),  # type: ignore[arg-type]
            zero_wait_timeout_s=values.pop("zero_wait_timeout"),  # type: ignore[arg-type]
            **values,  # type: ignore[arg-type]
        ).with_secrets_from(env)
    except ValueError as e:
        raise UserError(str(e)) from None


async def serve(config: FrontendConfig) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    frontend = await start_frontend(config)
    print(f"serving {frontend.model.name} on {frontend.url}", flush=True)
    try:
        await stop.wait()
    finally:
        logger.info("stopping the frontend")
        await frontend.stop()


def run(args: argparse.Namespace) -> int:
    # The frontend's tensor work is an argmax or a draw per sequence: one thread, leaving cores to stages.
    configure_threads(1)
    asyncio.run(serve(config_from(args)))
    return 0
