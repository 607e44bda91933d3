"""Scenario 5: idle → scale to zero → a request arrives → the stages come back and the request is served.

A pinned pipeline that opts in (`spec.scaleToZero: true`) under a policy with a short idle period: after
it the operator has the frontend let go of its stages, deletes every stage pod and reports `ScaledToZero`;
the frontend pod stays and holds the next request, whose demand the operator reads from the frontend's
`/metrics`; it brings the stage pods of the layout back and attaches them; the held request gets the
in-process engine's greedy tokens, and the cold start is in status and the operator's metrics.

Stand-ins as in `test_pinned_pipeline`: pods are local processes, the frontend is reached by its pod IP.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from e2e.bed import Cluster, FakeNode, ProcessKubelet
from e2e.bed.procs import wait_until
from e2e.streams import PhaseWatch, metric_value, reference, start_streams
from e2e.test_pinned_pipeline import (  # noqa: F401 - module fixtures: the chart, the operator, the model
    LAYERS,
    Operator,
    _apply,
    _events,
    _pipeline,
    _pipeline_obj,
    _policy,
    operator,
    tiny_model,
)

IDLE_SECONDS = 4
MAX_TOKENS = 16
PROMPTS = [[5, 17, 42, 99, 3], [250, 8]]


def _stage_pods(cluster: Cluster, namespace: str, name: str) -> list[str]:
    selector = f"pipeshift.dev/pipeline={name},pipeshift.dev/role=stage"
    return [p["metadata"]["name"] for p in
            cluster.rest.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector=selector)["items"]]


def test_an_idle_pipeline_scales_to_zero_and_a_request_brings_it_back(
    cluster: Cluster, kubelet: ProcessKubelet, gpu_nodes: tuple[FakeNode, ...], operator: Operator,  # noqa: F811
    namespace: str, tiny_model: Path, request: pytest.FixtureRequest,  # noqa: F811
) -> None:
    name = "sleepy"
    policy = _policy("sleepy")
    policy["spec"]["scale_to_zero"] = {"enabled": True, "idle_seconds": IDLE_SECONDS, "cold_start": "last"}
    _apply(cluster, namespace, policy)
    body = _pipeline(name, tiny_model, "sleepy")
    body["spec"]["scaleToZero"] = True
    _apply(cluster, namespace, body)
    wait_until(lambda: _pipeline_obj(cluster, namespace, name).get("status", {}).get("phase") == "Ready", 300,
               f"LLMPipeline {name} Ready", watch=[operator.proc], interval=0.5)
    status = _pipeline_obj(cluster, namespace, name)["status"]
    url, frontend_pod = status["frontend"]["url"], status["frontend"]["pod"]
    expected = reference(tiny_model, f"2,{LAYERS - 2}", PROMPTS, MAX_TOKENS)

    # Served while up; then idle.
    outcomes, threads = start_streams(url, name, PROMPTS[:1], MAX_TOKENS)
    threads[0].join(120)
    assert (outcomes[0].status, outcomes[0].error, outcomes[0].tokens) == (200, None, expected[0])
    idle_from = time.monotonic()
    wait_until(lambda: _pipeline_obj(cluster, namespace, name)["status"]["phase"] == "ScaledToZero", 120,
               f"{name} ScaledToZero", watch=[operator.proc], interval=0.5)
    request.node.user_properties.append(("seconds_last_request_to_zero", round(time.monotonic() - idle_from, 1)))
    assert time.monotonic() - idle_from >= IDLE_SECONDS
    wait_until(lambda: not _stage_pods(cluster, namespace, name), 60, "every stage pod gone")
    status = _pipeline_obj(cluster, namespace, name)["status"]
    assert status["frontend"]["pod"] == frontend_pod and status["stageCount"] == 0
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ScaledToZero")
    assert cluster.kubectl("get", "llmp", name, "-n", namespace).stdout.split("\n")[1].split()[3] == "ScaledToZero"

    # A request arrives at zero: held, seen, the stages come back, it is served exactly.
    watch = PhaseWatch(lambda: _pipeline_obj(cluster, namespace, name))
    asked = time.monotonic()
    outcomes, threads = start_streams(url, name, PROMPTS[1:], MAX_TOKENS)
    threads[0].join(300)
    served_in = time.monotonic() - asked
    wait_until(lambda: _pipeline_obj(cluster, namespace, name)["status"]["phase"] == "Ready", 120,
               "Ready again", watch=[operator.proc], interval=0.5)
    phases = watch.stop()
    assert (outcomes[0].status, outcomes[0].error, outcomes[0].tokens) == (200, None, expected[1])
    assert phases[0] == "ScaledToZero" and phases[-1] == "Ready", phases

    status = _pipeline_obj(cluster, namespace, name)["status"]
    assert status["frontend"]["pod"] == frontend_pod  # the frontend held the request; it was never restarted
    assert len(_stage_pods(cluster, namespace, name)) == 2 and status["stageCount"] == 2
    cold = status["coldStartSeconds"]
    assert 0 < cold <= served_in, (cold, served_in)
    request.node.user_properties.append(("cold_start_seconds_status", cold))
    request.node.user_properties.append(("seconds_request_at_zero_to_answer", round(served_in, 1)))
    reasons = [e["reason"] for e in _events(cluster, namespace, name)]
    for reason in ("ScaledToZero", "ScaleFromZero", "ColdStart"):
        assert reason in reasons, reasons
    assert metric_value(operator.metrics_url, "pipeshift_operator_cold_starts_total") == 1
    assert metric_value(operator.metrics_url, "pipeshift_operator_cold_start_seconds_total") == pytest.approx(cold)
    assert metric_value(operator.metrics_url, "pipeshift_operator_scale_to_zero_total") == 1

    # And it keeps serving through the attached stages.
    outcomes, threads = start_streams(url, name, PROMPTS[:1], MAX_TOKENS)
    threads[0].join(120)
    assert (outcomes[0].status, outcomes[0].error, outcomes[0].tokens) == (200, None, expected[0])
