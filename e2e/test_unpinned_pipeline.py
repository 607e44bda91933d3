"""Scenario: an LLMPipeline without `spec.layout` starts on the layout its policy plans.

`kubectl apply` an AutoscalingPolicy (allowed pools: l40s only, 2 to 3 stages, cost mode) and a pipeline that
names it and pins nothing. The operator reads the allocatable `nvidia.com/gpu` of the Nodes each pool's
nodeSelector matches, plans the first layout for zero load (the cheapest meeting the targets: 2 stages, both
on l40s), says so in an `InitialLayout` Event, and serves it like a pinned one: the real scheduler puts both
stage pods on l40s nodes, the frontend becomes Ready, and requests get the in-process engine's greedy tokens.
Then the policy is tightened (a TTFT target no load meets, exactly 3 stages): under load the autoscaling loop
(scraping the pods directly, no Prometheus) sees the breach and moves the pipeline live to 3 stages, losing
no request and answering with the same tokens.

Stand-ins as in `test_pinned_pipeline`: pods are local processes, the frontend is reached by its pod IP.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import requests

from e2e.bed import Cluster, FakeNode, ProcessKubelet
from e2e.bed.procs import wait_until
from e2e.operator_proc import LoadGenerator, lost, mismatched, settled_committed
from e2e.test_pinned_pipeline import (  # noqa: F401 - module fixtures: the chart, the operator, the model
    Operator,
    _apply,
    _events,
    _pipeline,
    _pipeline_obj,
    _reference,
    operator,
    tiny_model,
)

MAX_TOKENS = 12
PROMPTS = [[5, 17, 42, 99, 3], [250, 8], list(range(20, 60))]


def l40s_policy(name: str, *, tight: bool = False) -> dict[str, Any]:
    """Only l40s, 2 to 3 stages, the cheapest layout meeting the targets. `tight` (the scale-up half of the
    scenario): a TTFT target no load meets, a breach acted on after 2 s, exactly 3 stages."""
    targets = {"ttft_p95_seconds": 0.0005 if tight else 0.5, "tpot_p95_seconds": 10, "max_queue": 1000}
    return {"apiVersion": "pipeshift.dev/v1alpha1", "kind": "AutoscalingPolicy", "metadata": {"name": name},
            "spec": {"name": name, "mode": "cost", "targets": targets, "stages": {"min": 3 if tight else 2, "max": 3},
                     "pools": [{"name": "l40s"}],
                     "scale_up": {"stabilization_seconds": 2 if tight else 600, "cooldown_seconds": 0},
                     "scale_down": {"enabled": False},
                     "reconfiguration": {"strategy": "live", "max_switches_per_hour": 1},
                     # The operator scrapes the pods it runs; this URL is for local tools only.
                     "metrics": {"interval_seconds": 1, "window_seconds": 10,
                                 "scrape": {"url": "http://frontend.invalid:8000/metrics"}}}}


def _complete(url: str, name: str, prompt: list[int]) -> list[int]:
    session = requests.Session()
    session.trust_env = False  # pod IPs: never through a proxy from the environment
    resp = session.post(f"{url}/v1/completions", timeout=120, json={
        "model": name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True})
    assert resp.status_code == 200, resp.text
    return list(resp.json()["choices"][0]["token_ids"])


def test_a_pipeline_without_a_layout_starts_on_the_policys_plan_then_scales_live(
    cluster: Cluster, kubelet: ProcessKubelet, gpu_nodes: tuple[FakeNode, ...], operator: Operator,  # noqa: F811
    namespace: str, tiny_model: Path, request: pytest.FixtureRequest,  # noqa: F811
) -> None:
    name = "unpinned"
    _apply(cluster, namespace, l40s_policy("l40s-only"))
    body = _pipeline(name, tiny_model, "l40s-only")
    del body["spec"]["layout"]
    started = time.monotonic()
    _apply(cluster, namespace, body)
    wait_until(lambda: _pipeline_obj(cluster, namespace, name).get("status", {}).get("phase") == "Ready", 300,
               f"LLMPipeline {name} Ready", watch=[operator.proc], interval=0.5)
    request.node.user_properties.append(("seconds_apply_to_ready", round(time.monotonic() - started, 1)))
    status = _pipeline_obj(cluster, namespace, name)["status"]

    # The plan: 2 stages (the policy's minimum is the cheapest), on l40s only; the scheduler agreed.
    stages = status["layout"]["stages"]
    assert [s["pool"] for s in stages] == ["l40s", "l40s"] and status["stageCount"] == 2
    assert stages[0]["layers"][0] == 0 and stages[0]["layers"][1] == stages[1]["layers"][0]
    assert stages[1]["layers"][1] == 4
    pool_of = {n.name: n.pool for n in gpu_nodes}
    for stage in stages:
        pod = cluster.rest.get(f"/api/v1/namespaces/{namespace}/pods/{stage['pod']}")
        assert pool_of[pod["spec"]["nodeName"]] == "l40s"
        assert pod["status"]["podIP"] == stage["podIP"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Serving")
    assert "layout" not in _pipeline_obj(cluster, namespace, name)["spec"], "the spec stays unpinned"

    # The Event says which layout and why.
    events = _events(cluster, namespace, name)
    initial = [e for e in events if e["reason"] == "InitialLayout"]
    assert len(initial) == 1 and initial[0]["type"] == "Normal", [e["reason"] for e in events]
    assert f"starting {status['layoutSummary']}, planned by policy l40s-only (mode cost" in initial[0]["message"]
    assert "at zero load over l40s (8x l40s), stages 2..3: 2 stages" in initial[0]["message"]
    assert not {"PolicyNotFound", "InvalidSpec", "Unschedulable"} & {e["reason"] for e in events}

    # The in-process engine's greedy tokens through the frontend pod (float64: the split changes nothing).
    expected = _reference(tiny_model, PROMPTS, MAX_TOKENS)
    frontend = status["frontend"]
    for prompt, want in zip(PROMPTS, expected, strict=True):
        assert _complete(frontend["url"], name, prompt) == want

    # The policy owns the layout from here: tightened targets and load move it live to 3 stages.
    _apply(cluster, namespace, l40s_policy("l40s-only", tight=True))
    load = LoadGenerator(frontend["url"], name, PROMPTS, MAX_TOKENS, workers=4).start()
    began = time.monotonic()
    try:
        def scaled() -> bool:
            s = _pipeline_obj(cluster, namespace, name).get("status", {})
            return settled_committed(s) and s.get("stageCount") == 3

        wait_until(scaled, 240, "the policy's live scale-up to 3 stages", watch=[operator.proc], interval=0.5)
        request.node.user_properties.append(("seconds_load_to_scaled", round(time.monotonic() - began, 1)))
        served = load.served()
        wait_until(lambda: load.served() >= served + 8, 120, "answers through the new layout")
    finally:
        outcomes = load.stop()
    assert not lost(outcomes), lost(outcomes)[:3]
    assert not mismatched(outcomes, expected), mismatched(outcomes, expected)[:3]
    status = _pipeline_obj(cluster, namespace, name)["status"]
    assert [s["pool"] for s in status["layout"]["stages"]] == ["l40s"] * 3
    assert status["frontend"]["pod"] == frontend["pod"]  # re-wired, not restarted
    assert "TTFT p95" in status["lastReconfiguration"]["reason"]
    reasons = [e["reason"] for e in _events(cluster, namespace, name)]
    assert reasons.count("InitialLayout") == 1 and "ScaleUp" in reasons and "Reconfigured" in reasons
