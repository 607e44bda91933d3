"""`restore.plan_restore`: when the operator re-wires the running frontend onto a replaced stage pod (pure
decisions over observed pods and the pipeline's status; no cluster needed)."""

from __future__ import annotations

from typing import Any

from pipeshift.operator import manifests as m
from pipeshift.operator.reconcile import Observed, PodView
from pipeshift.operator.restore import RestorePlan, plan_restore

OLD = ("10.0.0.1:9000", "10.0.0.2:9000")


def stage(sid: int, ip: str | None, ready: bool = True, phase: str = "Running") -> PodView:
    return PodView(name=f"p-stage-{sid}", role=m.ROLE_STAGE, stage_id=sid, phase=phase, pod_ip=ip, ready=ready,
                   deleting=False, spec_hash="h")


def frontend(ip: str | None = "10.0.0.9", phase: str = "Running") -> PodView:
    return PodView(name="p-frontend-x", role=m.ROLE_FRONTEND, stage_id=None, phase=phase, pod_ip=ip, ready=False,
                   deleting=False, spec_hash="f")


def status(phase: str = "Degraded", **extra: Any) -> dict[str, Any]:
    layout = {"stages": [{"stageId": 0, "pool": "a100", "layers": [0, 2], "pod": "p-stage-0"},
                         {"stageId": 1, "pool": "l40s", "layers": [2, 4], "pod": "p-stage-1"}]}
    return {"phase": phase, "layout": layout, **extra}


def observed(*pods: PodView, annotation: str | None = ",".join(OLD)) -> Observed:
    return Observed(pods=pods, deployment=True, deployment_stages=annotation, deployment_template_stages=OLD)


def test_a_replaced_stage_that_is_ready_is_wired_into_the_running_frontend() -> None:
    plan = plan_restore(status(), observed(stage(0, "10.0.0.1"), stage(1, "10.0.0.7"), frontend()))
    assert isinstance(plan, RestorePlan)
    assert plan.stages == ("10.0.0.1:9000", "10.0.0.7:9000")
    assert plan.replaced == (1,)
    assert plan.frontend_url == f"http://10.0.0.9:{m.FRONTEND_PORT}"
    # The same chain gives the same request id: a retry is answered once by the frontend.
    again = plan_restore(status(), observed(stage(0, "10.0.0.1"), stage(1, "10.0.0.7"), frontend()))
    assert again is not None and again.request_id == plan.request_id
    other = plan_restore(status(), observed(stage(0, "10.0.0.1"), stage(1, "10.0.0.8"), frontend()))
    assert other is not None and other.request_id != plan.request_id


def test_nothing_is_done_until_every_stage_is_ready_or_when_nothing_changed() -> None:
    assert plan_restore(status(), observed(stage(0, "10.0.0.1"), stage(1, "10.0.0.7", ready=False), frontend())) \
        is None
    assert plan_restore(status(), observed(stage(0, "10.0.0.1"), frontend())) is None
    assert plan_restore(status(), observed(stage(0, "10.0.0.1"), stage(1, "10.0.0.2"), frontend())) is None
    # The annotation (kept by live changes) wins over the template's list.
    moved = observed(stage(0, "10.0.0.1"), stage(1, "10.0.0.5"), frontend(), annotation="10.0.0.1:9000,10.0.0.5:9000")
    assert plan_restore(status(), moved) is None


def test_no_frontend_pod_a_live_change_or_an_idle_phase_leaves_it_to_others() -> None:
    pods = (stage(0, "10.0.0.1"), stage(1, "10.0.0.7"))
    assert plan_restore(status(), observed(*pods)) is None
    assert plan_restore(status(), observed(*pods, frontend(ip=None))) is None
    assert plan_restore(status(reconfiguration={"id": "r1"}), observed(*pods, frontend())) is None
    for phase in ("Failed", "ScaledToZero"):
        assert plan_restore(status(phase), observed(*pods, frontend())) is None


def test_attaching_after_zero_wires_every_stage_even_at_the_same_addresses() -> None:
    pods = (stage(0, "10.0.0.1"), stage(1, "10.0.0.2"), frontend())
    assert plan_restore(status("Pending"), observed(*pods)) is None
    plan = plan_restore(status("Pending"), observed(*pods), attach=True)
    assert plan is not None and plan.replaced == (0, 1) and plan.stages == OLD
