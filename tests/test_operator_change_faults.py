"""A stage that dies during an operator-driven live change: the decision (roll back before the frontend's arm,
forward after it), how death is seen (from the pods, then by asking the agent), that the decision is in status
before anything is done about it, and the roll forward itself on real agent processes under streaming load.
"""

from __future__ import annotations

import copy
import http.server
import random
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from _streaming import Streamed, assert_exact, assert_holds_exactly, oracle, streaming, under_load
from test_operator_change import (  # noqa: F401 (model_dir and serving are fixtures)
    KV_BYTES,
    VOCAB,
    Serving,
    model_dir,
    serving,
)

from pipeshift.api import Layout, StagePlan, plan_moves
from pipeshift.local.processes import start_agents
from pipeshift.operator import manifests as m
from pipeshift.operator.change import (
    COMMIT_INDEX,
    PHASES,
    ROLLING_BACK,
    ROLLING_FORWARD,
    ChangeDriver,
    Ports,
    after_loss,
    agent_gone,
    new_change,
    pod_losses,
)
from pipeshift.operator.reconcile import ChangeRequest, Create, Delete, Event, Observed, PodView
from pipeshift.operator.spec import PipelineRef, parse_spec

ROOT = Path(__file__).parent.parent
PINNED = yaml.safe_load((ROOT / "examples" / "llmpipeline-pinned.yaml").read_text())
NAME = "tiny"
OLD = Layout((StagePlan(0, "a100", 0, 2), StagePlan(1, "l40s", 2, 4)))
NEW = Layout((StagePlan(0, "a100", 0, 2), StagePlan(1, "l40s", 2, 3), StagePlan(2, "l40s", 3, 4)))


# --- the decision -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", PHASES)
def test_a_stage_lost_before_the_frontends_arm_rolls_back_and_after_it_rolls_forward(phase: str) -> None:
    index = PHASES.index(phase)
    for armed in (True, False, None):
        decided = after_loss(phase, armed)
        if index < COMMIT_INDEX:
            assert decided == "rollback"
        elif index > COMMIT_INDEX:
            assert decided == "forward"
        else:  # the arm is the point of no return; a frontend that cannot be asked may have armed
            assert decided == ("rollback" if armed is False else "forward")


def test_a_change_already_rolling_keeps_its_direction_and_an_unknown_phase_is_named() -> None:
    assert after_loss(ROLLING_BACK, True) == "rollback"
    assert after_loss(ROLLING_FORWARD, False) == "forward"
    with pytest.raises(ValueError, match=r"status\.reconfiguration\.phase: unknown phase 'holding'"):
        after_loss("holding", None)


# --- seeing death -------------------------------------------------------------------------------------------


def pod(sid: int, ip: str | None, *, phase: str = "Running", ready: bool = True, deleting: bool = False,
        layers: tuple[int, int] | None = None) -> PodView:
    return PodView(m.stage_pod_name(NAME, sid), m.ROLE_STAGE, sid, phase, ip, ready, deleting, "h", layers=layers)


def change_in(phase: str, **extra: Any) -> dict[str, Any]:
    running = new_change(NAME, plan_moves(OLD, NEW), "2024-01-01T00:00:00Z", "test")
    return {**running, "phase": phase, **extra}


AGENTS = {"0": "http://10.0.0.1:9000", "1": "http://10.0.0.2:9000", "2": "http://10.0.0.3:9000"}


def test_pods_tell_a_stage_that_failed_went_away_is_being_deleted_or_was_replaced() -> None:
    plan = plan_moves(OLD, NEW)
    cases = [
        ((pod(0, "10.0.0.1", phase="Failed"), pod(1, "10.0.0.2"), pod(2, "10.0.0.3")), {0: "Failed"}),
        ((pod(0, "10.0.0.1"), pod(2, "10.0.0.3")), {1: "is gone"}),
        ((pod(0, "10.0.0.1"), pod(1, "10.0.0.2", deleting=True), pod(2, "10.0.0.3")), {1: "being deleted"}),
        ((pod(0, "10.0.0.9", ready=False), pod(1, "10.0.0.2"), pod(2, "10.0.0.3")), {0: "replaced (now at 10.0.0.9)"}),
        ((pod(0, None, phase="Pending", ready=False), pod(1, "10.0.0.2"), pod(2, "10.0.0.3")), {0: "has no IP"}),
    ]
    for pods, expected in cases:
        lost, unready = pod_losses(change_in("precopying", agents=AGENTS), plan, NAME, Observed(pods=pods))
        assert set(lost) == set(expected) and unready == [], (pods, lost)
        for sid, words in expected.items():
            assert words in lost[sid] and m.stage_pod_name(NAME, sid) in lost[sid]


