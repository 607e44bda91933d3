"""Every Prometheus metric pipeshift exports, in one place; docs/metrics.md is the contract.

Each agent and frontend builds its own registry, so several can live in one test process.
The planner calibrates from `pipeshift_stage_step_seconds`; the policy reads TTFT/TPOT and queue.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets from 1 ms to 60 s: TPOT lives in ms, TTFT and end-to-end in s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass
class FrontendMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.ttft = Histogram("pipeshift_ttft_seconds", "Time from arrival to the first generated token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("pipeshift_tpot_seconds", "Time between consecutive generated tokens of a request.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("pipeshift_e2e_latency_seconds", "Time from arrival to the request's end.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("pipeshift_requests_running", "Requests holding KV and generating.", registry=r)
        self.queued = Gauge("pipeshift_requests_queued", "Requests waiting for KV blocks.", registry=r)
        self.requests = Counter("pipeshift_requests", "Finished requests by outcome.", ["outcome"], registry=r)
        self.prompt_tokens = Counter("pipeshift_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generated_tokens = Counter("pipeshift_generated_tokens", "Tokens generated.", registry=r)
        self.stage_up = Gauge("pipeshift_stage_up", "1 when the frontend reaches the stage, else 0.", ["stage"],
                              registry=r)
        self.waiting_for_stages = Gauge("pipeshift_requests_waiting_for_stages",
                                        "Requests held while the pipeline is scaled to zero.", registry=r)


@dataclass
class AgentMetrics:
    stage: str
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r, s = self.registry, self.stage
        self.step = Histogram("pipeshift_stage_step_seconds", "Forward time of one micro-batch on a stage.",
                              ["stage"], buckets=STEP_BUCKETS, registry=r).labels(s)
        self.step_tokens = Counter("pipeshift_stage_tokens", "Tokens a stage computed.", ["stage"],
                                   registry=r).labels(s)
        self.layer_tokens = Counter("pipeshift_stage_layer_tokens", "(Position, layer) forward computations of a "
                                    "stage, failed batches included.", ["stage"], registry=r).labels(s)
        self.layers = Gauge("pipeshift_stage_layers", "Layers a stage holds.", ["stage"], registry=r).labels(s)
        self.kv_total = Gauge("pipeshift_kv_blocks_capacity", "Physical KV blocks in a stage's pool.", ["stage"],
                              registry=r).labels(s)
        self.kv_used = Gauge("pipeshift_kv_blocks_used", "KV blocks holding data.", ["stage"],
                             registry=r).labels(s)
        self.kv_reserved = Gauge("pipeshift_kv_blocks_reserved", "KV blocks reserved by admitted requests.",
                                 ["stage"], registry=r).labels(s)
        self.kv_block_bytes = Gauge("pipeshift_kv_block_bytes", "Bytes of one KV block.", ["stage"],
                                    registry=r).labels(s)
        self.frames_rejected = Counter("pipeshift_frames_rejected", "Data-plane frames refused as malformed.",
                                       ["stage"], registry=r).labels(s)
