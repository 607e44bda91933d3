"""The Prometheus metric source: one instant PromQL query per signal through `prometheus-api-client`.

Default queries use the names of docs/metrics.md, a rate/quantile window, and optional label
matchers so one Prometheus can serve several deployments. Each query must yield one series, except
the per-stage step time, which yields one series per `stage` label.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pipeshift.errors import UserError
from pipeshift.policy.schema import PrometheusSourceConfig
from pipeshift.policy.signals import PER_STAGE, SCALARS, Signals
from pipeshift.policy.source import MetricsUnavailable


def default_queries(window_seconds: float, selector: str = "") -> dict[str, str]:
    w = f"{round(window_seconds)}s"
    sel = f"{{{selector}}}" if selector else ""

    def p95(histogram: str) -> str:
        return f"histogram_quantile(0.95, sum by (le) (rate({histogram}_bucket{sel}[{w}])))"

    return {
        "ttft_p95": p95("pipeshift_ttft_seconds"),
        "tpot_p95": p95("pipeshift_tpot_seconds"),
        "queued": f"sum(pipeshift_requests_queued{sel})",
        "running": f"sum(pipeshift_requests_running{sel})",
        "request_rate": f"sum(rate(pipeshift_requests_total{sel}[{w}]))",
        "prompt_tokens_rate": f"sum(rate(pipeshift_prompt_tokens_total{sel}[{w}]))",
        "generated_tokens_rate": f"sum(rate(pipeshift_generated_tokens_total{sel}[{w}]))",
        PER_STAGE: (f"sum by (stage) (rate(pipeshift_stage_step_seconds_sum{sel}[{w}])) / sum by (stage) "
                    f"(rate(pipeshift_stage_step_seconds_count{sel}[{w}])) / max by (stage) "
                    f"(pipeshift_stage_layers{sel})"),
    }


class PrometheusSource:
    def __init__(self, url: str, queries: Mapping[str, str], timeout_s: float = 10.0) -> None:
        try:
            from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
        except ImportError:
            raise UserError("the Prometheus metric source needs prometheus-api-client "
                            "(pip install 'pipeshift[operator]'), or use `scrape: {url}`") from None
        names = (*SCALARS, PER_STAGE)
        unknown = set(queries) - set(names)
        if unknown:
            raise UserError(f"no signal named {', '.join(sorted(unknown))}; signals are {', '.join(names)}")
        self.queries = dict(queries)
        self._client_error = PrometheusApiClientException
        self._client = PrometheusConnect(url=url, timeout=timeout_s)

    @classmethod
    def from_config(cls, config: PrometheusSourceConfig, window_seconds: float) -> PrometheusSource:
        queries = default_queries(window_seconds, config.selector)
        queries.update({k: v for k, v in config.queries.model_dump().items() if v is not None})
        return cls(config.url, queries)

    def _series(self, signal: str, promql: str) -> list[dict]:
        try:
            return self._client.custom_query(promql)
        except self._client_error as e:
            raise MetricsUnavailable(f"Prometheus refused the {signal} query {promql!r}: {e}") from None
        except OSError as e:  # requests' connection errors derive from OSError
            raise MetricsUnavailable(f"cannot reach Prometheus for {signal}: {e}") from None

    def _query(self, signal: str, promql: str) -> float | None:
        result = self._series(signal, promql)
        if not result:
            return None
        if len(result) > 1:
            raise MetricsUnavailable(f"the {signal} query {promql!r} returned {len(result)} series; "
                                     "aggregate it to one, e.g. with sum(...)")
        value = float(result[0]["value"][1])
        return None if math.isnan(value) else value

    def _by_stage(self, promql: str) -> dict[str, float]:
        out = {}
        for series in self._series(PER_STAGE, promql):
            value = float(series["value"][1])
            if "stage" in series["metric"] and math.isfinite(value):
                out[series["metric"]["stage"]] = value
        return out

    def read(self) -> Signals:
        scalars = {signal: self._query(signal, q) for signal, q in self.queries.items() if signal != PER_STAGE}
        per_stage = self._by_stage(self.queries[PER_STAGE]) if PER_STAGE in self.queries else {}
        return Signals(**scalars, step_seconds_per_layer=per_stage)