def test_a_pod_merely_not_ready_is_asked_not_declared_dead_and_what_the_change_no_longer_needs_is_skipped() -> None:
    plan = plan_moves(OLD, NEW)
    healthy = (pod(0, "10.0.0.1"), pod(1, "10.0.0.2"), pod(2, "10.0.0.3"))
    assert pod_losses(change_in("arming", agents=AGENTS), plan, NAME, Observed(pods=healthy)) == ({}, [])
    # every stage is to be asked after a step failed
    assert pod_losses(change_in("arming", agents=AGENTS), plan, NAME, Observed(pods=healthy), every=True) == \
        ({}, [0, 1, 2])
    not_ready = (pod(0, "10.0.0.1"), pod(1, "10.0.0.2", ready=False), pod(2, "10.0.0.3"))
    assert pod_losses(change_in("arming", agents=AGENTS), plan, NAME, Observed(pods=not_ready)) == ({}, [1])
    # the added stage's pod is still being created while `starting`: that is not a death
    assert pod_losses(change_in("starting"), plan, NAME, Observed(pods=healthy[:2])) == ({}, [])
    # a stage already handled is not reported again
    gone = (pod(0, "10.0.0.1"), pod(2, "10.0.0.3"))
    assert pod_losses(change_in(ROLLING_FORWARD, agents=AGENTS, lost={"1": "x"}), plan, NAME,
                      Observed(pods=gone)) == ({}, [])
    # a removed stage is not needed once the change is cleaning up or rolling forward
    shrink = plan_moves(NEW, OLD)
    two = (pod(0, "10.0.0.1"), pod(1, "10.0.0.2"))
    for phase in ("cleaning", ROLLING_FORWARD):
        running = {**new_change(NAME, shrink, "2024-01-01T00:00:00Z", "test"), "phase": phase, "agents": AGENTS}
        assert pod_losses(running, shrink, NAME, Observed(pods=two)) == ({}, [])
    running = {**new_change(NAME, shrink, "2024-01-01T00:00:00Z", "test"), "phase": "retiring", "agents": AGENTS}
    assert set(pod_losses(running, shrink, NAME, Observed(pods=two))[0]) == {2}  # still a source: it counts


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"ok": true}')

    def log_message(self, *args: Any) -> None:
        pass


def test_an_agent_is_gone_only_when_nothing_listens_on_its_port() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert agent_gone(f"http://127.0.0.1:{server.server_address[1]}", None) is False
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert agent_gone(f"http://127.0.0.1:{free}", None) is True


# --- the decision is in status before anything is done about it --------------------------------------------


