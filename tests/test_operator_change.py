"""The operator's resumable live change: the phase rule (pure) and the phase-stepped control API it drives,
on real agent processes, a real frontend and real sockets, float64, while requests stream.

Each step runs on a *fresh* `Stepper` built only from what the operator keeps in status (id, epoch, the
arm's live sequences), as a restarted operator would; steps past the commit point are run twice (a repeat
after a crash must not act twice); a change stopped after arming is aborted and the old layout serves on.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _streaming import Streamed, assert_exact, assert_holds_exactly, oracle, streaming, under_load

from pipeshift.api import Layout, ReconfigPlan, StagePlan, plan_moves
from pipeshift.control.stepper import Stepper
from pipeshift.local.processes import LocalAgents, start_agents
from pipeshift.operator.change import COMMIT_INDEX, PHASES, ROLLING_BACK, layout_json, new_change, next_step, plan_of
from pipeshift.runtime.frontend.background import BackgroundFrontend
from pipeshift.runtime.frontend.config import FrontendConfig
from pipeshift.runtime.model.make_model import make_model

LAYERS = 8
VOCAB = 300
KV_BYTES = 4 << 20


@pytest.mark.parametrize("phase", PHASES)
def test_the_phase_rule_rolls_back_before_the_commit_point_and_forward_after(phase: str) -> None:
    before = PHASES.index(phase) < COMMIT_INDEX
    assert next_step(phase, finished_here=True, entered_here=True) == "advance"
    # This process entered the phase and it is still going (pods starting): repeat it, never roll back.
    assert next_step(phase, finished_here=False, entered_here=True) == "repeat"
    # Another process entered it (the operator restarted): roll back before the commit point, repeat after.
    assert next_step(phase, finished_here=False, entered_here=False) == ("rollback" if before else "repeat")


def test_rolling_back_goes_on_and_an_unknown_phase_is_named() -> None:
    assert next_step(ROLLING_BACK, finished_here=False, entered_here=False) == "rollback"
    with pytest.raises(ValueError, match=r"status\.reconfiguration\.phase: unknown phase 'holding'"):
        next_step("holding", finished_here=False, entered_here=False)


def test_a_change_keeps_the_stage_ids_plan_moves_gave_and_refuses_a_tampered_one() -> None:
    old = Layout((StagePlan(0, "a100", 0, 2), StagePlan(1, "l40s", 2, 4)))
    plan = plan_moves(old, Layout((StagePlan(0, "a100", 0, 2), StagePlan(1, "l40s", 2, 3), StagePlan(2, "l40s", 3, 4))))
    running = new_change("tiny", plan, "2024-01-01T00:00:00Z", "spec.layout changed")
    assert running["phase"] == "starting" and running["id"].startswith("tiny-")
    again = plan_of(running)
    assert again.new == plan.new and again.added == plan.added == (2,) and again.removed == ()
    swapped = [dict(s) for s in running["to"]["stages"]]
    swapped[1]["stageId"], swapped[2]["stageId"] = swapped[2]["stageId"], swapped[1]["stageId"]
    with pytest.raises(ValueError, match="does not follow from its from layout"):
        plan_of(dict(running, to={"stages": swapped}))
    assert layout_json(plan.new)["stages"][2] == {"stageId": 2, "pool": "l40s", "layers": [3, 4]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("change") / "tiny", layers=LAYERS, hidden=32, heads=4, kv_heads=2,
                      intermediate=64, vocab=VOCAB, seed=5, tie_embeddings=True)


class Serving:
    """Agents for `layout` behind a frontend; stages a change adds are started by the test (as the operator
    creates pods before the change)."""

    def __init__(self, model_dir: Path, layout: str) -> None:
        self.model_dir = model_dir
        self.layout = Layout.parse(layout)
        self.base = start_agents(model_dir, layout, dtype="float64", kv_bytes=KV_BYTES, threads=1)
        self.extra: list[LocalAgents] = []
        self.urls = {a.stage_id: a.control_url for a in self.base.agents}
        self.frontend = BackgroundFrontend(FrontendConfig(
            model_dir=model_dir, port=0, stages=tuple(a.control_url.removeprefix("http://") for a in self.base.agents)))

    def plan(self, to: str) -> ReconfigPlan:
        plan = plan_moves(self.layout, Layout.parse(to))
        for sid in plan.added:
            started = start_agents(self.model_dir, [plan.new.stage(sid)], dtype="float64", kv_bytes=KV_BYTES,
                                   threads=1)
            self.extra.append(started)
            self.urls[sid] = started.agents[0].control_url
        return plan

    def stepper(self, plan: ReconfigPlan, rid: str, kept: dict[str, Any]) -> Stepper:
        return Stepper(self.frontend.url, self.urls, plan, rid, epoch=kept.get("epoch"), live=kept.get("live", ()))

    def close(self) -> None:
        self.frontend.stop()
        for agents in self.extra:
            agents.stop()
        self.base.stop()


@pytest.fixture
def serving(model_dir: Path) -> Iterator[Serving]:
    running = Serving(model_dir, "4,4")
    try:
        yield running
    finally:
        running.close()


def test_a_change_driven_step_by_step_with_repeats_after_the_commit_point_loses_nothing(
    serving: Serving, model_dir: Path,
) -> None:
    plan = serving.plan("4,2,2")
    rid = "tiny-stepped"

    def change(requests: list[Streamed]) -> dict[str, Any]:
        kept: dict[str, Any] = {}
        kept["epoch"] = serving.stepper(plan, rid, kept).prepare()
        kept["bytes"] = serving.stepper(plan, rid, kept).precopy()
        streaming(requests, at_least=2)()
        serving.stepper(plan, rid, kept).arm()
        for _ in range(2):  # a repeated commit is answered from the frontend's request-id cache
            kept["pause_ms"], kept["live"] = serving.stepper(plan, rid, kept).commit()
        for _ in range(2):
            kept["pushed"] = serving.stepper(plan, rid, kept).retire()
        kept["departed"] = serving.stepper(plan, rid, kept).cleanup()
        return kept

    kept, requests = under_load(serving.frontend.url, change, random.Random(3), VOCAB)
    assert not [r.error for r in requests if r.error]
    assert_exact(requests, oracle(model_dir))
    assert kept["epoch"] >= 1 and kept["pause_ms"] >= 0 and kept["live"], kept
    assert kept["bytes"] + kept["pushed"] > 0  # live requests' KV of the layers that moved went over
    assert_holds_exactly(serving.urls, plan.new)


def test_a_change_stopped_after_arming_is_aborted_and_the_old_layout_serves_on(
    serving: Serving, model_dir: Path,
) -> None:
    plan = serving.plan("4,2,2")
    rid = "tiny-aborted"

    def change(requests: list[Streamed]) -> list[str]:
        kept: dict[str, Any] = {}
        kept["epoch"] = serving.stepper(plan, rid, kept).prepare()
        serving.stepper(plan, rid, kept).precopy()
        streaming(requests, at_least=2)()
        serving.stepper(plan, rid, kept).arm()
        return serving.stepper(plan, rid, kept).abort()  # what a restarted operator does before committing

    problems, requests = under_load(serving.frontend.url, change, random.Random(4), VOCAB)
    assert problems == []
    assert not [r.error for r in requests if r.error]
    assert_exact(requests, oracle(model_dir))
    assert_holds_exactly({s.stage_id: serving.urls[s.stage_id] for s in plan.old}, plan.old)
