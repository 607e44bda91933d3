"""The autoscaling policy file: its schema (pydantic, unknown keys rejected) and JSON Schema exports.

`json_schema()` is the full schema; `crd_schema()` is the same inlined into the structural form a
Kubernetes CRD's `openAPIV3Schema` accepts (no `$ref`, nullable instead of `anyOf: [.., null]`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeshift.api import Layout, LayoutError, StagePlan

Url = Annotated[str, Field(pattern=r"^https?://\S+$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Targets(Strict):
    ttft_p95_seconds: float = Field(gt=0, description="time to first token, p95")
    tpot_p95_seconds: float = Field(gt=0, description="time per output token, p95")
    max_queue: int = Field(ge=0, description="requests waiting for KV blocks before it counts as a breach")
    headroom: float = Field(0.8, gt=0, le=1,
                            description="the planner aims at targets x headroom, so noise does not re-trigger")


class StageBounds(Strict):
    min: int = Field(1, ge=1)
    max: int | None = Field(None, ge=1, description="default: as many as the allowed pools have devices")

    @model_validator(mode="after")
    def _ordered(self) -> StageBounds:
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) must be at least min ({self.min})")
        return self


class PoolChoice(Strict):
    name: str = Field(min_length=1, description="a pool of the cluster's pools file")
    cost_per_hour: float | None = Field(None, ge=0, description="overrides the pool's price for this policy")


class ScaleUp(Strict):
    stabilization_seconds: float = Field(60, ge=0, description="a breach must last this long")
    cooldown_seconds: float = Field(120, ge=0, description="after the last change finished")


class ScaleDown(Strict):
    enabled: bool = True
    below_fraction: float = Field(0.5, gt=0, lt=1,
                                  description="every signal under this fraction of its target counts as calm")
    stabilization_seconds: float = Field(300, ge=0)
    cooldown_seconds: float = Field(600, ge=0)


class ScaleToZero(Strict):
    enabled: bool = False
    idle_seconds: float = Field(900, gt=0, description="no running, queued or arriving requests for this long")
    cold_start: Literal["plan", "last"] = Field(
        "plan", description="on the first request: plan afresh, or bring back the layout released")


class Reconfiguration(Strict):
    strategy: Literal["live", "drain"] = Field(
        "live", description="live: move layers while serving; drain: finish running requests, then switch")
    max_switches_per_hour: int = Field(6, ge=0, description="switch budget; cold starts are exempt")
    migration_horizon_seconds: float = Field(3600, gt=0, description="a move's cost is amortised over this")
    precopy_bytes_per_second: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="cap on the KV pre-copy that runs beside serving, all stage pairs together; unset: uncapped")


class PromQueries(Strict):
    """PromQL per signal; unset ones are built from docs/metrics.md names and `selector`."""

    ttft_p95: str | None = None
    tpot_p95: str | None = None
    queued: str | None = None
    running: str | None = None
    request_rate: str | None = None
    prompt_tokens_rate: str | None = None
    generated_tokens_rate: str | None = None
    step_seconds_per_layer: str | None = Field(None, description="one series per `stage` label")


class PrometheusSourceConfig(Strict):
    url: Url = Field(description="Prometheus base URL")
    selector: str = Field("", description='label matchers added to every metric, e.g. job="pipeshift"')
    queries: PromQueries = PromQueries()


class ScrapeSourceConfig(Strict):
    url: Url = Field(description="the frontend's /metrics URL")
    stage_urls: list[Url] = Field(default_factory=list,
                                  description="the agents' /metrics URLs, for measured per-layer step times")


class MetricsConfig(Strict):
    interval_seconds: float = Field(15, gt=0, description="how often the loop reads metrics and decides")
    window_seconds: float = Field(60, gt=0, description="rate and quantile window of the PromQL queries")
    prometheus: PrometheusSourceConfig | None = None
    scrape: ScrapeSourceConfig | None = None

    @model_validator(mode="after")
    def _one_source(self) -> MetricsConfig:
        if (self.prometheus is None) == (self.scrape is None):
            raise ValueError("set exactly one metric source: `prometheus: {url}` or `scrape: {url}`")
        return self


class WorkloadDefaults(Strict):
    """Lengths assumed when the metrics cannot tell (no finished requests yet, a cold start)."""

    prompt_tokens: float = Field(512, ge=1)
    output_tokens: float = Field(128, ge=1)


class PinnedStage(Strict):
    pool: str = Field(min_length=1)
    layers: tuple[int, int] = Field(description="[start, end), end exclusive")


class Pin(Strict):
    stages: list[PinnedStage] = Field(min_length=1)

    @model_validator(mode="after")
    def _a_layout(self) -> Pin:
        try:
            self.layout()
        except LayoutError as e:
            raise ValueError(str(e)) from None
        return self

    def layout(self) -> Layout:
        return Layout(tuple(StagePlan(i, s.pool, s.layers[0], s.layers[1]) for i, s in enumerate(self.stages)))


class AutoscalingPolicy(Strict):
    name: str = Field(min_length=1)
    enabled: bool = Field(True, description="false: never propose a change")
    mode: Literal["latency", "cost"] = Field(
        "cost", description="scale-ups take the fastest plan (latency) or the cheapest meeting the targets (cost)")
    pin: Pin | None = Field(None, description="always run this layout")
    targets: Targets
    stages: StageBounds = StageBounds()
    pools: list[PoolChoice] = Field(default_factory=list, description="allowed pools; empty allows all")
    scale_up: ScaleUp = ScaleUp()
    scale_down: ScaleDown = ScaleDown()
    scale_to_zero: ScaleToZero = ScaleToZero()
    reconfiguration: Reconfiguration = Reconfiguration()
    metrics: MetricsConfig
    workload: WorkloadDefaults = WorkloadDefaults()


def json_schema() -> dict[str, Any]:
    return AutoscalingPolicy.model_json_schema()


def crd_schema() -> dict[str, Any]:
    """The schema inlined for a CRD. Unknown keys are left to the API server's strict field validation."""
    full = json_schema()
    defs = full.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, list):
            return [inline(x) for x in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            target = inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {**target, **{k: inline(v) for k, v in node.items() if k != "$ref"}}
        options = node.get("anyOf")
        if options and {"type": "null"} in options and len(options) == 2:
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            other = next(o for o in options if o != {"type": "null"})
            return {**inline(other), **{k: inline(v) for k, v in rest.items()}, "nullable": True}
        if node.get("type") == "array" and "prefixItems" in node:
            # A fixed-length tuple: structural schemas want one item schema and bounds.
            items = node["prefixItems"]
            rest = {k: v for k, v in node.items() if k not in ("prefixItems", "items")}
            return {**rest, "items": inline(items[0]), "minItems": len(items), "maxItems": len(items)}
        return {k: inline(v) for k, v in node.items() if not (k == "additionalProperties" and v is False)}

    return inline(full)