class Recorder:
    """What the driver did, in order: status patches (merged, as the API server merges them), objects
    created and deleted, Events."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        self.status: dict[str, Any] = {}

    def ports(self) -> Ports:
        return Ports(apply=self.apply, patch_status=self.patch, annotate_frontend=lambda notes: None,
                     token=lambda: None, post=lambda e: self.log.append(("event", e)),
                     ended=lambda outcome, s, p: self.log.append(("ended", outcome)))

    def apply(self, action: Create | Delete) -> bool:
        self.log.append(("create" if isinstance(action, Create) else "delete", action))
        return True

    def patch(self, patch: Mapping[str, Any]) -> None:
        self.log.append(("status", copy.deepcopy(dict(patch))))
        self.status.update(copy.deepcopy(dict(patch)))

    def events(self) -> list[Event]:
        return [e for kind, e in self.log if kind == "event"]

    def first(self, kind: str) -> int:
        return next(i for i, (k, _) in enumerate(self.log) if k == kind)


def drive(running: dict[str, Any], pods: tuple[PodView, ...], recorder: Recorder,
          driver: ChangeDriver | None = None) -> bool:
    spec = parse_spec(copy.deepcopy(PINNED["spec"]))
    ref = PipelineRef.from_body({"metadata": {"name": NAME, "namespace": "serving", "uid": "u", "generation": 1}})
    return (driver or ChangeDriver(fault="")).advance(ref, spec, Observed(pods=pods), ChangeRequest(OLD, NEW, running),
                                                      recorder.ports(), "2024-01-01T00:01:00Z")


def test_an_old_stage_dying_while_precopying_rolls_the_change_back_and_says_why() -> None:
    rec = Recorder()
    pods = (pod(0, "10.0.0.1", phase="Failed"), pod(1, "10.0.0.2"), pod(2, "10.0.0.3", layers=(3, 4)))
    drive(change_in("precopying", agents=AGENTS, epoch=1), pods, rec)
    first = rec.log[0]
    assert first[0] == "status", rec.log  # the decision is written before anything is done about it
    written = first[1]["reconfiguration"]
    assert written["phase"] == ROLLING_BACK and written["rolledBackFrom"] == "precopying"
    assert "tiny-stage-0 Failed" in written["lost"]["0"]
    lost = next(e for e in rec.events() if e.reason == "StageLostDuringChange")
    assert lost.type == "Warning" and "stage 0 died" in lost.message and "rolling back" in lost.message
    deleted = [a.name for k, a in rec.log if k == "delete"]
    assert deleted == [m.stage_pod_name(NAME, 2)]  # the added stage goes; the dead old one is restore's
    assert any(e.reason == "ReconfigurationRolledBack" for e in rec.events())
    last = rec.status["lastReconfiguration"]
    assert last["outcome"] == "aborted" and "stage 0 died" in last["error"] and "precopying" in last["error"]
    assert rec.status["reconfiguration"] is None and "layout" not in rec.status  # the old layout serves on
    assert rec.status["phase"] == "Degraded"  # so the next pass restores the old layout before moving again
    assert ("ended", "aborted") in rec.log


def test_a_stage_dying_while_retiring_rolls_forward_and_comes_back_in_its_new_range() -> None:
    rec, driver = Recorder(), ChangeDriver(fault="")
    running = change_in("retiring", agents=AGENTS, epoch=1, live=[3], pauseMs=1.0)
    dead = (pod(0, "10.0.0.1"), pod(1, "10.0.0.2", phase="Failed", layers=(2, 4)), pod(2, "10.0.0.3", layers=(3, 4)))
    assert drive(running, dead, rec, driver) is False  # waiting for the replacement pod
    first = rec.log[0]
    assert first[0] == "status", rec.log
    written = first[1]
    assert written["reconfiguration"]["phase"] == ROLLING_FORWARD
    assert written["reconfiguration"]["rolledForwardFrom"] == "retiring"
    # status.layout is the new layout at once: the reconcile pass recreates the stage in its new range
    assert [s["layers"] for s in written["layout"]["stages"]] == [[0, 2], [2, 3], [3, 4]]
    assert rec.first("status") < rec.first("event") < rec.first("delete")
    lost = next(e for e in rec.events() if e.reason == "StageLostDuringChange")
    assert "stage 1 died" in lost.message and "rolling forward" in lost.message
    assert [a.name for k, a in rec.log if k == "delete"] == [m.stage_pod_name(NAME, 1)]

    # next pass: the dead pod is gone; one is created with the new range [2, 3)
    rec2 = Recorder()
    gone = (pod(0, "10.0.0.1"), pod(2, "10.0.0.3", layers=(3, 4)))
    assert drive(dict(rec.status["reconfiguration"]), gone, rec2, driver) is False
    created = [a for k, a in rec2.log if k == "create"]
    assert len(created) == 1 and created[0].name == m.stage_pod_name(NAME, 1)
    env = {e["name"]: e.get("value") for e in created[0].manifest["spec"]["containers"][0]["env"]}
    assert env["PIPESHIFT_LAYERS"] == "2:3"
    assert not [e for e in rec2.events() if e.reason == "StageLostDuringChange"]  # reported once

    # a pod the reconcile pass made in the old range before the decision is replaced, not used
    rec3 = Recorder()
    old_range = (pod(0, "10.0.0.1"), pod(1, "10.0.0.7", layers=(2, 4)), pod(2, "10.0.0.3", layers=(3, 4)))
    assert drive(dict(rec.status["reconfiguration"]), old_range, rec3, driver) is False
    assert [a.name for k, a in rec3.log if k == "delete"] == [m.stage_pod_name(NAME, 1)]


# --- the roll forward on real agents ------------------------------------------------------------------------


def test_a_stage_killed_after_the_commit_point_comes_back_in_its_new_range_and_nothing_is_lost(
    serving: Serving, model_dir: Path,  # noqa: F811
) -> None:
    """What the operator does across passes, step by step on fresh steppers: the change commits, stage 1
    (kept, its range shrinking from [4, 8) to [4, 6)) is killed, a fresh agent is started in [4, 6) (the
    replacement pod), and the change rolls forward past it with the frontend prefilling the live requests."""
    plan = serving.plan("4,2,2")
    rid = "tiny-lost"

    def change(requests: list[Streamed]) -> dict[str, Any]:
        kept: dict[str, Any] = {}
        kept["epoch"] = serving.stepper(plan, rid, kept).prepare()
        serving.stepper(plan, rid, kept).precopy()
        streaming(requests, at_least=2)()
        serving.stepper(plan, rid, kept).arm()
        kept["pause_ms"], kept["live"] = serving.stepper(plan, rid, kept).commit()
        victim = serving.base.process(1)
        victim.kill()
        victim.wait(timeout=30)
        started = start_agents(model_dir, [plan.new.stage(1)], dtype="float64", kv_bytes=KV_BYTES, threads=1)
        serving.extra.append(started)
        serving.urls[1] = started.agents[0].control_url
        lost = sorted({1} | set(plan.removed))
        for _ in range(2):  # a repeat (a new operator process) acts once: same request ids
            kept["reprefilled"] = serving.stepper(plan, rid, kept).roll_forward(lost)
        serving.stepper(plan, rid, kept).cleanup()
        return kept

    kept, requests = under_load(serving.frontend.url, change, random.Random(5), VOCAB)
    assert not [r.error for r in requests if r.error]
    assert_exact(requests, oracle(model_dir))
    assert kept["reprefilled"] > 0, kept  # the live requests were prefilled again, and counted
    assert_holds_exactly(serving.urls, plan.new)
