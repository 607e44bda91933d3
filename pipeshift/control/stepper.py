"""One live change (epoch switch) as separate steps, for an orchestrator that may die between any two.

`reconfigure()` runs a change start to end in one call; the Kubernetes operator instead drives one step per
reconcile pass and writes the step to the pipeline's status before taking it, so that a new operator
process knows where its predecessor stopped. Each step is a fresh `Stepper` built from what that status
keeps (`reconfig_id`, `epoch`, the arm's `live` sequences): request ids are derived from the reconfiguration
id (not random), so repeating a step after a restart repeats the same calls, which the agents and the
frontend answer from their request-id caches instead of acting twice.

Steps, in order: `prepare` → `precopy` → `arm` (agents; still abortable) → `commit` (the frontend arms:
the point of no return) → `retire` → `cleanup`; `abort` undoes anything before `commit`; `roll_forward`
finishes a committed change past stages that died (the caller started them again in their new range).
Adding and removing stage processes is the caller's (pods are created before `prepare`, deleted after
`cleanup`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

from pipeshift.api import ReconfigPlan, StagePlan
from pipeshift.control.http import ControlCallError, call_all
from pipeshift.control.phases import Phase
from pipeshift.control.precopy import copy_pairs
from pipeshift.control.reconfigure import SwitchBudget, _Run
from pipeshift.control.recovery import guard, roll_forward


def _started_by_caller(stage: StagePlan) -> str:
    raise RuntimeError(f"stage {stage.stage_id} must be started by the caller before the change")


class Stepper(_Run):
    """`agents`: control URLs of every stage of the old and the new layout (added stages already run)."""

    def __init__(self, frontend_url: str, agents: Mapping[int, str], plan: ReconfigPlan, reconfig_id: str, *,
                 token: str | None = None, budget: SwitchBudget | None = None, epoch: int | None = None,
                 live: Sequence[int] = ()) -> None:
        ids = {s.stage_id for s in plan.old} | {s.stage_id for s in plan.new}
        missing = sorted(ids - set(agents))
        if missing:
            raise ValueError(f"agents has no control URL for stage ids {missing}")
        old = {s.stage_id: agents[s.stage_id] for s in plan.old}
        super().__init__(frontend_url, old, plan, _started_by_caller, None, budget or SwitchBudget(), token, "live")
        for sid in plan.added:
            self.clients[sid] = self._client(sid, agents[sid])
        self.report.reconfig_id = reconfig_id
        self.report.switch = "epoch"
        self.epoch = epoch if epoch is not None else -1
        self.live = list(live)

    def _id(self, what: str) -> str:
        """Deterministic: the same step repeated by another operator process sends the same request ids."""
        return f"{self.report.reconfig_id}-{what}"

    def _load(self) -> dict[str, Any]:
        state = self.frontend.get("/control/state")
        self.return_address = str(state["return_address"])
        self._discover()
        return state

    def prepare(self) -> int:
        """Targets load their incoming layers and reserve KV; returns the epoch the change moves to."""
        state = self._load()
        if self.epoch < 0:
            self.epoch = int(state["epoch"]) + 1
        self.report.epoch = self.epoch
        guard(self, self.budget.recover_timeout_s)
        self.clock.enter(Phase.PREPARING)
        self._prepare(state["sequences"])
        return self.epoch

    def precopy(self) -> int:
        """Pre-copy rounds until the rest fits the switch budget; returns the bytes moved."""
        self._load()
        self._precopy_rounds()
        return self.report.kv_bytes_moved

    def arm(self) -> None:
        """Every stage learns its epoch E+1 range and route; sources start pushing final deltas."""
        self._load()
        self._arm_agents()

    def commit(self) -> tuple[float, list[int]]:
        """The frontend arms (point of no return); returns its pause in ms and the sequences it saw live."""
        self._load()
        self._arm_frontend()
        return self.report.pause_ms, list(self.live)

    def retire(self) -> int:
        """The old epoch leaves the frontend and every stage; returns the final-delta bytes pushed."""
        self._load()
        self._retire_epoch()
        return self.report.kv_bytes_pushed

    def roll_forward(self, lost: Sequence[int], rearm: bool = False) -> int:
        """After the commit point, past the stages in `lost`, which died: those of the new layout were started
        again in their new range at the URLs this stepper was given, a removed one is left out (see
        `recovery.roll_forward`). Returns the requests the frontend prefilled again. Only the new layout's
        stages are asked for their data address: a removed stage that died cannot answer. `rearm`: the
        frontend's arm was not recorded; it is sent again (its request id: answered from the frontend's cache
        when it armed) for the sequences it saw live."""
        state = self.frontend.get("/control/state")
        self.return_address = str(state["return_address"])
        new = [s.stage_id for s in self.plan.new]
        infos = call_all(lambda sid: self.clients[sid].get("/info"), new)
        self.data = {sid: f"{i['data']['host']}:{i['data']['port']}" for sid, i in zip(new, infos, strict=True)}
        self.pairs = copy_pairs(self.plan)
        self.report.restarted = [sid for sid in lost if sid in new]
        if rearm:
            self._arm_frontend()
        roll_forward(self, lost)
        return self.report.requests_reprefilled

    def cleanup(self) -> dict[int, dict[str, Any]]:
        """The removed stages' counters (read before the caller stops them); the frontend stops guarding."""
        for sid in self.plan.removed:
            with contextlib.suppress(ControlCallError):  # a stage already gone has no counters to give
                self.report.departed_stats[sid] = self.clients[sid].get("/stats")
        self._unguard()
        return self.report.departed_stats

    def abort(self) -> list[str]:
        """Before the commit point: every stage drops the change's state (one that never saw it answers at
        once); returns the problems met, each naming its stage."""
        problems = []
        for sid in sorted(self.clients):
            try:
                self.clients[sid].post("/reconfig/abort", {"request_id": self._id(f"abort-{sid}"),
                                                           "reconfig_id": self.report.reconfig_id})
            except ControlCallError as error:
                problems.append(str(error))
        self._unguard()
        return problems

    def _unguard(self) -> None:
        with contextlib.suppress(ControlCallError):  # best effort, as `guard` is
            self.frontend.post("/control/guard", {"request_id": self._id("unguard"), "recover_timeout_s": 0.0})
