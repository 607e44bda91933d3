"""A live layout change driven by the operator, one phase per reconcile pass, resumable after a crash.

The phase is written to `status.reconfiguration` *before* its side effects, so a new operator process
knows where its predecessor stopped:

    starting → preparing → precopying → arming → committing → retiring → cleaning → (done)

`starting` creates the pods of the added stages and waits until they are Ready; the others are steps of
`pipeshift.control.stepper` (request ids derived from the reconfiguration id, so a repeated step is answered
from the agents' and the frontend's caches instead of acting twice). `committing` is the point of no return
(the frontend arms). A phase before it that this process did not finish itself (the operator restarted, or
the step failed) **rolls back**: every stage aborts, the added pods go, the old layout serves on untouched.
From `committing` on, an unfinished phase is **repeated** until it succeeds: the change rolls forward.

`cleaning` reads the removed stages' counters, deletes their pods, records the frontend's new stage list on
its Deployment (metadata only: the running frontend was re-wired by the control calls and is not restarted),
and writes `status.layout` and `status.lastReconfiguration`.

A stage that dies during the change (its pod Failed, Succeeded, deleted or replaced, or not Ready with its
agent refusing connections) is seen at the next pass, not only when a call times out. Before the point of no
return (the frontend has not armed the new epoch) the change **rolls back** (a dead old stage is then the
restore path's: `restore.py`); after it, the change **rolls forward** (`rollingForward`): the dead stage gets a
new pod in its *new* range (`status.layout` becomes the new layout at once, so the reconcile pass creates it
there too), is committed there, the others finish the change and the frontend prefills every live request
again (`pipeshift.control.recovery.roll_forward`). The decision is written to `status.reconfiguration`
(`lost`, `phase`) before anything is done about it, and posted as an Event `StageLostDuringChange`.

Fault hook: `PIPESHIFT_OPERATOR_FAULT=<phase>` makes the process exit (status 3) right after writing that
phase to status, to test the resume and roll-back paths deterministically.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError

from pipeshift.api import Layout, ReconfigPlan, StagePlan, plan_moves
from pipeshift.control.http import ControlCallError, ControlClient
from pipeshift.control.reconfigure import SwitchBudget
from pipeshift.control.stepper import Stepper
from pipeshift.operator import manifests as m
from pipeshift.operator import status as st
from pipeshift.operator.reconcile import (
    NORMAL,
    STAGES_ANNOTATION,
    WARNING,
    ChangeRequest,
    Create,
    Delete,
    Event,
    Observed,
    PodView,
    layout_summary,
)
from pipeshift.operator.spec import PipelineRef, PipelineSpec
from pipeshift.policy.schema import AutoscalingPolicy

logger = logging.getLogger(__name__)

PHASES = ("starting", "preparing", "precopying", "arming", "committing", "retiring", "cleaning")
ROLLING_BACK = "rollingBack"
ROLLING_FORWARD = "rollingForward"
_PAST_OLD = ("cleaning", ROLLING_FORWARD)  # the removed stages are no longer needed
COMMIT_INDEX = PHASES.index("committing")
FAULT_ENV = "PIPESHIFT_OPERATOR_FAULT"
FAULT_EXIT = 3
# New stage pods that are not Ready this long after the change started (unschedulable, crash-looping) roll it back.
STARTING_TIMEOUT_S = 600.0
HEALTH_TIMEOUT_S = 2.0  # an agent whose pod is not Ready is asked directly; a refused connection means it is gone


def layout_json(layout: Layout) -> dict[str, Any]:
    return {"stages": [{"stageId": s.stage_id, "pool": s.pool, "layers": [s.start, s.end]} for s in layout]}


def layout_of(data: Mapping[str, Any]) -> Layout:
    return Layout(tuple(StagePlan(int(s["stageId"]), str(s["pool"]), int(s["layers"][0]), int(s["layers"][1]))
                        for s in data["stages"]))


def plan_of(running: Mapping[str, Any]) -> ReconfigPlan:
    """The plan a running change was started with (`from` and `to` keep the stage ids `plan_moves` gave)."""
    old, new = layout_of(running["from"]), layout_of(running["to"])
    replanned = plan_moves(old, new)
    if [s.stage_id for s in replanned.new] != [s.stage_id for s in new]:
        raise ValueError(f"reconfiguration {running.get('id')}: status.reconfiguration.to does not follow from "
                         "its from layout")
    return replanned


def new_change(name: str, plan: ReconfigPlan, now: str, reason: str) -> dict[str, Any]:
    return {"id": f"{name[:40]}-{uuid.uuid4().hex[:10]}", "phase": PHASES[0], "started": now,
            "startedUnix": time.time(), "from": layout_json(plan.old), "to": layout_json(plan.new),
            "toSummary": layout_summary(plan.new), "reason": reason, "kvBytesMoved": 0}


def next_step(phase: str, finished_here: bool, entered_here: bool) -> str:
    """What a pass does with a change in `phase`: `advance` (this process finished the phase), `repeat` it
    (this process entered it and it is waiting, e.g. for pods; or it is past the commit point), or `rollback`
    (another process entered it before the commit point and cannot say how far it got). Pure, the rule of
    the module docstring. (A phase that *failed* in this process before the commit point rolled back then.)"""
    if phase == ROLLING_BACK:
        return "rollback"
    if phase == ROLLING_FORWARD:
        return "rollforward"
    if phase not in PHASES:
        raise ValueError(f"status.reconfiguration.phase: unknown phase {phase!r}")
    if finished_here:
        return "advance"
    if PHASES.index(phase) < COMMIT_INDEX and not entered_here:
        return "rollback"
    return "repeat"


def after_loss(phase: str, armed: bool | None) -> str:
    """What a change does about a stage that died in `phase`: `rollback` before the point of no return,
    `forward` after it. In `committing` the point is the frontend's arm: `armed` says whether the frontend
    serves the new epoch already (None: it could not be asked, so it may have: forward). Pure."""
    if phase == ROLLING_BACK:
        return "rollback"
    if phase == ROLLING_FORWARD:
        return "forward"
    if phase not in PHASES:
        raise ValueError(f"status.reconfiguration.phase: unknown phase {phase!r}")
    index = PHASES.index(phase)
    if index == COMMIT_INDEX:
        return "rollback" if armed is False else "forward"
    return "rollback" if index < COMMIT_INDEX else "forward"


def pod_losses(running: Mapping[str, Any], plan: ReconfigPlan, pipeline: str, observed: Observed,
               every: bool = False) -> tuple[dict[int, str], list[int]]:
    """The stages of the change whose agent is gone as the pods show it (stage id → why), and those whose pod
    is merely not Ready (to ask the agent itself; `every`: all the others). Pure. Stages already in
    `running['lost']` are not looked at; neither is an added stage while its pod is being started, nor a
    removed stage once the change no longer needs it (`cleaning`, or rolling forward: it is left out).
    `running['agents']` (recorded once every pod was Ready) tells a replaced pod by its IP."""
    phase = str(running.get("phase"))
    known = {int(k) for k in running.get("lost") or {}}
    recorded = running.get("agents") or {}
    pods = {p.name: p for p in observed.pods if p.role == m.ROLE_STAGE}
    new_ids = {s.stage_id for s in plan.new}
    lost: dict[int, str] = {}
    unready: list[int] = []
    for sid in sorted(({s.stage_id for s in plan.old} | new_ids) - known):
        if (phase == "starting" and sid in plan.added) or (phase in _PAST_OLD and sid not in new_ids):
            continue
        name = m.stage_pod_name(pipeline, sid)
        pod = pods.get(name)
        if pod is None:
            lost[sid] = f"pod {name} is gone"
        elif pod.finished:
            lost[sid] = f"pod {name} {pod.phase}"
        elif pod.deleting:
            lost[sid] = f"pod {name} is being deleted"
        elif str(sid) in recorded and pod.pod_ip and _agent_url(pod.pod_ip) != recorded[str(sid)]:
            lost[sid] = f"pod {name} was replaced (now at {pod.pod_ip})"
        elif str(sid) in recorded and not pod.pod_ip:
            lost[sid] = f"pod {name} has no IP (it was replaced)"
        elif every or not (pod.ready and pod.pod_ip):
            unready.append(sid)
    return lost, unready


def _agent_url(ip: str) -> str:
    return f"http://{m.stage_address(ip)}"


def agent_gone(url: str, token: str | None) -> bool:
    """Whether nothing listens at the agent's control port any more (a refused connection); a slow or hung
    agent is not gone: it is left to the calls' timeouts, as in `pipeshift.control.recovery`."""
    try:
        ControlClient(url, token, HEALTH_TIMEOUT_S).get("/health")
    except ControlCallError as error:
        return error.status is None and not error.timed_out
    return False


