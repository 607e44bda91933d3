"""The stage agent: one pipeline stage per OS process, fed over TCP and steered over HTTP.

The CLI entry (`HELP`, `add_arguments`, `run`) imports the engine only when the agent really starts.
"""

from __future__ import annotations

import argparse
import asyncio

from pipeshift.runtime.agent.config import add_arguments, resolve

HELP = "run one pipeline stage as a process: a TCP data server plus an HTTP control API"


def run(args: argparse.Namespace) -> int:
    config = resolve(args)
    from pipeshift.runtime.agent.main import serve

    asyncio.run(serve(config))
    return 0


__all__ = ["HELP", "add_arguments", "run"]
