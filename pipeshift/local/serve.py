"""`pipeshift serve`: start a layout's stage agents as local processes and the frontend in front of them.

SIGINT or SIGTERM stops the frontend first, then the agents.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from pipeshift.api import Layout
from pipeshift.errors import UserError
from pipeshift.local.processes import LocalAgents, start_agents
from pipeshift.runtime.frontend import FrontendConfig
from pipeshift.runtime.frontend.main import serve as serve_frontend
from pipeshift.runtime.model.config import LlamaConfig
from pipeshift.runtime.threads import configure_threads

HELP = "serve the OpenAI-compatible API through a local pipeline of stage processes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="HF-format model directory")
    parser.add_argument("--layout", required=True, help="layers per stage, e.g. 3,3,2")
    parser.add_argument("--host", default="127.0.0.1", help="address of the HTTP API (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000; 0 picks a free one)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--kv-bytes", type=int, default=None, help="KV pool budget per stage, in bytes")
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests before HTTP 429")


def start_pipeline(model: Path, layout: str, *, dtype: str = "float32", kv_bytes: int | None = None) -> LocalAgents:
    """Check the layout against the model, then launch one agent per stage."""
    config = LlamaConfig.from_file(model / "config.json")
    plan = Layout.parse(layout, num_layers=config.num_layers)
    return start_agents(model, plan, dtype=dtype, kv_bytes=kv_bytes)


def frontend_config(model: Path, agents: LocalAgents, *, host: str = "127.0.0.1", port: int = 0,
                    max_queue: int = 256) -> FrontendConfig:
    return FrontendConfig(model_dir=model, host=host, port=port, max_queue=max_queue,
                          stages=tuple(f"{a.host}:{a.control_port}" for a in agents.agents)).with_secrets_from()


def run(args: argparse.Namespace) -> int:
    if not args.model.is_dir():
        raise UserError(f"--model {args.model}: not a directory")
    configure_threads(1)
    with start_pipeline(args.model, args.layout, dtype=args.dtype, kv_bytes=args.kv_bytes) as agents:
        config = frontend_config(args.model, agents, host=args.host, port=args.port, max_queue=args.max_queue)
        asyncio.run(serve_frontend(config))
    return 0
