"""`pipeshift reconfigure`: change the layout of a running `pipeshift serve` pipeline by hand, and print the report.

`--frontend URL` finds the reconfiguration endpoint that `serve` hosts in the frontend's `/control/state`;
`--endpoint URL` names it directly (`serve` prints it at start-up).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipeshift.control import STRATEGIES, SWITCHES, WEIGHTS
from pipeshift.errors import UserError
from pipeshift.local.processes import http_json
from pipeshift.local.reconfigure_endpoint import MAX_TIMEOUT_S, check_rate
from pipeshift.runtime.security import load_control_token

HELP = "change the layout of a running `pipeshift serve` pipeline live"
# A change starts stage processes and copies KV while serving: minutes at most on a loaded host.
CALL_TIMEOUT_S = 600.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--frontend", help="the frontend's URL, e.g. http://127.0.0.1:8000")
    where.add_argument("--endpoint", help="the reconfigure endpoint `pipeshift serve` printed, e.g. http://127.0.0.1:41234")
    parser.add_argument("--to", required=True, help="the new layers per stage, e.g. 3,3,2")
    parser.add_argument("--strategy", default="live", choices=sorted(STRATEGIES))
    parser.add_argument("--switch", default="epoch", choices=SWITCHES,
                        help="how a live strategy hands over: epoch (no pause, default) or drain")
    parser.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                        help="how long each control call of the change may take (default 60): one that takes longer "
                             "aborts the change before its point of no return and is retried after it")
    parser.add_argument("--precopy-rate", type=_rate, default=None, metavar="BYTES_PER_S",
                        help="cap the pre-copy that runs while serving at this many bytes/s, all pairs together "
                             "(e.g. 50e6; default: uncapped): a longer switch for less slowdown of serving")
    parser.add_argument("--weights", default="checkpoint", choices=WEIGHTS,
                        help="where stages that take over layers get their weights: their checkpoint (default) or "
                             "streamed from the stage that computes them now")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"--timeout {raw!r} must be a number of seconds in (0, {MAX_TIMEOUT_S:g}]")
    return value


def _rate(raw: str) -> float:
    try:
        value = check_rate(float(raw))
    except (ValueError, UserError):
        raise argparse.ArgumentTypeError(f"--precopy-rate {raw!r} must be a positive number of bytes per second"
                                         ) from None
    assert value is not None
    return value


def _http_url(address: str) -> str:
    url = address.rstrip("/")
    return url if url.startswith(("http://", "https://")) else f"http://{url}"


def endpoint_of(frontend: str) -> str:
    """The reconfiguration endpoint a `pipeshift serve` frontend advertises in its `/control/state`."""
    try:
        status, state = http_json(f"{_http_url(frontend)}/control/state", "GET", None, load_control_token(), 30.0)
    except OSError as error:
        raise UserError(f"--frontend {frontend}: no answer ({error}); is `pipeshift serve` running there?") from None
    endpoint = state.get("endpoints", {}).get("reconfigure") if status == 200 else None
    if endpoint is None:
        raise UserError(f"--frontend {frontend}: HTTP {status}: {state.get('error', 'no reconfiguration endpoint')}; "
                        "only a frontend started by `pipeshift serve` hosts one")
    return str(endpoint)


def request_change(endpoint: str, to: str, strategy: str = "live", switch: str = "epoch",
                   timeout_s: float | None = None, weights: str = "checkpoint",
                   precopy_bytes_per_s: float | None = None) -> dict[str, Any]:
    """POST the change and return `{"report": ..., "layout": ...}`; no answer or an error is a UserError."""
    url = _http_url(endpoint)
    try:
        body: dict[str, Any] = {"to": to, "strategy": strategy, "switch": switch, "weights": weights}
        if timeout_s is not None:
            body["timeout_s"] = timeout_s
        if precopy_bytes_per_s is not None:
            body["precopy_bytes_per_s"] = precopy_bytes_per_s
        status, answer = http_json(f"{url}/reconfigure", "POST", body, load_control_token(), CALL_TIMEOUT_S)
    except OSError as error:
        raise UserError(f"--endpoint {endpoint}: no answer ({error}); is `pipeshift serve` running there?") from None
    if "report" not in answer:
        raise UserError(f"reconfiguration to {to}: HTTP {status}: {answer.get('error', answer)}")
    return answer


def table(answer: dict[str, Any]) -> str:
    report = answer["report"]
    rows = [
        ("outcome", report["outcome"]),
        ("layout now", answer["layout"]),
        ("epoch", report["epoch"]),
        ("switch duration", f"{report['switch_duration_ms']:.1f} ms"),
        ("switch", report.get("switch", "drain")),
        ("pause (no batch started)", f"{report['pause_ms']:.3f} ms"),
        ("longest fence wait", f"{report.get('fence_wait_ms_max', 0.0):.1f} ms"),
        ("pre-copy rounds", report["precopy_rounds"]),
        ("KV bytes moved", report["kv_bytes_moved"]),
        *((f"phase {name}", f"{ms:.1f} ms") for name, ms in report["phases_ms"].items()),
    ]
    if report["error"]:
        rows.append(("error", report["error"]))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run(args: argparse.Namespace) -> int:
    endpoint = args.endpoint if args.endpoint is not None else endpoint_of(args.frontend)
    answer = request_change(endpoint, args.to, args.strategy, args.switch, args.timeout, weights=args.weights,
                            precopy_bytes_per_s=args.precopy_rate)
    print(json.dumps(answer) if args.json else table(answer))
    return 0 if answer["report"]["outcome"] == "committed" else 1
