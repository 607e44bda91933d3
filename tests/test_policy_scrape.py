"""The direct-scrape metric source against real HTTP servers serving the runtime's own metrics.

The exposition text is what the frontend and agents serve: their `pipeshift.runtime.metrics`
registries rendered by `prometheus_client`, so a renamed metric breaks this test. The parser is
checked against `prometheus_client`'s own parser on the same text.
"""

from __future__ import annotations

import http.server
import math
import random
import threading
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeshift.policy import exposition
from pipeshift.policy.scrape import ScrapeSource
from pipeshift.policy.source import MetricsUnavailable
from pipeshift.runtime.metrics import AgentMetrics, FrontendMetrics


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.server.render().encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def serve(render: Callable[[], str]) -> http.server.HTTPServer:
    srv = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    srv.render = render  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    return srv


def url(srv: http.server.HTTPServer) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/metrics"


Served = tuple[FrontendMetrics, http.server.HTTPServer]


@pytest.fixture
def frontend() -> Iterator[Served]:
    metrics = FrontendMetrics()
    srv = serve(lambda: generate_latest(metrics.registry).decode())
    yield metrics, srv
    srv.shutdown()
    srv.server_close()


def clock(*times: float) -> Callable[[], float]:
    it = iter(times)
    return lambda: next(it)


def test_p95_and_rates_come_from_the_window_between_two_scrapes(frontend: Served) -> None:
    m, srv = frontend
    for _ in range(50):  # slow history that must not leak into the window
        m.tpot.observe(0.2)
        m.ttft.observe(0.3)
    m.requests.labels("ok").inc(40)
    m.requests.labels("error").inc(2)
    m.generated_tokens.inc(4000)
    m.prompt_tokens.inc(9000)
    m.running.set(3)
    m.queued.set(1)
    source = ScrapeSource(url(srv), clock=clock(100.0, 115.0))
    first = source.read()
    assert (first.running, first.queued, first.tpot_p95, first.request_rate) == (3, 1, None, None)
    # In the window: 40 TPOTs in (0.025, 0.05], 50 in (0.05, 0.075], 10 in (0.075, 0.1]; TTFTs in (0.1, 0.25].
    for value, times in ((0.04, 40), (0.06, 50), (0.09, 10)):
        for _ in range(times):
            m.tpot.observe(value)
    for _ in range(100):
        m.ttft.observe(0.2)
    m.requests.labels("ok").inc(30)
    m.generated_tokens.inc(1500)
    m.prompt_tokens.inc(2400)
    m.running.set(5)
    m.queued.set(0)
    s = source.read()
    # Rank 95 of 100 lies in (0.075, 0.1], which holds ranks 91..100: 0.075 + 0.025 * (95 - 90) / 10.
    assert math.isclose(s.tpot_p95, 0.0875)
    assert math.isclose(s.ttft_p95, 0.1 + 0.15 * 95 / 100)
    assert math.isclose(s.request_rate, 30 / 15) and math.isclose(s.generated_tokens_rate, 1500 / 15)
    assert math.isclose(s.prompt_tokens_rate, 2400 / 15)
    assert (s.running, s.queued) == (5, 0)
    assert math.isclose(s.mean_tokens(s.generated_tokens_rate), 50.0)


def test_agents_add_each_stages_step_time_per_layer_over_the_window(frontend: Served) -> None:
    _, srv = frontend
    agents = [AgentMetrics(stage="0"), AgentMetrics(stage="1")]
    servers = [serve(lambda a=a: generate_latest(a.registry).decode()) for a in agents]
    try:
        agents[0].layers.set(10)
        agents[1].layers.set(6)
        for _ in range(100):
            agents[0].step.observe(0.02)
            agents[1].step.observe(0.09)
        source = ScrapeSource(url(srv), stage_urls=[url(s) for s in servers], clock=clock(0.0, 15.0))
        assert source.read().step_seconds_per_layer == {}
        for _ in range(50):  # stage 0 steps in the window, stage 1 does not
            agents[0].step.observe(0.03)
        measured = source.read().step_seconds_per_layer
        assert measured.keys() == {"0"} and math.isclose(measured["0"], 0.03 / 10)
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


