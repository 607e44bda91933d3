"""Scenario 6: a stage pod is deleted while requests stream → the pipeline goes Degraded (naming the stage)
→ the operator creates the pod again with the same layer range and re-wires the running frontend onto it
(no frontend restart) → the affected requests are re-prefilled, counted in status and an Event → Ready.
Every request finishes (counted client-side) with the in-process engine's greedy tokens.

Stand-ins as in `test_pinned_pipeline`: pods are local processes of the process kubelet, the frontend is
reached by its pod IP (no kube-proxy), the operator runs beside the bed with the chart's ServiceAccount.
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

MAX_TOKENS = 400
PROMPTS = [[5, 17, 42, 99, 3], [250, 8], list(range(20, 40)), [7, 7, 7], [1, 2, 3, 4, 5, 6], [299, 0, 150]]


def test_a_deleted_stage_pod_is_restored_and_its_requests_finish_exactly(
    cluster: Cluster, kubelet: ProcessKubelet, gpu_nodes: tuple[FakeNode, ...], operator: Operator,  # noqa: F811
    namespace: str, tiny_model: Path, request: pytest.FixtureRequest,  # noqa: F811
) -> None:
    name = "restore"
    _apply(cluster, namespace, _policy("latency-slo"))
    _apply(cluster, namespace, _pipeline(name, tiny_model, "latency-slo"))
    wait_until(lambda: _pipeline_obj(cluster, namespace, name).get("status", {}).get("phase") == "Ready", 300,
               f"LLMPipeline {name} Ready", watch=[operator.proc], interval=0.5)
    status = _pipeline_obj(cluster, namespace, name)["status"]
    url, frontend_pod = status["frontend"]["url"], status["frontend"]["pod"]
    victim = next(s for s in status["layout"]["stages"] if s["stageId"] == 1)
    expected = reference(tiny_model, f"2,{LAYERS - 2}", PROMPTS, MAX_TOKENS)

    watch = PhaseWatch(lambda: _pipeline_obj(cluster, namespace, name))
    outcomes, threads = start_streams(url, name, PROMPTS, MAX_TOKENS)
    wait_until(lambda: all(o.first_token_at is not None or o.ended_at is not None for o in outcomes), 120,
               "every stream's first token")
    assert not any(o.ended_at for o in outcomes), "the requests ended before the stage was deleted: make them longer"
    struck = time.monotonic()
    cluster.kubectl("delete", "pod", victim["pod"], "-n", namespace, "--wait=false")

    for t in threads:
        t.join(600)
    wait_until(lambda: _pipeline_obj(cluster, namespace, name)["status"]["phase"] == "Ready", 120,
               "Ready again", watch=[operator.proc], interval=0.5)
    phases = watch.stop()
    request.node.user_properties.append(("seconds_delete_to_all_finished",
                                         round(max(o.ended_at or 0 for o in outcomes) - struck, 1)))

    # Nothing lost, counted client-side, and every output is the reference's.
    failed = [(i, o.status, o.error) for i, o in enumerate(outcomes) if o.status != 200 or o.error]
    assert not failed, failed
    assert [o.tokens for o in outcomes] == expected

    # Degraded (naming the stage) then Ready; the frontend was re-wired, not restarted.
    assert "Degraded" in phases and phases[-1] == "Ready", phases
    assert phases.index("Degraded") < len(phases) - 1
    status = _pipeline_obj(cluster, namespace, name)["status"]
    assert status["frontend"]["pod"] == frontend_pod
    restored = next(s for s in status["layout"]["stages"] if s["stageId"] == 1)
    assert restored["layers"] == victim["layers"] and restored["podIP"] != victim["podIP"]
    assert status["requestsReprefilled"] >= 1 and status["tokensRecomputed"] >= 1, status
    assert status["lastRestore"]["stages"] == [1]
    request.node.user_properties.append(("requests_reprefilled", status["requestsReprefilled"]))
    request.node.user_properties.append(("tokens_recomputed", status["tokensRecomputed"]))

    events = _events(cluster, namespace, name)
    lost = [e for e in events if e["reason"] == "StageLost"]
    assert lost and "stage 1" in lost[0]["message"], [e["reason"] for e in events]
    restores = [e for e in events if e["reason"] == "RestoredStage"]
    assert len(restores) == 1 and f"{status['requestsReprefilled']} requests re-prefilled" in restores[0]["message"]
    assert "UpdatedFrontend" not in [e["reason"] for e in events]
    assert metric_value(operator.metrics_url, "pipeshift_operator_stage_restores_total") == 1
    assert metric_value(operator.metrics_url, "pipeshift_operator_requests_reprefilled_total",
                        cause="stage_restored") == status["requestsReprefilled"]
