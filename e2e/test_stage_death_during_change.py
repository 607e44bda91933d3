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

NAME = "deathmid"
VICTIM = 1


@pytest.fixture(scope="module")
def bed(cluster: Cluster, gpu_nodes: tuple[FakeNode, ...], helm: Path, tiny_model: Path,  # noqa: F811
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    with serving_bed(cluster, helm, tiny_model, tmp_path_factory.mktemp("stage-death"), NAME) as ready:
        yield ready


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
        restart_until_settled(bed, target, load, 300, f"after stage {VICTIM} died in {phase}")
        request.node.user_properties.append(("seconds_delete_to_settled", round(time.monotonic() - struck, 1)))
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
