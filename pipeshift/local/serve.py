"""`pipeshift serve`: start a layout's stage agents as local processes and the frontend in front of them,
plus the reconfiguration endpoint that `pipeshift reconfigure` posts to (its address is printed at start).

SIGINT or SIGTERM stops the endpoint and the frontend first, then the agents.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from aiohttp import web

from pipeshift.api import Layout
from pipeshift.errors import UserError
from pipeshift.local.live import LivePipeline
from pipeshift.local.processes import LocalAgents, start_agents
from pipeshift.local.reconfigure_endpoint import reconfigure_app
from pipeshift.runtime.frontend import FrontendConfig
from pipeshift.runtime.frontend.server import start_frontend
from pipeshift.runtime.model.config import LlamaConfig
from pipeshift.runtime.threads import configure_threads

HELP = "serve the OpenAI-compatible API through a local pipeline of stage processes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="HF-format model directory")
    parser.add_argument("--layout", required=True, help="layers per stage, e.g. 3,3,2")
    parser.add_argument("--host", default="127.0.0.1", help="address of the HTTP API (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000; 0 picks a free one)")
    parser.add_argument("--reconfigure-port", type=int, default=0,
                        help="port of the reconfiguration endpoint on 127.0.0.1 (default 0: a free one)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--kv-bytes", type=int, default=None, help="KV pool budget per stage, in bytes")
    parser.add_argument("--memory-bytes", type=int, default=None,
                        help="memory per stage for weights and KV together, in bytes (instead of --kv-bytes)")
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests before HTTP 429")


def model_layout(model: Path, layout: str) -> Layout:
    """The layout, checked against the model's layer count."""
    config = LlamaConfig.from_file(model / "config.json")
    return Layout.parse(layout, num_layers=config.num_layers)


def start_pipeline(model: Path, layout: str, *, dtype: str = "float32", kv_bytes: int | None = None) -> LocalAgents:
    """Check the layout against the model, then launch one agent per stage."""
    return start_agents(model, model_layout(model, layout), dtype=dtype, kv_bytes=kv_bytes)


def frontend_config(model: Path, agents: LocalAgents, *, host: str = "127.0.0.1", port: int = 0,
                    max_queue: int = 256) -> FrontendConfig:
    return FrontendConfig(model_dir=model, host=host, port=port, max_queue=max_queue,
                          stages=tuple(f"{a.host}:{a.control_port}" for a in agents.agents)).with_secrets_from()


async def serve(config: FrontendConfig, pipeline: LivePipeline, reconfigure_port: int) -> None:
    """Serve until SIGINT or SIGTERM. Prints `serving NAME on URL`, then `reconfigure endpoint on URL`."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    frontend = await start_frontend(config)
    runner = web.AppRunner(reconfigure_app(pipeline, frontend.url, config.control_token))
    try:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", reconfigure_port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"serving {frontend.model.name} on {frontend.url}", flush=True)
        frontend.endpoints["reconfigure"] = f"http://127.0.0.1:{port}"
        print(f"reconfigure endpoint on http://127.0.0.1:{port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
        await frontend.stop()


def run(args: argparse.Namespace) -> int:
    if not args.model.is_dir():
        raise UserError(f"--model {args.model}: not a directory")
    configure_threads(1)
    layout = model_layout(args.model, args.layout)
    budget = {"kv_bytes": args.kv_bytes, "memory_bytes": args.memory_bytes}
    with start_agents(args.model, layout, dtype=args.dtype, **budget) as agents:
        config = frontend_config(args.model, agents, host=args.host, port=args.port, max_queue=args.max_queue)
        pipeline = LivePipeline(args.model, agents, layout, dtype=args.dtype, token=config.control_token, **budget)
        try:
            asyncio.run(serve(config, pipeline, args.reconfigure_port))
        finally:
            pipeline.stop()
    return 0
