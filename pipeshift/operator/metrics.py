"""The operator's own `/metrics`: counters in Prometheus text format, served from a small thread.

The operator image carries no `prometheus_client` (nor torch), so the few counters it exports are kept
here and rendered by hand; `promtool check metrics` accepts the output (a test checks it).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Counter:
    """A monotonically increasing count per label value set."""

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...]) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name!r} must end in _total")
        self.name, self.help, self.labels = name, help_text, labels
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if set(labels) != set(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {tuple(labels)}")
        if amount < 0:
            raise ValueError("counters only go up")
        key = tuple(labels[k] for k in self.labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(tuple(labels[k] for k in self.labels), 0.0)

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            items = sorted(self._values.items())
        for key, value in items:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in zip(self.labels, key, strict=True))
            lines.append(f"{self.name}{{{labels}}} {value!r}" if labels else f"{self.name} {value!r}")
        return "\n".join(lines) + "\n"


class OperatorMetrics:
    """What the operator did: reconcile passes by outcome, objects created and deleted, events posted."""

    def __init__(self) -> None:
        self.reconciles = Counter("pipeshift_operator_reconciles_total",
                                  "reconcile passes by outcome (ready, waiting, invalid, error)",
                                  ("outcome",))
        self.created = Counter("pipeshift_operator_objects_created_total",
                               "objects the operator created, by kind and role", ("kind", "role"))
        self.deleted = Counter("pipeshift_operator_objects_deleted_total",
                               "objects the operator deleted, by kind", ("kind",))
        self.events = Counter("pipeshift_operator_events_total", "Kubernetes Events posted, by type and reason",
                              ("type", "reason"))
        self.reconfigurations = Counter("pipeshift_operator_reconfigurations_total",
                                        "live layout changes ended, by outcome (committed, aborted)",
                                        ("outcome",))
        # Sums and counts (a histogram's _sum/_count without buckets): mean = sum / reconfigurations.
        self.reconfig_seconds = Counter("pipeshift_operator_reconfiguration_seconds_total",
                                        "seconds spent in live layout changes (start to end), by outcome",
                                        ("outcome",))
        self.pause_seconds = Counter("pipeshift_operator_switch_pause_seconds_total",
                                     "seconds the frontend could not start a micro-batch while switching",
                                     ())
        self.decisions = Counter("pipeshift_operator_autoscale_decisions_total",
                                 "autoscaling decisions by kind (hold, scale_up, scale_down, pin); scale to zero "
                                 "and cold starts have their own counters", ("kind",))
        # Restores of dead stage pods and scale to zero (see `restore` and `zero`).
        self.restores = Counter("pipeshift_operator_stage_restores_total",
                                "stage pods replaced after dying, the frontend re-wired onto them", ())
        self.reprefilled = Counter("pipeshift_operator_requests_reprefilled_total",
                                   "requests the frontend prefilled again after a stage was replaced or came back",
                                   ("cause",))
        self.scaled_to_zero = Counter("pipeshift_operator_scale_to_zero_total",
                                      "times a pipeline's stage pods were all removed for idleness", ())
        self.cold_starts = Counter("pipeshift_operator_cold_starts_total",
                                   "pipelines brought back from zero stages by demand", ())
        self.cold_start_seconds = Counter("pipeshift_operator_cold_start_seconds_total",
                                          "seconds from demand seen at zero to the stages attached (sum; mean = "
                                          "this / cold_starts)", ())

    def render(self) -> str:
        mine = (self.restores, self.reprefilled, self.scaled_to_zero, self.cold_starts, self.cold_start_seconds)
        return "".join(c.render() for c in (self.reconciles, self.created, self.deleted, self.events,
                                            self.reconfigurations, self.reconfig_seconds, self.pause_seconds,
                                            self.decisions, *mine))


@contextmanager
def serve_metrics(metrics: OperatorMetrics, host: str, port: int) -> Iterator[int]:
    """Serve `GET /metrics` on host:port (0 picks a free port) until the block exits; yields the port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404, "only /metrics is served here")
                return
            body = metrics.render().encode()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # scrapes are not news
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="operator-metrics", daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