@dataclass
class Ports:
    """What the driver needs from the outside: the adapter calls, Events, metrics (bound by handlers)."""

    apply: Callable[[Create | Delete], bool]
    patch_status: Callable[[Mapping[str, Any]], None]
    annotate_frontend: Callable[[Mapping[str, str]], None]
    token: Callable[[], str | None]
    post: Callable[[Event], None]
    ended: Callable[[str, float, float], None]  # outcome, seconds, pause seconds


def precopy_cap(spec: PipelineSpec | None, observed: Observed) -> float | None:
    """The pre-copy cap of the pipeline's policy (`reconfiguration.precopy_bytes_per_second`), in bytes/s: the
    policy `spec.policy` names, else the inline one. None without a policy, without a cap, or with a policy
    that does not validate (the pass reports that one; the change is not held up by it)."""
    if spec is None:
        return None
    body = (observed.policy or {}).get("spec") if spec.policy is not None else spec.inline_policy
    if not isinstance(body, Mapping):
        return None
    try:
        policy = AutoscalingPolicy.model_validate({"name": spec.policy or "inline", **body})  # inline: no name
    except ValidationError:
        return None
    return policy.reconfiguration.precopy_bytes_per_second


class ChangeDriver:
    """Drives the changes of every pipeline; remembers which phases *this process* finished."""

    def __init__(self, budget: SwitchBudget | None = None, fault: str | None = None) -> None:
        self.budget = budget or SwitchBudget(call_timeout_s=60.0, hold_timeout_s=60.0)
        self.fault = fault if fault is not None else os.environ.get(FAULT_ENV) or None
        self.finished: dict[str, str] = {}  # reconfiguration id -> the last phase this process completed
        self.entered: dict[str, str] = {}  # reconfiguration id -> the last phase this process entered

    # --- one pass ------------------------------------------------------------------------------------

    def advance(self, ref: PipelineRef, spec: PipelineSpec, observed: Observed, request: ChangeRequest,
                ports: Ports, now: str, reason: str = "spec.layout changed") -> bool:
        """One step of the change; True when it made progress and the next pass should follow at once
        (False: waiting for pods, or a step past the commit point failed and is repeated later)."""
        running = dict(request.running) if request.running is not None else None
        if running is None:
            plan = plan_moves(request.current, request.desired)
            running = new_change(ref.name, plan, now, reason)
            ports.post(Event(NORMAL, "Reconfiguring", f"live change {running['id']}: {layout_summary(plan.old)} -> "
                                                      f"{layout_summary(plan.new)} ({reason})"))
            return self._enter(running, PHASES[0], ref, spec, observed, ports, now)
        rid, phase = str(running["id"]), str(running["phase"])
        if phase != ROLLING_BACK:
            lost = self._losses(running, ref, observed, ports, probe_all=False)
            if lost:
                return self._lost(running, lost, ref, spec, observed, ports, now)
        step = next_step(phase, self.finished.get(rid) == phase, self.entered.get(rid) == phase)
        if step == "rollback":
            return self._rollback(running, ref, observed, ports, now)
        if step == "rollforward":
            return self._roll_forward(running, ref, spec, observed, ports, now)
        if step == "repeat":
            return self._run(running, ref, spec, observed, ports, now)
        index = PHASES.index(running["phase"])
        if index + 1 == len(PHASES):
            return self._done(running, ref, observed, ports, now)
        return self._enter(running, PHASES[index + 1], ref, spec, observed, ports, now)

    def _enter(self, running: dict[str, Any], phase: str, ref: PipelineRef, spec: PipelineSpec,
               observed: Observed, ports: Ports, now: str) -> bool:
        running["phase"] = phase
        ports.patch_status({"phase": st.RECONFIGURING, "reconfiguration": running})
        self.entered[str(running["id"])] = phase
        logger.info("%s/%s: reconfiguration %s: %s", ref.namespace, ref.name, running["id"], phase)
        if self.fault == phase:
            logger.error("%s=%s: exiting right after writing phase %s", FAULT_ENV, phase, phase)
            logging.shutdown()
            os._exit(FAULT_EXIT)
        return self._run(running, ref, spec, observed, ports, now)

    def _run(self, running: dict[str, Any], ref: PipelineRef, spec: PipelineSpec, observed: Observed,
             ports: Ports, now: str) -> bool:
        phase = str(running["phase"])
        try:
            completed = self._step(running, ref, spec, observed, ports)
        except Exception as error:
            lost = self._losses(running, ref, observed, ports, probe_all=True)
            if lost:  # the step failed because a stage died: not a timeout to sit out
                running["error"] = f"{phase}: {error}"
                return self._lost(running, lost, ref, spec, observed, ports, now)
            if PHASES.index(phase) < COMMIT_INDEX:
                logger.warning("%s: %s failed, rolling back: %s", running["id"], phase, error)
                running["error"] = f"{phase}: {error}"
                return self._rollback(running, ref, observed, ports, now)
            logger.warning("%s: %s failed after the commit point, repeating: %s", running["id"], phase, error)
            ports.post(Event(WARNING, "ReconfigurationRetrying", f"{running['id']}: {phase} failed, repeating "
                                                                 f"it (past the commit point): {error}"))
            return False
        if completed:
            self.finished[str(running["id"])] = phase
        ports.patch_status({"reconfiguration": running})
        return completed

    # --- the phases ----------------------------------------------------------------------------------

    def _step(self, running: dict[str, Any], ref: PipelineRef, spec: PipelineSpec, observed: Observed,
              ports: Ports) -> bool:
        """Run `running['phase']`; False when it must be run again (pods not Ready yet)."""
        plan = plan_of(running)
        phase = running["phase"]
        if phase == "starting":
            if self._start_pods(plan, ref, spec, observed, ports):
                pods = {p.name: p for p in observed.pods if p.role == m.ROLE_STAGE and p.pod_ip}
                running["agents"] = {str(sid): _agent_url(str(pods[m.stage_pod_name(ref.name, sid)].pod_ip))
                                     for sid in _stage_ids(plan) if m.stage_pod_name(ref.name, sid) in pods}
                return True
            waited = time.time() - float(running.get("startedUnix") or time.time())
            if waited > STARTING_TIMEOUT_S:
                raise RuntimeError(f"the new stage pods were not Ready after {waited:.0f} s")
            return False
        stepper = self._stepper(running, plan, ref, observed, ports, spec)
        if phase == "preparing":
            running["epoch"] = stepper.prepare()
        elif phase == "precopying":
            running["kvBytesMoved"] = int(running.get("kvBytesMoved") or 0) + stepper.precopy()
        elif phase == "arming":
            stepper.arm()
        elif phase == "committing":
            pause_ms, live = stepper.commit()
            running["pauseMs"], running["live"] = round(pause_ms, 3), live
        elif phase == "retiring":
            pushed = stepper.retire()
            if "pushedBytes" not in running:
                running["pushedBytes"] = pushed
                running["kvBytesMoved"] = int(running.get("kvBytesMoved") or 0) + pushed
        elif phase == "cleaning":
            stepper.cleanup()
            for sid in plan.removed:
                name = m.stage_pod_name(ref.name, sid)
                if ports.apply(Delete("Pod", name)):
                    ports.post(Event(NORMAL, "DeletedStagePod", f"pod {name}: stage {sid} left the layout in "
                                                                f"live change {running['id']}"))
            ports.annotate_frontend({STAGES_ANNOTATION: ",".join(stepper.clients[s.stage_id].address
                                                                 for s in plan.new)})
        return True

    def _start_pods(self, plan: ReconfigPlan, ref: PipelineRef, spec: PipelineSpec, observed: Observed,
                    ports: Ports) -> bool:
        pods = {p.name: p for p in observed.pods if p.role == m.ROLE_STAGE}
        ready = True
        for sid in plan.added:
            stage = plan.new.stage(sid)
            name = m.stage_pod_name(ref.name, sid)
            pod = pods.get(name)
            if pod is None or pod.deleting:
                ready = False
                if pod is None and ports.apply(Create(m.stage_pod(ref, spec, stage, spec.pool(stage.pool)))):
                    ports.post(Event(NORMAL, "CreatedStagePod", f"stage {sid} (pool {stage.pool}, layers "
                                                                f"[{stage.start}, {stage.end})) for a live change"))
            elif pod.finished:
                raise RuntimeError(f"the new stage pod {name} exited ({pod.phase}) before the change")
            elif not (pod.ready and pod.pod_ip):
                ready = False
        return ready

    @staticmethod
    def _agents(running: Mapping[str, Any], plan: ReconfigPlan, ref: PipelineRef, observed: Observed) -> dict[int, str]:
        """Each stage's control URL: the agent the change has been talking to (`running['agents']`), except a
        stage that died during it (`running['lost']`), whose replacement pod is asked; a stage whose pod has no
        IP and was never recorded raises."""
        pods = {p.name: p for p in observed.pods if not p.deleting}
        recorded, lost = running.get("agents") or {}, running.get("lost") or {}
        agents: dict[int, str] = {}
        for sid in _stage_ids(plan):
            if str(sid) in recorded and str(sid) not in lost:
                agents[sid] = str(recorded[str(sid)])
                continue
            pod = pods.get(m.stage_pod_name(ref.name, sid))
            if pod is None or not pod.pod_ip:
                raise RuntimeError(f"stage {sid}: pod {m.stage_pod_name(ref.name, sid)} has no IP")
            agents[sid] = _agent_url(pod.pod_ip)
        return agents

    def _stepper(self, running: Mapping[str, Any], plan: ReconfigPlan, ref: PipelineRef, observed: Observed,
                 ports: Ports, spec: PipelineSpec | None = None) -> Stepper:
        """`spec`: the pipeline's, for its policy's pre-copy cap (`precopy_cap`), which overrides the driver's."""
        agents = self._agents(running, plan, ref, observed)
        frontend = _frontend(observed)
        if frontend is None:
            raise RuntimeError("no running frontend pod to drive the change through")
        epoch = running.get("epoch")
        cap = precopy_cap(spec, observed)
        budget = self.budget if cap is None else replace(self.budget, precopy_bytes_per_s=cap)
        return Stepper(_frontend_url(frontend), agents, plan, str(running["id"]),
                       token=ports.token(), budget=budget, epoch=None if epoch is None else int(epoch),
                       live=[int(x) for x in running.get("live") or []])

    # --- the ends ------------------------------------------------------------------------------------

    def _rollback(self, running: dict[str, Any], ref: PipelineRef, observed: Observed, ports: Ports,
                  now: str) -> bool:
        if running.get("phase") != ROLLING_BACK:
            running["rolledBackFrom"] = running.get("phase")
            running["phase"] = ROLLING_BACK
            ports.patch_status({"reconfiguration": running})
        plan = plan_of(running)
        problems: list[str] = []
        try:  # every agent the change talked to, a dead one included (its call fails, and is reported)
            problems = self._stepper({**running, "lost": {}}, plan, ref, observed, ports).abort()
        except RuntimeError as error:  # an added pod never got an IP: nothing of the change reached it
            problems.append(str(error))
            stepper = self._old_only(running, plan, ref, observed, ports)
            if stepper is not None:
                problems += stepper.abort()
        for sid in plan.added:
            name = m.stage_pod_name(ref.name, sid)
            if ports.apply(Delete("Pod", name)):
                ports.post(Event(NORMAL, "DeletedStagePod", f"pod {name}: live change {running['id']} rolled back"))
        why = running.get("error") or f"the operator restarted in phase {running.get('rolledBackFrom')}, before " \
                                      "the commit point"
        if problems:
            why += "; while aborting: " + "; ".join(problems[:3])
        ports.post(Event(WARNING, "ReconfigurationRolledBack", f"{running['id']}: {why}; the old layout serves on"))
        return self._end(running, "aborted", why, ref, ports, now, layout=None)

    def _old_only(self, running: Mapping[str, Any], plan: ReconfigPlan, ref: PipelineRef, observed: Observed,
                  ports: Ports) -> Stepper | None:
        """A stepper over the old layout alone (the change reduced to no added stage), to abort it."""
        try:
            pods = {p.name: p for p in observed.pods if not p.deleting}
            agents = {s.stage_id: f"http://{m.stage_address(pods[m.stage_pod_name(ref.name, s.stage_id)].pod_ip or '')}"
                      for s in plan.old}
            frontend = _frontend(observed)
            if frontend is None:
                return None
            return Stepper(f"http://{_host(frontend.pod_ip or '')}:{m.FRONTEND_PORT}", agents,
                           plan_moves(plan.old, plan.old), str(running["id"]), token=ports.token(), budget=self.budget)
        except KeyError:
            return None

    # --- a stage that died during the change ---------------------------------------------------------

    def _losses(self, running: Mapping[str, Any], ref: PipelineRef, observed: Observed, ports: Ports,
                probe_all: bool) -> dict[int, str]:
        """The change's stages that died: what their pods show, then the agents asked directly (those whose pod
        is not Ready; with `probe_all`, after a step failed, every one)."""
        plan = plan_of(running)
        lost, ask = pod_losses(running, plan, ref.name, observed, every=probe_all)
        if not ask:
            return lost
        token = ports.token()
        pods = {p.name: p for p in observed.pods if p.role == m.ROLE_STAGE and p.pod_ip}
        recorded = running.get("agents") or {}
        for sid in ask:
            pod = pods.get(m.stage_pod_name(ref.name, sid))
            url = recorded.get(str(sid)) or (_agent_url(str(pod.pod_ip)) if pod is not None else None)
            if url and agent_gone(str(url), token):
                lost[sid] = f"its agent at {url} refuses connections"
        return lost

    def _lost(self, running: dict[str, Any], lost: Mapping[int, str], ref: PipelineRef, spec: PipelineSpec,
              observed: Observed, ports: Ports, now: str) -> bool:
        """Roll back or forward past stages that died (`after_loss`); the decision is in status first."""
        phase = str(running["phase"])
        armed = self._armed(running, observed, ports) if phase == "committing" else None
        decision = after_loss(phase, armed)
        what = "; ".join(f"stage {sid} died ({why})" for sid, why in sorted(lost.items()))
        running["lost"] = {**(running.get("lost") or {}), **{str(sid): why for sid, why in lost.items()}}
        if decision == "rollback":
            earlier = f" ({running['error']})" if running.get("error") else ""
            running["error"] = f"{what} in phase {phase}, before the commit point{earlier}"
            running["rolledBackFrom"], running["phase"] = phase, ROLLING_BACK
            ports.patch_status({"reconfiguration": running})
            ports.post(Event(WARNING, "StageLostDuringChange", f"{running['id']}: {what} in phase {phase}, before the "
                                                               "point of no return: rolling back; the old layout "
                                                               "serves on (a dead old stage is restored after)"))
            return self._rollback(running, ref, observed, ports, now)
        if phase != ROLLING_FORWARD:
            running["rolledForwardFrom"], running["phase"] = phase, ROLLING_FORWARD
        plan = plan_of(running)
        ports.patch_status({"phase": st.RECONFIGURING, "reconfiguration": running,
                            **_layout_patch(plan, ref, observed)})
        ports.post(Event(WARNING, "StageLostDuringChange", f"{running['id']}: {what} in phase {phase}, past the point "
                                                           "of no return: rolling forward; it comes back in its new "
                                                           "range and the frontend prefills its requests again"))
        return self._roll_forward(running, ref, spec, observed, ports, now)

    def _armed(self, running: Mapping[str, Any], observed: Observed, ports: Ports) -> bool | None:
        """Whether the frontend serves the change's epoch (it armed: past the point of no return); None when it
        cannot be asked."""
        frontend, epoch = _frontend(observed), running.get("epoch")
        if frontend is None or epoch is None:
            return None
        try:
            state = ControlClient(_frontend_url(frontend), ports.token(), HEALTH_TIMEOUT_S).get("/control/state")
        except ControlCallError:
            return None
        return int(state["epoch"]) >= int(epoch)

    def _roll_forward(self, running: dict[str, Any], ref: PipelineRef, spec: PipelineSpec, observed: Observed,
                      ports: Ports, now: str) -> bool:
        """Once every lost stage of the new layout has a Ready pod in its new range: finish the change past
        them (`Stepper.roll_forward`, request ids of the change: a repeat acts once), then `cleaning`. The
        removed stages are left out too: every live request is prefilled again, so their last KV is not needed."""
        plan = plan_of(running)
        lost = sorted(int(k) for k in running.get("lost") or {})
        if not self._replace(plan, lost, running, ref, spec, observed, ports):
            return False  # the replacement pods' events start the next pass
        try:
            stepper = self._stepper(running, plan, ref, observed, ports)
            reprefilled = stepper.roll_forward(sorted(set(lost) | set(plan.removed)), rearm="live" not in running)
        except Exception as error:
            more = self._losses(running, ref, observed, ports, probe_all=True)
            if more:
                return self._lost(running, more, ref, spec, observed, ports, now)
            ports.post(Event(WARNING, "ReconfigurationRetrying", f"{running['id']}: rolling forward past stage "
                                                                 f"{', '.join(map(str, lost))} failed, repeating it: "
                                                                 f"{error}"))
            return False
        running["requestsReprefilled"] = reprefilled
        running["pauseMs"] = round(float(running.get("pauseMs") or stepper.report.pause_ms), 3)
        running["live"] = list(stepper.live)
        running["agents"] = {**(running.get("agents") or {}),
                             **{str(sid): stepper.clients[sid].base_url for sid in lost if sid in stepper.clients}}
        self.finished[str(running["id"])] = ROLLING_FORWARD
        return self._enter(running, "cleaning", ref, spec, observed, ports, now)

    def _replace(self, plan: ReconfigPlan, lost: list[int], running: Mapping[str, Any], ref: PipelineRef,
                 spec: PipelineSpec, observed: Observed, ports: Ports) -> bool:
        """Each lost stage of the new layout on a fresh pod created with its new range: the dead pod (or one
        the reconcile pass created in the old range before the decision) is deleted, then one is created.
        True once every one is Ready with an IP."""
        pods = {p.name: p for p in observed.pods if p.role == m.ROLE_STAGE}
        recorded = running.get("agents") or {}
        ready = True
        for sid in (sid for sid in lost if sid in {s.stage_id for s in plan.new}):
            stage, name = plan.new.stage(sid), m.stage_pod_name(ref.name, sid)
            pod = pods.get(name)
            if pod is None:
                ready = False
                if ports.apply(Create(m.stage_pod(ref, spec, stage, spec.pool(stage.pool)))):
                    ports.post(Event(NORMAL, "CreatedStagePod", f"stage {sid} (pool {stage.pool}, layers "
                                                                f"[{stage.start}, {stage.end})): it died in live "
                                                                f"change {running['id']}, which rolls forward"))
                continue
            the_dead_one = pod.pod_ip is not None and recorded.get(str(sid)) == _agent_url(pod.pod_ip)
            stale = pod.finished or pod.layers != (stage.start, stage.end) or the_dead_one
            if pod.deleting or stale:
                ready = False
                if not pod.deleting and ports.apply(Delete("Pod", name)):
                    ports.post(Event(NORMAL, "DeletedStagePod", f"pod {name}: stage {sid} died in live change "
                                                                f"{running['id']}; replaced in its new range"))
            elif not (pod.ready and pod.pod_ip):
                ready = False
        return ready

    def _done(self, running: dict[str, Any], ref: PipelineRef, observed: Observed, ports: Ports, now: str) -> bool:
        plan = plan_of(running)
        stages = _layout_patch(plan, ref, observed)["layout"]["stages"]
        ports.post(Event(NORMAL, "Reconfigured", f"{running['id']}: now {layout_summary(plan.new)}; switch pause "
                                                 f"{running.get('pauseMs', 0)} ms, {running.get('kvBytesMoved', 0)} "
                                                 "KV bytes moved"))
        return self._end(running, "committed", None, ref, ports, now, layout={"stages": stages})

    def _end(self, running: Mapping[str, Any], outcome: str, error: str | None, ref: PipelineRef, ports: Ports,
             now: str, layout: Mapping[str, Any] | None) -> bool:
        seconds = max(0.0, time.time() - float(running.get("startedUnix") or time.time()))
        pause_ms = float(running.get("pauseMs") or 0.0) if outcome == "committed" else 0.0
        last = {"id": running["id"], "outcome": outcome, "pauseMs": pause_ms, "durationMs": round(seconds * 1e3, 1),
                "kvBytesMoved": int(running.get("kvBytesMoved") or 0), "from": running["from"], "to": running["to"],
                "started": running.get("started"), "finished": now, "reason": running.get("reason")}
        if error:
            last["error"] = error
        if running.get("lost"):
            last["lost"] = running["lost"]
            last["requestsReprefilled"] = int(running.get("requestsReprefilled") or 0)
        patch: dict[str, Any] = {"reconfiguration": None, "lastReconfiguration": last}
        lost_old = {int(sid) for sid in running.get("lost") or {}} & {s.stage_id for s in plan_of(running).old}
        if layout is None and lost_old:
            patch["phase"] = st.DEGRADED  # the old layout lost a stage: the pass restores it before moving again
        if layout is not None:
            new = layout_of(running["to"])
            patch |= {"layout": layout, "layoutSummary": layout_summary(new), "stageCount": len(new)}
        ports.patch_status(patch)
        ports.ended(outcome, seconds, pause_ms / 1e3)
        self.finished.pop(str(running["id"]), None)
        self.entered.pop(str(running["id"]), None)
        return True