def test_a_restarted_frontend_counts_from_zero(frontend: Served) -> None:
    m, srv = frontend
    m.requests.labels("ok").inc(500)
    m.generated_tokens.inc(9000)
    holder = {"metrics": m}
    srv.render = lambda: generate_latest(holder["metrics"].registry).decode()
    source = ScrapeSource(url(srv), clock=clock(0.0, 10.0))
    source.read()
    restarted = holder["metrics"] = FrontendMetrics()
    restarted.requests.labels("ok").inc(20)
    restarted.generated_tokens.inc(300)
    for _ in range(20):
        restarted.tpot.observe(0.4)
    s = source.read()
    assert math.isclose(s.request_rate, 2.0) and math.isclose(s.generated_tokens_rate, 30.0)
    assert 0.25 < s.tpot_p95 <= 0.5


def test_an_unreachable_or_garbled_endpoint_is_unavailable(frontend: Served) -> None:
    _, srv = frontend
    srv.render = lambda: "pipeshift_requests_running{stage=0} 1\n"
    with pytest.raises(MetricsUnavailable, match="bad label set"):
        ScrapeSource(url(srv)).read()
    address = url(srv)
    srv.shutdown()
    srv.server_close()
    with pytest.raises(MetricsUnavailable, match=f"cannot scrape {address}"):
        ScrapeSource(address, timeout_s=2).read()


def test_the_parser_reads_what_prometheus_client_reads() -> None:
    m, a = FrontendMetrics(), AgentMetrics(stage='we"ird\\stage')
    rng = random.Random(1)
    for _ in range(200):
        m.tpot.observe(rng.expovariate(20))
        a.step.observe(rng.expovariate(100))
    m.requests.labels("cancelled").inc(3)
    m.stage_up.labels("1").set(1)
    text = generate_latest(m.registry).decode() + generate_latest(a.registry).decode()
    ours = {(s.name, tuple(sorted(s.labels.items())), s.value) for s in exposition.parse(text)}
    theirs = {(s.name, tuple(sorted(s.labels.items())), s.value)
              for family in text_string_to_metric_families(text) for s in family.samples}
    assert ours == theirs


def test_bucket_quantiles_approach_the_true_quantile_of_the_observations() -> None:
    rng = random.Random(3)
    observations = [rng.random() for _ in range(20000)]
    bounds = [i / 100 for i in range(1, 101)] + [math.inf]
    cumulative = {b: float(sum(o <= b for o in observations)) for b in bounds}
    true_p95 = sorted(observations)[int(0.95 * len(observations)) - 1]
    assert abs(exposition.quantile(0.95, cumulative) - true_p95) < 0.01


def test_a_rank_past_the_last_finite_bucket_reports_that_bucket() -> None:
    assert exposition.quantile(0.95, {0.1: 10.0, 0.5: 50.0, math.inf: 100.0}) == 0.5
    assert exposition.quantile(0.95, {0.1: 0.0, math.inf: 0.0}) is None


def test_the_parser_reads_escapes_special_values_and_timestamps() -> None:
    samples = exposition.parse('# TYPE x gauge\nx{path="a\\"b\\\\c\\nd",le="+Inf"} NaN 1700000000000\n'
                               "y +Inf\nz -1.5e-3\n")
    assert samples[0].labels == {"path": 'a"b\\c\nd', "le": "+Inf"} and math.isnan(samples[0].value)
    assert samples[1].value == math.inf and samples[2].value == -0.0015
    with pytest.raises(exposition.ExpositionError, match="not a sample line"):
        exposition.parse("just words here\n")
