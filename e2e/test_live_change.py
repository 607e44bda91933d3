"""A manual live change: `kubectl patch` of `spec.layout` from 2 to 3 stages across the two pools while a load
generator keeps requests in flight against the frontend pod → the operator starts the new stage pod, drives
the change phase by phase through the agents' and the frontend's control APIs, deletes nothing that serves,
and reports the figures; no request is lost (counted client-side), every output equals the in-process
engine's greedy tokens, and the frontend pod is the same process before and after (re-wired, not restarted).

Stand-ins as in `test_pinned_pipeline` (pods are local processes, the frontend is reached by its pod IP).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.bed import Cluster, FakeNode, ProcessKubelet
from e2e.bed.procs import wait_until
from e2e.operator_proc import LoadGenerator, OperatorProcess, lost, mismatched, running_operator, settled_committed
from e2e.test_pinned_pipeline import (  # noqa: F401 (tiny_model is a fixture)
    LAYERS,
    _apply,
    _events,
    _pipeline,
    _pipeline_obj,
    _policy,
    _reference,
    tiny_model,
)

PROMPTS = [[5, 17, 42, 99, 3], [250, 8], list(range(20, 60)), [7] * 12, [101, 202, 33, 44, 55, 66]]
MAX_TOKENS = 16
THREE = {"stages": [{"pool": "a100", "layers": [0, 2]}, {"pool": "l40s", "layers": [2, 3]},
                    {"pool": "l40s", "layers": [3, LAYERS]}]}


@pytest.fixture(scope="module")
def operator(cluster: Cluster, gpu_nodes: tuple[FakeNode, ...], helm: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    with running_operator(cluster, helm, tmp_path_factory.mktemp("operator")) as proc:
        yield proc


def serve_two_stages(cluster: Cluster, namespace: str, name: str, model: Path, operator: OperatorProcess) -> None:
    _apply(cluster, namespace, _policy("latency-slo"))
    _apply(cluster, namespace, _pipeline(name, model, "latency-slo"))
    wait_until(lambda: _pipeline_obj(cluster, namespace, name).get("status", {}).get("phase") == "Ready", 300,
               f"LLMPipeline {name} Ready", watch=[operator.proc], interval=0.5)


def patch_layout(cluster: Cluster, namespace: str, name: str, layout: dict[str, Any] | None) -> None:
    cluster.kubectl("patch", "llmp", name, "-n", namespace, "--type=merge", "-p",
                    json.dumps({"spec": {"layout": layout}}))


def committed_to(cluster: Cluster, namespace: str, name: str, summary: str) -> bool:
    status = _pipeline_obj(cluster, namespace, name).get("status", {})
    return settled_committed(status) and status.get("layoutSummary") == summary


def test_a_patched_layout_moves_live_under_load_losing_nothing(
    cluster: Cluster, kubelet: ProcessKubelet, gpu_nodes: tuple[FakeNode, ...], operator: OperatorProcess,
    namespace: str, tiny_model: Path, request: pytest.FixtureRequest,  # noqa: F811
) -> None:
    name = "live"
    serve_two_stages(cluster, namespace, name, tiny_model, operator)
    status = _pipeline_obj(cluster, namespace, name)["status"]
    frontend = status["frontend"]
    frontend_pid = kubelet.pid(namespace, frontend["pod"])
    old_pods = {s["pod"]: kubelet.pid(namespace, s["pod"]) for s in status["layout"]["stages"]}
    expected = _reference(tiny_model, PROMPTS, MAX_TOKENS)

    load = LoadGenerator(frontend["url"], name, PROMPTS, MAX_TOKENS, workers=4).start()
    wait_until(lambda: load.served() >= 8, 120, "the load generator's first answers")
    before = load.served()
    started = time.monotonic()
    patch_layout(cluster, namespace, name, THREE)
    wait_until(lambda: committed_to(cluster, namespace, name, "a100:0-2,l40s:2-3,l40s:3-4"), 150,
               "the live change committed", watch=[operator.proc], interval=0.3)
    seconds = time.monotonic() - started
    served_during = load.served() - before
    wait_until(lambda: load.served() >= before + served_during + 8, 120, "answers through the new layout")
    outcomes = load.stop()
    request.node.user_properties.append(("seconds_patch_to_committed", round(seconds, 1)))

    assert not lost(outcomes), lost(outcomes)[:3]
    assert not mismatched(outcomes, expected), mismatched(outcomes, expected)[:3]
    assert served_during > 0, "no request was answered while the change ran: the test proves nothing"

    status = _pipeline_obj(cluster, namespace, name)["status"]
    last = status["lastReconfiguration"]
    request.node.user_properties.append(("switch_pause_ms", last["pauseMs"]))
    request.node.user_properties.append(("reconfiguration_ms", last["durationMs"]))
    assert last["outcome"] == "committed" and last["durationMs"] > 0 and last["pauseMs"] >= 0
    assert last["kvBytesMoved"] > 0  # requests were live: their KV of layer 3 moved to the new stage
    assert [(s["pool"], s["layers"]) for s in status["layout"]["stages"]] == \
        [(s["pool"], s["layers"]) for s in THREE["stages"]]
    assert status["stageCount"] == 3
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Reconfiguring"]["status"] == "False" and conditions["Ready"]["status"] == "True"
    # The frontend and the stages that stayed are the same processes: re-wired, not restarted.
    assert status["frontend"]["pod"] == frontend["pod"] and kubelet.pid(namespace, frontend["pod"]) == frontend_pid
    for pod, pid in old_pods.items():
        assert kubelet.pid(namespace, pod) == pid, f"{pod} was restarted"
    reasons = [e["reason"] for e in _events(cluster, namespace, name)]
    assert "Reconfiguring" in reasons and "Reconfigured" in reasons, reasons
    assert reasons.count("CreatedStagePod") == 3 and "UpdatedFrontend" not in reasons, reasons
    assert operator.metric("pipeshift_operator_reconfigurations_total", outcome="committed") >= 1

    # Removing spec.layout hands the layout to the policy; with no reason to move, the 3 stages serve on.
    patch_layout(cluster, namespace, name, None)
    time.sleep(3)
    status = _pipeline_obj(cluster, namespace, name)["status"]
    assert status["phase"] == "Ready" and status["layoutSummary"] == "a100:0-2,l40s:2-3,l40s:3-4"
