"""`reconfigure`: one layout change (prepare, pre-copy, switch, clean up) driven over the control APIs of
the frontend and the agents, with abort back to the old layout before the commit point.

Switches (`SWITCHES`): `epoch` (the default, see `epoch`) hands sequences to the new layout one step at a
time while serving never stops; `drain` holds the frontend until no micro-batch is in flight, moves the
last deltas and commits every stage at once. `stop-copy` and `restart` always hold (that is what they are).

Strategies: `live` pre-copies KV while serving and moves only the rest while held; `live-no-resize` does
the same with every pool keeping its size; `stop-copy` holds first and then prepares and copies all KV
of the moving layers at once (the baseline that live pre-copy is measured against); `restart` is what is done
without live reconfiguration: hold, stop every old stage, start every new one empty and let the frontend
prefill each live request again (prompt and output so far), recomputing its KV instead of moving it.

Stages are addressed by the stage ids of `plan.new` (`api.plan_moves`); added stages are started and
removed ones stopped through callables, so the same code serves local processes and Kubernetes pods.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeshift.api import ReconfigPlan, StagePlan
from pipeshift.control.epoch import EpochSwitch
from pipeshift.control.http import ControlCallError, ControlClient, call_all
from pipeshift.control.phases import Phase, PhaseClock
from pipeshift.control.precopy import RoundStats, copy_pairs, precopy_done, run_round
from pipeshift.control.recovery import back_past_crash, forward_past_crash, guard
from pipeshift.errors import UserError

logger = logging.getLogger(__name__)

# Calls after the commit point are retried this often before the change is reported failed.
COMMIT_ATTEMPTS = 3
STRATEGIES = ("live", "live-no-resize", "stop-copy", "restart")
SWITCHES = ("epoch", "drain")
# The protocol step each phase belongs to, named as in `PIPESHIFT_FAULT`, for the report's failure reason.
_STEPS = {
    Phase.STARTING: "start",
    Phase.PREPARING: "prepare",
    Phase.PRECOPYING: "precopy",
    Phase.ARMING: "switch",
    Phase.HOLDING: "switch",
    Phase.FINAL_COPY: "switch",
    Phase.COMMITTING: "commit",
    Phase.RESUMING: "commit",
    Phase.RETIRING: "commit",
    Phase.CLEANING: "cleanup",
}
# Where targets take the weights of incoming layers from: their checkpoint, or the source stage (streamed).
WEIGHTS = ("checkpoint", "source")


@dataclass(frozen=True)
class SwitchBudget:
    """`switch_s`: how long the final delta may take at the measured link speed (the pre-copy stop rule);
    `max_rounds`: pre-copy rounds at most; `final_rounds`: rounds at most while held (nothing computes
    then, so one normally cleans everything); `resize`: let commits shrink pools by the freed blocks.

    Timeouts: `call_timeout_s` bounds every control call (a call that does not answer in time aborts the
    change before its point of no return and is retried after it, see `COMMIT_ATTEMPTS`); `hold_timeout_s`
    bounds the waits on the frontend (a drain, the old epoch's last batches), on top of the call timeout;
    `recover_timeout_s`: how long the frontend keeps the requests of a stage that dies during the change
    while it is started again (see `recovery`).

    `precopy_bytes_per_s`: a cap on the pre-copy rounds that run while serving goes on (all pairs together,
    shared evenly among them; None: as fast as the sources can send), as live VM migration caps its
    bandwidth. On a host whose cores and memory bandwidth the decode steps use, an uncapped round slows every
    step it overlaps (measured: 1.4–1.8× on the benchmark's 2-core host, 1.2–1.3× at 50 MB/s per pair); a
    cap trades a longer switch for less interference. Rounds while held and stop-copy's copy are never
    capped: nothing computes then."""

    switch_s: float = 0.05
    max_rounds: int = 4
    final_rounds: int = 3
    hold_timeout_s: float = 30.0
    call_timeout_s: float = 60.0
    resize: bool = True
    recover_timeout_s: float = 60.0
    precopy_bytes_per_s: float | None = None

    def __post_init__(self) -> None:
        rate = self.precopy_bytes_per_s
        if rate is not None and not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"SwitchBudget.precopy_bytes_per_s must be a positive number of bytes/s or None, "
                             f"got {rate}")
        if self.switch_s < 0 or self.max_rounds < 1 or self.final_rounds < 1:
            raise ValueError(f"invalid switch budget: {self}")
        if not self.recover_timeout_s >= 0:
            raise ValueError(f"SwitchBudget.recover_timeout_s must be >= 0 seconds, got {self.recover_timeout_s}")
        for name in ("hold_timeout_s", "call_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SwitchBudget.{name} must be a positive number of seconds, got {getattr(self, name)}")

    @classmethod
    def with_timeout(cls, seconds: float | None, precopy_bytes_per_s: float | None = None) -> SwitchBudget:
        """The default budget with every timeout set to `seconds` (None: the defaults) and the pre-copy cap
        (`pipeshift reconfigure --timeout/--precopy-rate`)."""
        timeouts = {} if seconds is None else {"hold_timeout_s": seconds, "call_timeout_s": seconds}
        return cls(precopy_bytes_per_s=precopy_bytes_per_s, **timeouts)


@dataclass
class ReconfigReport:
    """`pause_ms`: serving held, from the hold call to the frontend's resume answer; `switch_duration_ms`:
    the whole change; `outcome`: committed, aborted (old layout serving) or failed (after commit).
    `held_unix`/`resumed_unix`: wall-clock times of the hold call and the resume answer, to match against
    client-side timestamps; `departed_stats`: `/stats` of each removed stage, read just before stopping it
    (its counters are part of the work the change cost)."""

    reconfig_id: str
    strategy: str = "live"
    outcome: str = "running"
    error: str | None = None
    epoch: int | None = None
    pause_ms: float = 0.0
    switch_duration_ms: float = 0.0
    precopy_rounds: int = 0
    kv_bytes_moved: int = 0
    rounds: list[RoundStats] = field(default_factory=list)
    phases_ms: dict[str, float] = field(default_factory=dict)
    held_unix: float | None = None
    resumed_unix: float | None = None
    departed_stats: dict[int, dict[str, Any]] = field(default_factory=dict)
    # Rolling forward past a stage that died after the commit point: the stages started again in their new
    # range, and the live requests the frontend prefilled again because their KV died with it.
    restarted: list[int] = field(default_factory=list)
    requests_reprefilled: int = 0
    # The switch used ("epoch" or "drain"); for epoch: old-epoch batches in flight when the frontend armed,
    # E+1 batches that waited at a target's fence for KV, the longest wait, and the final-delta bytes pushed
    # after arming (part of `kv_bytes_moved`).
    switch: str = "drain"
    old_batches_at_arm: int = 0
    fence_waits: int = 0
    fence_wait_ms_max: float = 0.0
    kv_bytes_pushed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "reconfig_id": self.reconfig_id,
            "strategy": self.strategy,
            "outcome": self.outcome,
            "error": self.error,
            "epoch": self.epoch,
            "pause_ms": self.pause_ms,
            "switch_duration_ms": self.switch_duration_ms,
            "precopy_rounds": self.precopy_rounds,
            "kv_bytes_moved": self.kv_bytes_moved,
            "rounds": [r.to_json() for r in self.rounds],
            "phases_ms": self.phases_ms,
            "held_unix": self.held_unix,
            "resumed_unix": self.resumed_unix,
            "departed_stats": {str(k): v for k, v in self.departed_stats.items()},
            "restarted": list(self.restarted),
            "requests_reprefilled": self.requests_reprefilled,
            "switch": self.switch,
            "old_batches_at_arm": self.old_batches_at_arm,
            "fence_waits": self.fence_waits,
            "fence_wait_ms_max": self.fence_wait_ms_max,
            "kv_bytes_pushed": self.kv_bytes_pushed,
        }


class ReconfigFailed(RuntimeError):
    """The change failed after its commit point: the stages may be split between layouts."""

    def __init__(self, report: ReconfigReport) -> None:
        self.report = report
        super().__init__(f"reconfiguration {report.reconfig_id} failed after commit: {report.error}")


def reconfigure(
    frontend_url: str,
    agents: Mapping[int, str],
    plan: ReconfigPlan,
    *,
    start_stage: Callable[[StagePlan], str] | None = None,
    stop_stage: Callable[[int], None] | None = None,
    budget: SwitchBudget | None = None,
    token: str | None = None,
    strategy: str = "live",
    weights: str = "checkpoint",
    before_hold: Callable[[], None] | None = None,
    switch: str = "epoch",
) -> ReconfigReport:
    """Change the running pipeline from `plan.old` to `plan.new` while it serves, by `strategy` (one of
    `STRATEGIES`; `live-no-resize` overrides `budget.resize`). `weights` (one of `WEIGHTS`): targets read
    incoming layers from their checkpoint, or stream them from the stage that computes them now (added
    stages start from their checkpoint either way). `before_hold()` runs just before serving is held; an
    exception from it aborts the change (the demo waits there until enough requests stream). `switch` (one
    of `SWITCHES`): how `live` and `live-no-resize` hand over, epoch (no pause) or drain; `before_hold()`
    then runs just before arming.

    `agents` maps the old layout's stage ids to their control URLs. `start_stage(stage)` starts an
    added stage with its layers and returns its control URL; `stop_stage(stage_id)` stops one (removed
    stages after the switch, started ones on abort). Returns the report; an abort is an outcome
    (`report.error` says why), a failure after commit raises ReconfigFailed.
    """
    if strategy not in STRATEGIES:
        raise UserError(f"unknown reconfiguration strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if weights not in WEIGHTS:
        raise UserError(f"unknown weights source {weights!r}; valid: {', '.join(WEIGHTS)}")
    if switch not in SWITCHES:
        raise UserError(f"unknown switch {switch!r}; valid: {', '.join(SWITCHES)}")
    if weights == "source" and strategy == "restart":
        raise UserError("weights 'source' needs running sources, but a restart stops them before the new stages "
                        "load; use weights 'checkpoint' with restart")
    budget = budget or SwitchBudget()
    if strategy == "live-no-resize":
        budget = dataclasses.replace(budget, resize=False)
    run = _Run(frontend_url, agents, plan, start_stage, stop_stage, budget, token, strategy)
    run.weights, run.before_hold = weights, before_hold
    # `switch` picks how live strategies hand over; stop-copy and restart hold by definition.
    run.report.switch = switch if strategy in ("live", "live-no-resize") else "drain"
    return run.execute()


class _Run(EpochSwitch):
    # Set by `reconfigure` after construction (see its docstring).
    weights: str = "checkpoint"
    before_hold: Callable[[], None] | None = None

    def __init__(
        self,
        frontend_url: str,
        agents: Mapping[int, str],
        plan: ReconfigPlan,
        start_stage: Callable[[StagePlan], str] | None,
        stop_stage: Callable[[int], None] | None,
        budget: SwitchBudget,
        token: str | None,
        strategy: str,
    ) -> None:
        missing = sorted({s.stage_id for s in plan.old} - set(agents))
        if missing:
            raise ValueError(f"agents has no control URL for stage ids {missing} of the old layout")
        if plan.added and start_stage is None:
            raise ValueError(f"stages {list(plan.added)} are added but no start_stage was given")
        if strategy == "restart" and (start_stage is None or stop_stage is None):
            raise ValueError("a restart stops every old stage and starts every new one: give both start_stage "
                             "and stop_stage")
        self.plan = plan
        self.budget = budget
        self.token = token
        self.start_stage = start_stage
        self.stop_stage = stop_stage
        self.frontend = ControlClient(frontend_url, token, budget.call_timeout_s, name="frontend")
        self.clients = {sid: self._client(sid, url) for sid, url in agents.items()}
        self.report = ReconfigReport(reconfig_id=f"reconfig-{uuid.uuid4().hex[:12]}", strategy=strategy)
        self.clock = PhaseClock()
        self.started: list[int] = []
        self.held = False
        # The hold call's request id: an abort's resume cancels it, so a hold that arrives late cannot act.
        self.hold_id: str | None = None
        self.held_at = 0.0
        self.live: list[int] = []
        self.reserve_tokens: dict[str, int] = {}

    def _client(self, sid: int, url: str) -> ControlClient:
        return ControlClient(url, self.token, self.budget.call_timeout_s, name=f"stage {sid}")

    def _why(self, error: Exception) -> str:
        """The report's reason: the protocol step that failed (named like `PIPESHIFT_FAULT`'s phases), the
        orchestrator's phase, and the error, which names the call, whose API it was and why it failed."""
        return f"{_STEPS.get(self.clock.phase, self.clock.phase.value)} failed ({self.clock.phase.value}): {error}"

    def _id(self, what: str) -> str:
        return f"{self.report.reconfig_id}-{what}-{uuid.uuid4().hex[:8]}"

    def execute(self) -> ReconfigReport:
        guard(self, self.budget.recover_timeout_s)
        if self.report.strategy == "restart":
            return self._restart()
        try:
            self._before_commit()
            if self.report.switch == "epoch":
                self._commit_epoch()
            else:
                self._commit_and_resume()
        except Exception as error:
            self.report.error = self._why(error)
            if not self.clock.committed:
                self._abort()
            elif self._forward_past_crash():
                self._clean_up()
            else:
                self._finish(Phase.FAILED)
                raise ReconfigFailed(self.report) from error
        else:
            self._clean_up()
        return self.report

    def _forward_past_crash(self) -> bool:
        """After the commit point: whether a stage of the new layout had died and the change rolled forward
        past it (see `recovery`); a failure of that recovery is added to the report's error."""
        try:
            return forward_past_crash(self)
        except Exception as error:
            self.report.error = f"{self.report.error}; rolling forward past a stage that died: {error}"
            return False

    def _before_commit(self) -> None:
        state = self.frontend.get("/control/state")
        self.epoch = int(state["epoch"]) + 1
        self.report.epoch = self.epoch
        self.return_address = str(state["return_address"])
        self.clock.enter(Phase.STARTING)
        for sid in self.plan.added:
            assert self.start_stage is not None
            self.started.append(sid)
            url = self.start_stage(self.plan.new.stage(sid))
            self.clients[sid] = self._client(sid, url)
        self._discover()
        if self.report.strategy == "stop-copy":
            self._stop_and_copy()
            return
        self.clock.enter(Phase.PREPARING)
        self._prepare(state["sequences"])
        self._precopy_rounds()
        if self.report.switch == "epoch":
            self._arm_agents()
            return
        self._hold()
        self.clock.enter(Phase.FINAL_COPY)
        for _ in range(self.budget.final_rounds):
            if not self.pairs or self._round().dirty_blocks == 0:
                break
        else:
            raise RuntimeError(
                f"KV of the moving layers was still dirty after {self.budget.final_rounds} rounds while held"
            )

    def _discover(self) -> None:
        """The data-plane address of every stage involved, the copy pairs and the targets (read-only calls)."""
        involved = self._new_ids() + list(self.plan.removed)
        infos = call_all(lambda sid: self.clients[sid].get("/info"), involved)
        self.data = {sid: f"{i['data']['host']}:{i['data']['port']}" for sid, i in zip(involved, infos, strict=True)}
        self.pairs = copy_pairs(self.plan)
        self.targets = sorted({p.target for p in self.pairs} | set(self.plan.added))

    def _restart(self) -> ReconfigReport:
        """Hold, stop all old stages (reading their counters first), start all new ones, resume with a
        re-prefill. Stopping the old stages is the commit point: there is nothing to go back to after it."""
        state = self.frontend.get("/control/state")
        self.epoch = int(state["epoch"]) + 1
        self.report.epoch = self.epoch
        try:
            self._hold()
        except Exception as error:
            self.report.error = str(error)
            self._abort()
            return self.report
        try:
            self.clock.enter(Phase.COMMITTING)
            for sid in sorted(self.clients):
                try:
                    self.report.departed_stats[sid] = self.clients[sid].get("/stats")
                except ControlCallError as error:
                    logger.warning("%s: stage %d left without its stats: %s", self.report.reconfig_id, sid, error)
                assert self.stop_stage is not None
                self.stop_stage(sid)
            assert self.start_stage is not None
            for stage in self.plan.new:
                url = self.start_stage(stage)
                self.clients[stage.stage_id] = self._client(stage.stage_id, url)
            self.clock.enter(Phase.RESUMING)
            resume = {
                "request_id": self._id("resume"),
                "stages": [self.clients[sid].address for sid in self._new_ids()],
                "epoch": self.epoch,
                "reprefill": True,
            }
            self._forward(self.frontend, "/control/resume", resume)
            self.report.resumed_unix = time.time()
            self.held = False
            self.report.pause_ms = self.clock.elapsed_ms() - self.held_at
        except Exception as error:
            self.report.error = str(error)
            self._finish(Phase.FAILED)
            raise ReconfigFailed(self.report) from error
        self._finish(Phase.DONE)
        self.report.outcome = "committed"
        return self.report

    def _stop_and_copy(self) -> None:
        """Held for everything: prepare, then one copy of all KV of the moving layers. Nothing computes while
        held, so that one copy leaves nothing dirty; anything still dirty is a fault, not a reason to patch."""
        self._hold()
        self._prepare(self.reserve_tokens)
        self.clock.enter(Phase.FINAL_COPY)
        if self.pairs and self._round(precopy=False).dirty_blocks:
            raise RuntimeError(f"KV of the moving layers changed while held: {self.report.rounds[-1]}")

    def _hold(self) -> None:
        if self.before_hold is not None:
            self.before_hold()
        self.clock.enter(Phase.HOLDING)
        self.held_at = self.clock.elapsed_ms()
        self.report.held_unix = time.time()
        self.held = True
        self.hold_id = self._id("hold")
        held = self.frontend.post(
            "/control/hold",
            {"request_id": self.hold_id, "timeout_s": self.budget.hold_timeout_s},
            self.budget.hold_timeout_s + self.budget.call_timeout_s,
        )
        self.live = [int(s) for s in held["sequences"]]
        self.reserve_tokens = {str(k): int(v) for k, v in held["reserve_tokens"].items()}
        if self.report.strategy not in ("stop-copy", "restart"):
            self._prepare(self.reserve_tokens)

    def _prepare(self, sequences: Mapping[str, int]) -> None:
        """Every target loads its incoming layers and reserves KV for `sequences` on them (idempotent
        per sequence on the agent, so a second call after the hold only adds late admissions)."""

        def one(sid: int) -> None:
            stage = self.plan.new.stage(sid)
            self.clients[sid].post(
                "/reconfig/prepare",
                {
                    "request_id": self._id(f"prepare-{sid}"),
                    "reconfig_id": self.report.reconfig_id,
                    "epoch": self.epoch,
                    "layers": [stage.start, stage.end],
                    "sequences": {str(k): int(v) for k, v in sequences.items()},
                    "resize": self.budget.resize,
                    **self._weight_sources(sid),
                },
            )

        call_all(one, self.targets)

    def _weight_sources(self, sid: int) -> dict[str, Any]:
        """With weights from the source: which stage's control API serves each layer moving to stage `sid`."""
        if self.weights != "source":
            return {}
        sources = {str(m.layer): self.clients[m.src_stage].base_url for m in self.plan.moves if m.dst_stage == sid}
        return {"weights": "source", "weight_sources": sources}

    def _precopy_rounds(self) -> None:
        """PRECOPYING: rounds beside serving, at the budget's cap, until the stop rule says the rest is small."""
        self.clock.enter(Phase.PRECOPYING)
        while self.pairs and not precopy_done(self.report.rounds, self.budget.switch_s, self.budget.max_rounds):
            self._round(rate=self.budget.precopy_bytes_per_s)

    def _round(self, precopy: bool = True, rate: float | None = None) -> RoundStats:
        """`precopy`: a round of the pre-copy protocol (the final rounds while held included), as opposed to
        stop-copy's single bulk copy; `rate`: its cap in bytes/s, for rounds that run while serving."""
        stats = run_round(self.report.reconfig_id, self.pairs, self.clients, self.data, self.budget.call_timeout_s,
                          rate)
        self.report.rounds.append(stats)
        self.report.precopy_rounds += precopy
        self.report.kv_bytes_moved += stats.bytes
        logger.info("%s: pre-copy round %d moved %d bytes, %d still dirty", self.report.reconfig_id,
                    len(self.report.rounds), stats.bytes, stats.dirty_bytes)
        return stats

    def _commit_and_resume(self) -> None:
        self.clock.enter(Phase.COMMITTING)
        order = self._new_ids()
        downstream = [self.data[sid] for sid in order[1:]] + [self.return_address]
        commits = {
            sid: {
                "request_id": self._id(f"commit-{sid}"),
                "reconfig_id": self.report.reconfig_id,
                "epoch": self.epoch,
                "layers": [self.plan.new.stage(sid).start, self.plan.new.stage(sid).end],
                "downstream": to,
                "sequences": self.live,
                "resize": self.budget.resize,
            }
            for sid, to in zip(order, downstream, strict=True)
        }
        call_all(lambda sid: self._forward(self.clients[sid], "/reconfig/commit", commits[sid]), order)
        self.clock.enter(Phase.RESUMING)
        resume = {
            "request_id": self._id("resume"),
            "stages": [self.clients[sid].address for sid in order],
            "epoch": self.epoch,
        }
        self._forward(self.frontend, "/control/resume", resume)
        self.report.resumed_unix = time.time()
        self.held = False
        self.report.pause_ms = self.clock.elapsed_ms() - self.held_at

    def _forward(self, client: ControlClient, path: str, body: Mapping[str, Any],
                 timeout_s: float | None = None) -> dict[str, Any]:
        """After commit: the same call (same request id, so never applied twice) until it is answered."""
        for attempt in range(COMMIT_ATTEMPTS):
            try:
                return client.post(path, body, timeout_s)
            except ControlCallError as error:
                if attempt == COMMIT_ATTEMPTS - 1 or (error.status is not None and error.status < 500):
                    raise
                logger.warning("%s; retrying the committed change", error)
        raise AssertionError("unreachable")

    def _clean_up(self) -> None:
        self.clock.enter(Phase.CLEANING)
        for sid in self.plan.removed:
            try:
                self.report.departed_stats[sid] = self.clients[sid].get("/stats")
            except ControlCallError as error:
                logger.warning("%s: stage %d left without its stats: %s", self.report.reconfig_id, sid, error)
            if self.stop_stage is not None:
                self.stop_stage(sid)
        self._finish(Phase.DONE)
        self.report.outcome = "committed"

    def _abort(self) -> None:
        """Undo everything before the commit point; every undo step runs even if another fails. Sources hold
        pre-copy state too, so every stage is told (an agent that saw nothing of it answers at once)."""
        logger.warning("%s: aborting: %s", self.report.reconfig_id, self.report.error)
        problems: list[str] = []
        for sid in sorted(self.clients):
            try:
                self.clients[sid].post(
                    "/reconfig/abort",
                    {"request_id": self._id(f"abort-{sid}"), "reconfig_id": self.report.reconfig_id},
                )
            except ControlCallError as error:
                problems.append(str(error))
        recovered = False
        try:
            recovered = back_past_crash(self)  # an old stage that died is started again, its requests re-prefilled
        except Exception as error:
            problems.append(f"restarting a stage that died: {error}")
        if self.held and not recovered:
            try:
                self._forward(self.frontend, "/control/resume", {"request_id": self._id("resume-old"),
                                                                 "cancels": self.hold_id})
                self.report.pause_ms = self.clock.elapsed_ms() - self.held_at
            except ControlCallError as error:
                problems.append(str(error))
        for sid in self.started:
            if self.stop_stage is not None:
                try:
                    self.stop_stage(sid)
                except Exception as error:
                    problems.append(f"stopping added stage {sid}: {error}")
        if problems:
            self.report.error = f"{self.report.error}; while aborting: {'; '.join(problems)}"
        self._finish(Phase.ABORTED)
        self.report.outcome = "aborted"

    def _finish(self, phase: Phase) -> None:
        guard(self, 0.0)
        self.clock.enter(phase)
        self.report.phases_ms = dict(self.clock.durations_ms)
        self.report.switch_duration_ms = self.clock.elapsed_ms()

    def _new_ids(self) -> list[int]:
        return [s.stage_id for s in self.plan.new]
