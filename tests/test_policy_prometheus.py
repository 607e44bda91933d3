"""The Prometheus metric source: the PromQL it sends and how it reads the answers.

Most tests run against a local HTTP server implementing Prometheus's instant-query endpoint
(`GET /api/v1/query` and its JSON envelope), which lets them see every query sent and answer with
exact series, NaN and errors; the client library and its HTTP stack are the real ones. The last
test runs a real `prometheus` (installed by `make tools`) scraping the runtime's own metrics.
"""

from __future__ import annotations

import http.server
import json
import math
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from pipeshift.policy.prometheus import PrometheusSource, default_queries
from pipeshift.policy.schema import MetricsConfig, PrometheusSourceConfig, PromQueries
from pipeshift.policy.source import MetricsUnavailable, build_source
from pipeshift.runtime.metrics import AgentMetrics, FrontendMetrics

# The metric names and query shapes of docs/metrics.md, written out as the source must send them.
EXPECTED = {
    "ttft_p95": 'histogram_quantile(0.95, sum by (le) (rate(pipeshift_ttft_seconds_bucket{job="fe"}[60s])))',
    "tpot_p95": 'histogram_quantile(0.95, sum by (le) (rate(pipeshift_tpot_seconds_bucket{job="fe"}[60s])))',
    "queued": 'sum(pipeshift_requests_queued{job="fe"})',
    "running": 'sum(pipeshift_requests_running{job="fe"})',
    "request_rate": 'sum(rate(pipeshift_requests_total{job="fe"}[60s]))',
    "prompt_tokens_rate": 'sum(rate(pipeshift_prompt_tokens_total{job="fe"}[60s]))',
    "generated_tokens_rate": 'sum(rate(pipeshift_generated_tokens_total{job="fe"}[60s]))',
    "step_seconds_per_layer": 'sum by (stage) (rate(pipeshift_stage_step_seconds_sum{job="fe"}[60s])) '
                              '/ sum by (stage) (rate(pipeshift_stage_step_seconds_count{job="fe"}[60s])) '
                              '/ max by (stage) (pipeshift_stage_layers{job="fe"})',
}


class _PromHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url = urllib.parse.urlparse(self.path)
        query = urllib.parse.parse_qs(url.query).get("query", [""])[0]
        self.server.seen.append(query)  # type: ignore[attr-defined]
        answer = self.server.answers.get(query)  # type: ignore[attr-defined]
        if url.path != "/api/v1/query" or answer is None:
            status, body = 400, {"status": "error", "errorType": "bad_data", "error": f"parse error in {query!r}"}
        else:
            status, body = 200, {"status": "success", "data": {"resultType": "vector", "result": [
                {"metric": labels, "value": [1732000000.123, value]} for labels, value in answer]}}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


class _ExpositionHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.server.render()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def prometheus() -> Iterator[http.server.HTTPServer]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PromHandler)
    srv.seen, srv.answers = [], {}  # type: ignore[attr-defined]
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def url_of(srv: http.server.HTTPServer) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}"


def build_source_with_window(config: PrometheusSourceConfig) -> PrometheusSource:
    return PrometheusSource.from_config(config, window_seconds=60)


def test_default_queries_use_the_documented_metric_names() -> None:
    assert default_queries(60, 'job="fe"') == EXPECTED
    assert default_queries(30)["queued"] == "sum(pipeshift_requests_queued)"
    assert "[30s]" in default_queries(30)["request_rate"]


def test_each_signal_is_one_instant_query_and_values_are_parsed(prometheus: http.server.HTTPServer) -> None:
    values = {"ttft_p95": "0.42", "tpot_p95": "0.0875", "queued": "3", "running": "12", "request_rate": "2.5",
              "prompt_tokens_rate": "1280", "generated_tokens_rate": "320"}
    prometheus.answers = {EXPECTED[k]: [({}, v)] for k, v in values.items()}
    prometheus.answers[EXPECTED["step_seconds_per_layer"]] = [({"stage": "0"}, "0.0004"), ({"stage": "1"}, "NaN"),
                                                              ({"stage": "2"}, "0.0011")]
    config = PrometheusSourceConfig(url=url_of(prometheus), selector='job="fe"')
    signals = build_source_with_window(config).read()
    assert sorted(prometheus.seen) == sorted(EXPECTED.values())
    assert (signals.ttft_p95, signals.tpot_p95, signals.queued, signals.running) == (0.42, 0.0875, 3.0, 12.0)
    assert math.isclose(signals.mean_tokens(signals.prompt_tokens_rate), 512.0)
    assert signals.step_seconds_per_layer == {"0": 0.0004, "2": 0.0011}  # a stage that did not step is unknown


def test_no_data_and_nan_read_as_unknown(prometheus: http.server.HTTPServer) -> None:
    prometheus.answers = {q: [] for q in EXPECTED.values()}
    prometheus.answers[EXPECTED["tpot_p95"]] = [({}, "NaN")]  # histogram_quantile over an empty window
    signals = build_source_with_window(PrometheusSourceConfig(url=url_of(prometheus), selector='job="fe"')).read()
    assert signals.tpot_p95 is None and signals.queued is None and not signals.idle


