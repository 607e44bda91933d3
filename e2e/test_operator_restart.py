"""Scenario 4: the operator is killed in each phase of a live change and started again; the change is rolled
back (before the commit point) or finished (from it on), and no request of a load that runs throughout is lost.

Killing is deterministic: `PIPESHIFT_OPERATOR_FAULT=<phase>` makes the operator exit right after it wrote
that phase to `status.reconfiguration` and before that phase's side effects. One pipeline serves the whole
module and each case moves it to the other of two layouts (2 ↔ 3 stages across the two pools), so both an
added and a removed stage go through every phase.
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
from e2e.operator_proc import LoadGenerator, OperatorProcess, installed_chart, lost, mismatched, settled_committed
from e2e.test_live_change import MAX_TOKENS, PROMPTS, THREE, patch_layout, serve_two_stages
from e2e.test_pinned_pipeline import (  # noqa: F401 (tiny_model is a fixture)
    LAYERS,
    _events,
    _pipeline_obj,
    _reference,
    tiny_model,
)

PHASES = ("starting", "preparing", "precopying", "arming", "committing", "retiring", "cleaning")
TWO = {"stages": [{"pool": "a100", "layers": [0, 2]}, {"pool": "l40s", "layers": [2, LAYERS]}]}
NAME = "restart"


def summary(layout: dict[str, Any]) -> str:
    return ",".join(f"{s['pool']}:{s['layers'][0]}-{s['layers'][1]}" for s in layout["stages"])


class Bed:
    def __init__(self, cluster: Cluster, namespace: str, operator: OperatorProcess, expected: list[list[int]]) -> None:
        self.cluster, self.namespace, self.operator, self.expected = cluster, namespace, operator, expected

    def status(self) -> dict[str, Any]:
        return _pipeline_obj(self.cluster, self.namespace, NAME).get("status", {})


@pytest.fixture(scope="module")
def bed(cluster: Cluster, gpu_nodes: tuple[FakeNode, ...], helm: Path, tiny_model: Path,  # noqa: F811
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    """One namespace, one operator (restarted by the tests), one pipeline serving two stages."""
    import uuid

    work = tmp_path_factory.mktemp("operator-restart")
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
            # While the operator runs: its finalizer removes the children, then lets the pipeline go.
            if not bed_operator_running(operator):  # a case failed with it stopped: no one to run the finalizer
                cluster.kubectl("patch", "llmp", NAME, "-n", namespace, "--type=merge", "-p",
                                '{"metadata":{"finalizers":null}}', check=False)
            cluster.kubectl("delete", "llmp", NAME, "-n", namespace, "--timeout=60s", check=False)
            operator.stop()
            cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def bed_operator_running(operator: OperatorProcess) -> bool:
    return operator.proc is not None and operator.proc.running()


@pytest.mark.parametrize("phase", PHASES)
def test_the_operator_killed_in_a_phase_resumes_or_rolls_back_losing_nothing(
    bed: Bed, kubelet: ProcessKubelet, phase: str, request: pytest.FixtureRequest,
) -> None:
    before = bed.status()
    target = TWO if before["layoutSummary"] == summary(THREE) else THREE
    frontend = before["frontend"]
    bed.operator.stop()
    bed.operator.start({"PIPESHIFT_OPERATOR_FAULT": phase})
    load = LoadGenerator(frontend["url"], NAME, PROMPTS, MAX_TOKENS, workers=3).start()
    try:
        wait_until(lambda: load.served() >= 4, 120, "the load generator's first answers")
        started = time.monotonic()
        patch_layout(bed.cluster, bed.namespace, NAME, target)
        proc = bed.operator.proc
        assert proc is not None
        wait_until(lambda: not proc.running(), 120, f"the operator to exit in phase {phase}")
        assert proc.proc.returncode == 3, bed.operator.log_text()[-3000:]
        killed = bed.status()["reconfiguration"]
        assert killed["phase"] == phase
        bed.operator.proc = None
        bed.operator.start()

        def settled() -> bool:
            s = bed.status()
            return settled_committed(s) and s.get("layoutSummary") == summary(target)

        wait_until(settled, 180, f"the change to {summary(target)} finished after a restart in {phase}",
                   watch=[bed.operator.proc], interval=0.3)
        request.node.user_properties.append(("seconds_patch_to_settled", round(time.monotonic() - started, 1)))
        served_at_end = load.served()
        wait_until(lambda: load.served() >= served_at_end + 4, 120, "answers through the new layout")
    finally:
        outcomes = load.stop()
    assert not lost(outcomes), lost(outcomes)[:3]
    assert not mismatched(outcomes, bed.expected), mismatched(outcomes, bed.expected)[:3]

    status = bed.status()
    last = status["lastReconfiguration"]
    events = [e for e in _events(bed.cluster, bed.namespace, NAME) if killed["id"] in e.get("message", "")]
    reasons = {e["reason"] for e in events}
    if PHASES.index(phase) < PHASES.index("committing"):
        # Rolled back (the old layout served on), then a new change with another id did the move.
        assert last["id"] != killed["id"]
        assert "ReconfigurationRolledBack" in reasons, reasons
        assert "Reconfigured" not in reasons
    else:
        assert last["id"] == killed["id"] and "Reconfigured" in reasons, reasons
    assert [s["layers"] for s in status["layout"]["stages"]] == [s["layers"] for s in target["stages"]]
    # The frontend was re-wired, never restarted; pods that left the layout are gone.
    assert status["frontend"]["pod"] == frontend["pod"]
    pods = bed.cluster.rest.get(f"/api/v1/namespaces/{bed.namespace}/pods",
                                labelSelector=f"pipeshift.dev/pipeline={NAME},pipeshift.dev/role=stage")["items"]
    wait_until(lambda: sorted(p["metadata"]["name"] for p in bed.cluster.rest.get(
        f"/api/v1/namespaces/{bed.namespace}/pods",
        labelSelector=f"pipeshift.dev/pipeline={NAME},pipeshift.dev/role=stage")["items"])
        == sorted(s["pod"] for s in status["layout"]["stages"]), 60,
        f"only the stage pods of the layout left (now {json.dumps([p['metadata']['name'] for p in pods])})")
