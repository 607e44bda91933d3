"""Scenario 3: load rises → the autoscaling loop reconfigures live from 2 to 3 stages.

A real Prometheus scrapes the frontend and the agents; the policy reads it (`metrics.prometheus`), with a
TTFT target no load can meet and short stabilization windows, and allows exactly 3 stages. The pipeline
starts pinned at 2 stages; removing `spec.layout` hands it to the policy, which holds while there is no load
(nothing to judge), then, once a load generator runs, sees the breach, plans 3 stages over `spec.pools`
(capacity from the Nodes' allocatable GPUs) and the operator moves there live: nothing lost, outputs equal to
the in-process engine's, Events that say why.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.bed import Cluster, FakeNode, ProcessKubelet, scrape_config
from e2e.bed.procs import wait_until
from e2e.operator_proc import LoadGenerator, OperatorProcess, lost, mismatched, running_operator, settled_committed
from e2e.test_live_change import MAX_TOKENS, PROMPTS, patch_layout
from e2e.test_pinned_pipeline import (  # noqa: F401 (tiny_model is a fixture)
    _apply,
    _events,
    _pipeline,
    _pipeline_obj,
    _reference,
    tiny_model,
)


@pytest.fixture(scope="module")
def operator(cluster: Cluster, gpu_nodes: tuple[FakeNode, ...], helm: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    with running_operator(cluster, helm, tmp_path_factory.mktemp("operator-autoscale")) as proc:
        yield proc


def burst_policy(prometheus_url: str) -> dict[str, Any]:
    """Any load breaches the TTFT target; breaches act after 2 s; exactly 3 stages; one switch per hour."""
    return {"apiVersion": "pipeshift.dev/v1alpha1", "kind": "AutoscalingPolicy", "metadata": {"name": "burst"},
            "spec": {"name": "burst", "mode": "latency",
                     "targets": {"ttft_p95_seconds": 0.0005, "tpot_p95_seconds": 10, "max_queue": 1000},
                     "stages": {"min": 3, "max": 3}, "pools": [{"name": "a100"}, {"name": "l40s"}],
                     "scale_up": {"stabilization_seconds": 2, "cooldown_seconds": 0},
                     "scale_down": {"enabled": False},
                     "reconfiguration": {"strategy": "live", "max_switches_per_hour": 1},
                     "metrics": {"interval_seconds": 1, "window_seconds": 10,
                                 "prometheus": {"url": prometheus_url, "selector": 'job=~"pipeshift-.*"'}}}}


def test_rising_load_scales_live_from_two_to_three_stages(
    cluster: Cluster, kubelet: ProcessKubelet, gpu_nodes: tuple[FakeNode, ...], operator: OperatorProcess,
    namespace: str, tiny_model: Path, prometheus: Any, request: pytest.FixtureRequest,  # noqa: F811
) -> None:
    name = "auto"
    body = _pipeline(name, tiny_model, "burst")
    # The policy needs Prometheus' address, Prometheus the pods': start pinned without a policy first.
    del body["spec"]["policy"]
    _apply(cluster, namespace, body)
    wait_until(lambda: _pipeline_obj(cluster, namespace, name).get("status", {}).get("phase") == "Ready", 300,
               f"LLMPipeline {name} Ready", watch=[operator.proc], interval=0.5)
    status = _pipeline_obj(cluster, namespace, name)["status"]
    frontend = status["frontend"]
    stages = [f"{s['podIP']}:9000" for s in status["layout"]["stages"]]
    prom = prometheus([scrape_config("pipeshift-frontend", [f"{frontend['podIP']}:8000"]),
                       scrape_config("pipeshift-agents", stages)])
    prom.wait_for_samples('pipeshift_requests_running{job="pipeshift-frontend"}')
    _apply(cluster, namespace, burst_policy(prom.url))
    cluster.kubectl("patch", "llmp", name, "-n", namespace, "--type=merge", "-p", '{"spec":{"policy":"burst"}}')
    patch_layout(cluster, namespace, name, None)  # hand the layout to the policy

    # No load: no latency to judge, so the policy holds (and says nothing).
    time.sleep(4)
    status = _pipeline_obj(cluster, namespace, name)["status"]
    assert status["phase"] == "Ready" and status["stageCount"] == 2 and not status.get("reconfiguration")
    assert operator.metric("pipeshift_operator_autoscale_decisions_total", kind="hold") >= 1

    expected = _reference(tiny_model, PROMPTS, MAX_TOKENS)
    load = LoadGenerator(frontend["url"], name, PROMPTS, MAX_TOKENS, workers=4).start()
    started = time.monotonic()
    try:
        def scaled() -> bool:
            s = _pipeline_obj(cluster, namespace, name).get("status", {})
            return settled_committed(s) and s.get("stageCount") == 3

        wait_until(scaled, 240, "the policy's live scale-up to 3 stages", watch=[operator.proc], interval=0.5)
        request.node.user_properties.append(("seconds_load_to_scaled", round(time.monotonic() - started, 1)))
        served = load.served()
        wait_until(lambda: load.served() >= served + 8, 120, "answers through the new layout")
    finally:
        outcomes = load.stop()
    assert not lost(outcomes), lost(outcomes)[:3]
    assert not mismatched(outcomes, expected), mismatched(outcomes, expected)[:3]

    status = _pipeline_obj(cluster, namespace, name)["status"]
    last = status["lastReconfiguration"]
    request.node.user_properties.append(("switch_pause_ms", last["pauseMs"]))
    assert len(status["layout"]["stages"]) == 3
    assert {s["pool"] for s in status["layout"]["stages"]} <= {"a100", "l40s"}
    assert "TTFT p95" in last["reason"], last
    assert status["frontend"]["pod"] == frontend["pod"]  # re-wired, not restarted
    events = {e["reason"]: e["message"] for e in _events(cluster, namespace, name)}
    assert "TTFT p95" in events.get("ScaleUp", ""), events
    assert "TTFT p95" in events.get("Reconfiguring", ""), events
    assert "Reconfigured" in events
    assert operator.metric("pipeshift_operator_autoscale_decisions_total", kind="scale_up") == 1
    assert operator.metric("pipeshift_operator_reconfigurations_total", outcome="committed") >= 1
