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

Fault hook: `PIPESHIFT_OPERATOR_FAULT=<phase>` makes the process exit (status 3) right after writing that
phase to status, to test the resume and roll-back paths deterministically.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeshift.api import Layout, ReconfigPlan, StagePlan, plan_moves
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

logger = logging.getLogger(__name__)

PHASES = ("starting", "preparing", "precopying", "arming", "committing", "retiring", "cleaning")
ROLLING_BACK = "rollingBack"
COMMIT_INDEX = PHASES.index("committing")
FAULT_ENV = "PIPESHIFT_OPERATOR_FAULT"
FAULT_EXIT = 3
# New stage pods that are not Ready this long after the change started (unschedulable, crash-looping) roll it back.
STARTING_TIMEOUT_S = 600.0


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
    if phase not in PHASES:
        raise ValueError(f"status.reconfiguration.phase: unknown phase {phase!r}")
    if finished_here:
        return "advance"
    if PHASES.index(phase) < COMMIT_INDEX and not entered_here:
        return "rollback"
    return "repeat"


@dataclass
class Ports:
    """What the driver needs from the outside: the adapter calls, Events, metrics (bound by handlers)."""

    apply: Callable[[Create | Delete], bool]
    patch_status: Callable[[Mapping[str, Any]], None]
    annotate_frontend: Callable[[Mapping[str, str]], None]
    token: Callable[[], str | None]
    post: Callable[[Event], None]
    ended: Callable[[str, float, float], None]  # outcome, seconds, pause seconds


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
        step = next_step(phase, self.finished.get(rid) == phase, self.entered.get(rid) == phase)
        if step == "rollback":
            return self._rollback(running, ref, observed, ports, now)
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
                return True
            waited = time.time() - float(running.get("startedUnix") or time.time())
            if waited > STARTING_TIMEOUT_S:
                raise RuntimeError(f"the new stage pods were not Ready after {waited:.0f} s")
            return False
        stepper = self._stepper(running, plan, ref, observed, ports)
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

    def _stepper(self, running: Mapping[str, Any], plan: ReconfigPlan, ref: PipelineRef, observed: Observed,
                 ports: Ports) -> Stepper:
        pods = {p.name: p for p in observed.pods if not p.deleting}
        agents: dict[int, str] = {}
        for sid in sorted({s.stage_id for s in plan.old} | {s.stage_id for s in plan.new}):
            pod = pods.get(m.stage_pod_name(ref.name, sid))
            if pod is None or not pod.pod_ip:
                raise RuntimeError(f"stage {sid}: pod {m.stage_pod_name(ref.name, sid)} has no IP")
            agents[sid] = f"http://{m.stage_address(pod.pod_ip)}"
        frontend = _frontend(observed)
        if frontend is None:
            raise RuntimeError("no running frontend pod to drive the change through")
        epoch = running.get("epoch")
        return Stepper(f"http://{_host(frontend.pod_ip or '')}:{m.FRONTEND_PORT}", agents, plan, str(running["id"]),
                       token=ports.token(), budget=self.budget, epoch=None if epoch is None else int(epoch),
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
        try:
            problems = self._stepper(running, plan, ref, observed, ports).abort()
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

    def _done(self, running: dict[str, Any], ref: PipelineRef, observed: Observed, ports: Ports, now: str) -> bool:
        plan = plan_of(running)
        pods = {p.name: p for p in observed.pods}
        stages = []
        for s in plan.new:
            name = m.stage_pod_name(ref.name, s.stage_id)
            entry: dict[str, Any] = {"stageId": s.stage_id, "pool": s.pool, "layers": [s.start, s.end], "pod": name}
            if name in pods and pods[name].pod_ip:
                entry["podIP"] = pods[name].pod_ip
            stages.append(entry)
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
        patch: dict[str, Any] = {"reconfiguration": None, "lastReconfiguration": last}
        if layout is not None:
            new = layout_of(running["to"])
            patch |= {"layout": layout, "layoutSummary": layout_summary(new), "stageCount": len(new)}
        ports.patch_status(patch)
        ports.ended(outcome, seconds, pause_ms / 1e3)
        self.finished.pop(str(running["id"]), None)
        self.entered.pop(str(running["id"]), None)
        return True


def _frontend(observed: Observed) -> PodView | None:
    return next((p for p in observed.pods if p.role == m.ROLE_FRONTEND and p.ready and p.pod_ip and not p.deleting
                 and not p.finished), None)


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip
