"""A stage pod deleted in the middle of a live change, under load: before the point of no return the change rolls
back (the old layout serves on, the dead stage is restored, then the move is made again under a new id); after
it, the change rolls forward (the stage comes back in its *new* range and the frontend prefills its requests
again). Either way no request is lost (counted client-side) and every output is the reference's.

The change is held at a phase deterministically: `PIPESHIFT_OPERATOR_FAULT=<phase>` makes the operator exit
right after writing that phase; the stage pod is deleted while it is down, and the operator started again
finds it gone. The victim is stage 1, kept by the change with another range (2 ↔ 3 stages).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.bed import Cluster, FakeNode, ProcessKubelet
from e2e.bed.procs import wait_until
from e2e.operator_proc import LoadGenerator, OperatorProcess, installed_chart, lost, mismatched, settled_committed
from e2e.test_live_change import MAX_TOKENS, PROMPTS, THREE, patch_layout, serve_two_stages
from e2e.test_operator_restart import TWO, summary
from e2e.test_pinned_pipeline import (  # noqa: F401 (tiny_model is a fixture)
    _events,
    _pipeline_obj,
    _reference,
    tiny_model,
)

NAME = "deathmid"
VICTIM = 1


class Bed:
    def __init__(self, cluster: Cluster, namespace: str, operator: OperatorProcess, expected: list[list[int]]) -> None:
        self.cluster, self.namespace, self.operator, self.expected = cluster, namespace, operator, expected

    def status(self) -> dict[str, Any]:
        return _pipeline_obj(self.cluster, self.namespace, NAME).get("status", {})

    def pod(self, name: str) -> dict[str, Any] | None:
        found = self.cluster.rest.get(f"/api/v1/namespaces/{self.namespace}/pods",
                                      fieldSelector=f"metadata.name={name}")["items"]
        return found[0] if found else None


@pytest.fixture(scope="module")
def bed(cluster: Cluster, gpu_nodes: tuple[FakeNode, ...], helm: Path, tiny_model: Path,  # noqa: F811
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    work = tmp_path_factory.mktemp("stage-death")
    namespace = f"e2e-{uuid.uuid4().hex[:8]}"
    cluster.rest.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    wait_until(lambda: bool(cluster.rest.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/default").get("secrets")),
               60, "the namespace's default ServiceAccount token")
    with installed_chart(cluster, helm, work) as kubeconfig:
        operator = OperatorProcess(cluster, kubeconfig, work).start()
        try:
            serve_two_stages(cluster, namespace, NAME, tiny_model, operator)
            yield Bed(cluster, namespace, operator, _reference(tiny_model, PROMPTS, MAX_TOKENS))
        finally:
            if operator.proc is None or not operator.proc.running():
                cluster.kubectl("patch", "llmp", NAME, "-n", namespace, "--type=merge", "-p",
                                '{"metadata":{"finalizers":null}}', check=False)
            cluster.kubectl("delete", "llmp", NAME, "-n", namespace, "--timeout=60s", check=False)
            operator.stop()
            cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.mark.parametrize(("phase", "outcome"), [("precopying", "rollback"), ("retiring", "forward")])
def test_a_stage_pod_deleted_mid_change_rolls_back_or_forward_losing_nothing(
    bed: Bed, kubelet: ProcessKubelet, phase: str, outcome: str, request: pytest.FixtureRequest,
) -> None:
    before = bed.status()
    target = TWO if before["layoutSummary"] == summary(THREE) else THREE
    victim = next(s for s in before["layout"]["stages"] if s["stageId"] == VICTIM)
    new_range = next(s["layers"] for i, s in enumerate(target["stages"]) if i == VICTIM)
    frontend = before["frontend"]
    bed.operator.stop()
    bed.operator.start({"PIPESHIFT_OPERATOR_FAULT": phase})
    load = LoadGenerator(frontend["url"], NAME, PROMPTS, MAX_TOKENS, workers=3).start()
    try:
        wait_until(lambda: load.served() >= 4, 120, "the load generator's first answers")
        patch_layout(bed.cluster, bed.namespace, NAME, target)
        proc = bed.operator.proc
        assert proc is not None
        wait_until(lambda: not proc.running(), 120, f"the operator to exit in phase {phase}")
        held = bed.status()["reconfiguration"]
        assert held["phase"] == phase, held
        struck = time.monotonic()
        bed.cluster.kubectl("delete", "pod", victim["pod"], "-n", bed.namespace, "--wait=false")
        wait_until(lambda: (bed.pod(victim["pod"]) or {}).get("status", {}).get("podIP") != victim["podIP"], 60,
                   f"pod {victim['pod']} gone")
        bed.operator.proc = None
        bed.operator.start()

        def settled() -> bool:
            s = bed.status()
            return settled_committed(s) and s.get("layoutSummary") == summary(target)

        wait_until(settled, 300, f"the change to {summary(target)} done after stage {VICTIM} died in {phase}",
                   watch=[bed.operator.proc], interval=0.3)
        request.node.user_properties.append(("seconds_delete_to_settled", round(time.monotonic() - struck, 1)))
        served_at_end = load.served()
        wait_until(lambda: load.served() >= served_at_end + 4, 120, "answers through the new layout")
    finally:
        outcomes = load.stop()
    assert not lost(outcomes), lost(outcomes)[:3]
    assert not mismatched(outcomes, bed.expected), mismatched(outcomes, bed.expected)[:3]

    status = bed.status()
    last = status["lastReconfiguration"]
    events = [e for e in _events(bed.cluster, bed.namespace, NAME) if held["id"] in e.get("message", "")]
    decision = [e for e in events if e["reason"] == "StageLostDuringChange"]
    assert len(decision) == 1 and f"stage {VICTIM} died" in decision[0]["message"], [e["reason"] for e in events]
    assert decision[0]["type"] == "Warning"
    if outcome == "rollback":
        assert "rolling back" in decision[0]["message"]
        assert "ReconfigurationRolledBack" in {e["reason"] for e in events}
        assert last["id"] != held["id"]  # the move was made again, under a new id, once the stage was restored
        assert status["lastRestore"]["stages"] == [VICTIM]
    else:
        assert "rolling forward" in decision[0]["message"]
        assert last["id"] == held["id"] and str(VICTIM) in last["lost"], last
        assert last["requestsReprefilled"] >= 0
        request.node.user_properties.append(("requests_reprefilled", last["requestsReprefilled"]))
        replaced = bed.pod(victim["pod"])
        assert replaced is not None
        assert replaced["metadata"]["annotations"]["pipeshift.dev/layers"] == f"{new_range[0]}:{new_range[1]}"
    assert [s["layers"] for s in status["layout"]["stages"]] == [s["layers"] for s in target["stages"]]
    assert status["frontend"]["pod"] == frontend["pod"]  # re-wired, never restarted