def _layout_patch(plan: ReconfigPlan, ref: PipelineRef, observed: Observed) -> dict[str, Any]:
    """`status.layout` (with `layoutSummary`, `stageCount`) as the new layout, with the pods it has."""
    pods = {p.name: p for p in observed.pods}
    stages = []
    for s in plan.new:
        name = m.stage_pod_name(ref.name, s.stage_id)
        entry: dict[str, Any] = {"stageId": s.stage_id, "pool": s.pool, "layers": [s.start, s.end], "pod": name}
        if name in pods and pods[name].pod_ip:
            entry["podIP"] = pods[name].pod_ip
        stages.append(entry)
    return {"layout": {"stages": stages}, "layoutSummary": layout_summary(plan.new), "stageCount": len(plan.new)}


def _stage_ids(plan: ReconfigPlan) -> list[int]:
    return sorted({s.stage_id for s in plan.old} | {s.stage_id for s in plan.new})


def _frontend(observed: Observed) -> PodView | None:
    """The frontend pod to drive the change through: a Ready one, else one that runs (not Ready while a stage of
    its chain is dead, which is when a roll forward needs it)."""
    up = [p for p in observed.pods if p.role == m.ROLE_FRONTEND and p.pod_ip and not p.deleting and not p.finished]
    return next((p for p in up if p.ready), next((p for p in up if p.phase == "Running"), None))


def _frontend_url(pod: PodView) -> str:
    return f"http://{_host(pod.pod_ip or '')}:{m.FRONTEND_PORT}"


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip
