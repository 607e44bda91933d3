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

import pytest

from e2e.bed import Cluster, FakeNode, ProcessKubelet
from e2e.bed.procs import wait_until
from e2e.operator_proc import LoadGenerator, lost, mismatched
from e2e.resume_bed import TWO, Bed, restart_until_settled, serving_bed, summary
from e2e.test_live_change import MAX_TOKENS, PROMPTS, THREE, patch_layout
from e2e.test_pinned_pipeline import (  # noqa: F401 (tiny_model is a fixture)
    _events,
    tiny_model,
)

PHASES = ("starting", "preparing", "precopying", "arming", "committing", "retiring", "cleaning")
NAME = "restart"


@pytest.fixture(scope="module")
def bed(cluster: Cluster, gpu_nodes: tuple[FakeNode, ...], helm: Path, tiny_model: Path,  # noqa: F811
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    with serving_bed(cluster, helm, tiny_model, tmp_path_factory.mktemp("operator-restart"), NAME) as ready:
        yield ready


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
        restart_until_settled(bed, target, load, 180, f"after a restart in {phase}")
        request.node.user_properties.append(("seconds_patch_to_settled", round(time.monotonic() - started, 1)))
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
