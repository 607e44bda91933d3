"""The epoch switch of a live change (`switch="epoch"`, the default): no drain, no hold.

After pre-copy:
1. ARMING: every stage of either layout learns its range and route in epoch E+1 next to its E ones, each
   source which moving layers it owes which target (it pushes what is still dirty at once and, from then
   on, the final delta of every E step right after computing it), each target the sequences admitted
   since prepare. Any failure up to here aborts: the agents disarm and E serves on, untouched.
2. The frontend arms: from its next micro-batch on it builds only E+1 batches for the E+1 chain, so each
   sequence moves at its next step, while E batches in flight finish on the old chain. **This is the point
   of no return**: once the frontend may have armed, the change only rolls forward (every later call is
   retried with its request id, which the APIs treat idempotently). A clear refusal (HTTP 4xx) means it
   did not arm, and the change still aborts.
3. RETIRING: the frontend answers once no E batch is in flight; every source confirms its pushes were
   imported; every stage of the new layout retires E (drops the layers that left with their KV, frees the
   blocks of sequences that finished before the frontend armed and that only the change reserved,
   resizes its pool, keeps only its E+1 route); the frontend re-reads the stages for admission.

E+1 batches that reach a target before the KV they read wait at that stage's fence (see the agent's
`transition`); the longest wait is reported as `fence_wait_ms_max`. `pause_ms` is the time the frontend
could not start any micro-batch: its arm's critical section.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pipeshift.control.http import ControlCallError, ControlClient, call_all
from pipeshift.control.phases import Phase, PhaseClock

if TYPE_CHECKING:
    from pipeshift.api import ReconfigPlan
    from pipeshift.control.precopy import CopyPair
    from pipeshift.control.reconfigure import ReconfigReport, SwitchBudget

logger = logging.getLogger(__name__)


class EpochSwitch:
    """Mixed into the orchestrator's run; the attributes below are its."""

    plan: ReconfigPlan
    budget: SwitchBudget
    report: ReconfigReport
    clock: PhaseClock
    frontend: ControlClient
    clients: dict[int, ControlClient]
    data: dict[int, str]
    pairs: list[CopyPair]
    targets: list[int]
    epoch: int
    return_address: str
    before_hold: Callable[[], None] | None
    live: list[int]

    def _id(self, what: str) -> str:  # provided by the run
        raise NotImplementedError

    def _forward(self, client: ControlClient, path: str, body: Mapping[str, Any],
                 timeout_s: float | None = None) -> dict[str, Any]:  # the run's
        raise NotImplementedError

    def _arm_agents(self) -> None:
        """ARMING (step 1 of the module docstring)."""
        if self.before_hold is not None:
            self.before_hold()
        self.clock.enter(Phase.ARMING)
        sequences = {str(k): int(v) for k, v in self.frontend.get("/control/state")["sequences"].items()}
        new_ids = [s.stage_id for s in self.plan.new]
        routes = dict(zip(new_ids, [self.data[sid] for sid in new_ids[1:]] + [self.return_address], strict=True))
        pushes: dict[int, dict[str, list[int]]] = defaultdict(dict)
        for pair in self.pairs:
            pushes[pair.source][self.data[pair.target]] = list(pair.layers)
        old = {s.stage_id: [s.start, s.end] for s in self.plan.old}
        new = {s.stage_id: [s.start, s.end] for s in self.plan.new}

        def one(sid: int) -> None:
            self.clients[sid].post("/reconfig/arm", {
                "request_id": self._id(f"arm-{sid}"),
                "reconfig_id": self.report.reconfig_id,
                "epoch": self.epoch,
                "old_layers": old.get(sid),
                "layers": new.get(sid),
                "downstream": routes.get(sid),
                "pushes": pushes.get(sid, {}),
                "sequences": sequences if sid in self.targets else {},
                "resize": self.budget.resize,
            })  # fmt: skip

        call_all(one, sorted(set(old) | set(new)))

    def _commit_epoch(self) -> None:
        """Steps 2 and 3 of the module docstring."""
        self._arm_frontend()
        self._retire_epoch()

    def _arm_frontend(self) -> None:
        """Step 2: the frontend arms (the point of no return)."""
        new_ids = [s.stage_id for s in self.plan.new]
        body = {"request_id": self._id("arm"), "stages": [self.clients[sid].address for sid in new_ids],
                "epoch": self.epoch}  # fmt: skip
        self.report.held_unix = time.time()
        try:
            armed = self._forward(self.frontend, "/control/arm", body)
        except ControlCallError as error:
            if error.status is None or error.status >= 500:
                self.clock.enter(Phase.COMMITTING)  # it may have armed: roll forward only
            raise
        self.clock.enter(Phase.COMMITTING)
        self.report.resumed_unix = time.time()
        self.report.pause_ms = float(armed["paused_ms"])
        self.report.old_batches_at_arm = int(armed["old_in_flight"])
        self.live = [int(s) for s in armed["sequences"]]  # kept for a roll forward past a crash

    def _retire_epoch(self) -> None:
        """Step 3: the old epoch leaves the frontend and every stage (`self.live`: the arm's sequences)."""
        new_ids, live = [s.stage_id for s in self.plan.new], self.live
        self.clock.enter(Phase.RETIRING)
        retire = {"request_id": self._id("retire"), "epoch": self.epoch, "timeout_s": self.budget.hold_timeout_s}
        self._forward(self.frontend, "/control/retire", retire, self.budget.hold_timeout_s + self.budget.call_timeout_s)
        self._flush_sources()
        answers = call_all(lambda sid: self._forward(self.clients[sid], "/reconfig/retire", {
            "request_id": self._id(f"retire-{sid}"), "reconfig_id": self.report.reconfig_id, "epoch": self.epoch,
            "sequences": live}), new_ids)  # fmt: skip
        fences = [a["fence"] for a in answers if a.get("retired")]
        self.report.fence_waits = sum(int(f["waits"]) for f in fences)
        self.report.fence_wait_ms_max = max((float(f["max_ms"]) for f in fences), default=0.0)
        self._forward(self.frontend, "/control/settle", {"request_id": self._id("settle")})

    def _flush_sources(self) -> None:
        """Every final delta imported by its target, before any stage drops what it sent."""
        sources = sorted({pair.source for pair in self.pairs})
        timeout = self.budget.call_timeout_s / 2  # the agent gives up before our call does
        answers = call_all(lambda sid: self._forward(self.clients[sid], "/reconfig/flush", {
            "request_id": self._id(f"flush-{sid}"), "reconfig_id": self.report.reconfig_id,
            "timeout_s": timeout}), sources)  # fmt: skip
        pushed = sum(int(a["bytes"]) for a in answers)
        self.report.kv_bytes_pushed += pushed
        self.report.kv_bytes_moved += pushed
        errors = [e for a in answers for e in a["errors"]]
        if errors:
            # After the point of no return: the change goes on; the sequences that lack their KV fail at
            # their target's fence with an error naming it.
            self.report.error = "final deltas not delivered: " + "; ".join(errors[:3])
            logger.error("%s: %s", self.report.reconfig_id, self.report.error)