def test_overridden_queries_are_sent_verbatim(prometheus: http.server.HTTPServer) -> None:
    custom = 'max(pipeshift_requests_queued{namespace="team-a"})'
    prometheus.answers = {q: [({}, "1")] for q in EXPECTED.values()} | {custom: [({}, "7")]}
    config = PrometheusSourceConfig(url=url_of(prometheus), selector='job="fe"', queries=PromQueries(queued=custom))
    assert build_source_with_window(config).read().queued == 7.0
    assert custom in prometheus.seen


def test_several_series_or_a_refused_query_make_the_source_unavailable(prometheus: http.server.HTTPServer) -> None:
    prometheus.answers = {q: [({}, "1")] for q in EXPECTED.values()}
    prometheus.answers[EXPECTED["running"]] = [({"pod": "a"}, "1"), ({"pod": "b"}, "2")]
    source = build_source_with_window(PrometheusSourceConfig(url=url_of(prometheus), selector='job="fe"'))
    with pytest.raises(MetricsUnavailable, match="returned 2 series; aggregate it to one"):
        source.read()
    refused = PrometheusSource(url_of(prometheus), {"queued": "sum(("})
    with pytest.raises(MetricsUnavailable, match="Prometheus refused the queued query"):
        refused.read()


def test_a_policy_builds_the_source_it_names(prometheus: http.server.HTTPServer) -> None:
    source = build_source(MetricsConfig(window_seconds=60, prometheus={"url": url_of(prometheus),
                                                                         "selector": 'job="fe"'}))
    assert isinstance(source, PrometheusSource) and source.queries == EXPECTED


class _Feeder:
    """A frontend and an agent under steady load, as Prometheus would scrape them, one tick at a time."""

    def __init__(self) -> None:
        self.frontend, self.agent = FrontendMetrics(), AgentMetrics(stage="0")
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.frontend.running.set(5)
        self.frontend.queued.set(2)
        self.agent.layers.set(10)
        self.times: list[float] = []

    def ticks_since(self, start: float) -> int:
        return sum(t >= start for t in self.times)

    def tick(self) -> None:
        with self.lock:  # a scrape sees whole ticks, so every series grows in the same proportion
            self.times.append(time.monotonic())
            for value, times in ((0.04, 4), (0.06, 5), (0.09, 1)):
                for _ in range(times):
                    self.frontend.tpot.observe(value)
            self.frontend.ttft.observe(0.2)
            self.frontend.requests.labels("ok").inc()
            self.frontend.generated_tokens.inc(50)
            self.frontend.prompt_tokens.inc(100)
            self.agent.step.observe(0.03)

    def run(self) -> None:
        while not self.stop.wait(0.1):
            self.tick()

    def render(self) -> bytes:
        with self.lock:
            return generate_latest(self.frontend.registry) + generate_latest(self.agent.registry)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_against_a_real_prometheus_scraping_the_runtime_metrics(tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    assert binary is not None, "the prometheus binary is needed (`make tools` installs it)"
    feeder = _Feeder()
    target = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ExpositionHandler)
    target.render = feeder.render  # type: ignore[attr-defined]
    threading.Thread(target=target.serve_forever, args=(0.05,), daemon=True).start()
    threading.Thread(target=feeder.run, daemon=True).start()
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "fe", "static_configs": [{"targets": [f"127.0.0.1:{target.server_port}"]}]}],
    }))
    log = (tmp_path / "prometheus.log").open("w")
    server = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                               f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        window = 3.0
        source = PrometheusSource.from_config(
            PrometheusSourceConfig(url=f"http://127.0.0.1:{port}", selector='job="fe"'), window_seconds=window)
        deadline, signals = time.monotonic() + 45, None
        while time.monotonic() < deadline:
            try:
                signals = source.read()
            except MetricsUnavailable:  # not up yet
                signals = None
            if signals is not None and signals.tpot_p95 is not None and signals.step_seconds_per_layer:
                break
            time.sleep(0.5)
        assert signals is not None and signals.tpot_p95 is not None, (tmp_path / "prometheus.log").read_text()
        time.sleep(window + 1.5)  # until the rate window holds only steady load
        signals = source.read()
        ticks = feeder.ticks_since(time.monotonic() - window) / window
        assert (signals.running, signals.queued) == (5.0, 2.0)
        # Each tick adds 4 TPOTs in (0.025, 0.05], 5 in (0.05, 0.075], 1 in (0.075, 0.1]: p95 = 0.0875.
        assert math.isclose(signals.tpot_p95, 0.0875, rel_tol=1e-9)
        assert math.isclose(signals.ttft_p95, 0.1 + 0.15 * 0.95, rel_tol=1e-9)
        assert 0.7 * ticks < signals.request_rate < 1.3 * ticks  # one request per tick
        assert math.isclose(signals.mean_tokens(signals.generated_tokens_rate), 50, rel_tol=1e-9)
        assert math.isclose(signals.mean_tokens(signals.prompt_tokens_rate), 100, rel_tol=1e-9)
        assert signals.step_seconds_per_layer.keys() == {"0"}
        assert math.isclose(signals.step_seconds_per_layer["0"], 0.003, rel_tol=1e-9)
    finally:
        feeder.stop.set()
        server.terminate()
        server.wait(timeout=30)
        log.close()
        target.shutdown()
        target.server_close()
