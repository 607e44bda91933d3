"""`pipeshift …`: one entry point; each subcommand lives in its own module, imported only when run.

Lazy imports keep `pipeshift plan` (pure Python) from loading torch. A subcommand module exposes
`HELP` (one line), `add_arguments(parser)` and `run(args) -> int`. Errors that users cause are
raised as `UserError` and printed as one line; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeshift.api import LayoutError
from pipeshift.errors import UserError

COMMANDS: dict[str, str] = {
    "make-model": "pipeshift.runtime.model.make_model",
    "generate": "pipeshift.runtime.generate",
    "agent": "pipeshift.runtime.agent",
    "serve": "pipeshift.local.serve",
    "frontend": "pipeshift.runtime.frontend.main",
    "plan": "pipeshift.placement.cli",
    "demo": "pipeshift.local.demo",
    "reconfigure": "pipeshift.local.reconfigure",
    "operator": "pipeshift.operator.main",
}


def _load(name: str):  # returns a module
    return importlib.import_module(COMMANDS[name])


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeshift", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Only the chosen subcommand's module is imported; others are listed by name.
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name in COMMANDS:
        if name == chosen:
            module = _load(name)
            module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP))
        else:
            sub.add_parser(name, help=f"see `pipeshift {name} --help`")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(_load(args.command).run(args) or 0)
    except (UserError, LayoutError) as e:
        if args.debug:
            raise
        print(f"pipeshift {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
