"""One level-triggered pass over an `LLMPipeline`: what exists → what to do and the status to write.

Pure: the caller observes the cluster (`Observed`), applies the returned actions in order and writes
the status. Running it again on the same observations yields the same actions, so a re-check, a
restart of the operator or a duplicate event never does anything twice. The order that matters:
the control-token Secret and the Service first, then one pod per stage, and the frontend only once
every stage pod is Ready with an IP, because the frontend is configured with those addresses.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeshift.api import Layout, StagePlan
from pipeshift.operator import manifests as m
from pipeshift.operator import status as st
from pipeshift.operator.spec import PipelineRef, PipelineSpec, SpecError, parse_spec
from pipeshift.operator.validation import validate_pipeline

NORMAL, WARNING = "Normal", "Warning"
# A new message under these reasons is news (another field is wrong, another scheduler verdict).
_MESSAGE_EVENTS = frozenset({"InvalidSpec", "Unschedulable", "ModelConfigUnavailable"})
_WARN_REASONS = frozenset({"InvalidSpec", "Unschedulable", "ModelConfigUnavailable", "AutoscalingNotAvailable"})
MAX_ERRORS = 10  # listed in the condition and Event; more are counted
NO_LAYOUT_MESSAGE = (
    "spec.layout is not set: this operator version serves pinned layouts only; the autoscaling loop that "
    "plans a layout from spec.policy arrives in a later version. Set spec.layout.stages to serve now."
)


@dataclass(frozen=True)
class PodView:
    """What the reconciler needs to know about one pod it owns."""

    name: str
    role: str | None
    stage_id: int | None
    phase: str
    pod_ip: str | None
    ready: bool
    deleting: bool
    spec_hash: str | None
    node: str | None = None
    unschedulable: str | None = None

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> PodView:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        lbls, notes = meta.get("labels") or {}, meta.get("annotations") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or []}
        scheduled = conditions.get("PodScheduled") or {}
        unschedulable = None
        if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
            unschedulable = str(scheduled.get("message") or "no node fits")
        stage = lbls.get(m.LABEL_STAGE)
        return cls(
            name=str(meta.get("name")),
            role=lbls.get(m.LABEL_ROLE),
            stage_id=int(stage) if isinstance(stage, str) and stage.isdigit() else None,
            phase=str(status.get("phase") or "Pending"),
            pod_ip=status.get("podIP") or None,
            ready=(conditions.get("Ready") or {}).get("status") == "True",
            deleting=meta.get("deletionTimestamp") is not None,
            spec_hash=notes.get(m.HASH_ANNOTATION),
            node=(pod.get("spec") or {}).get("nodeName"),
            unschedulable=unschedulable,
        )

    @property
    def finished(self) -> bool:
        return self.phase in ("Failed", "Succeeded")

    def serving(self, spec_hash: str | None) -> bool:
        return self.ready and bool(self.pod_ip) and not self.deleting and not self.finished \
            and self.spec_hash == spec_hash


@dataclass(frozen=True)
class Observed:
    """The pipeline's children as the API server reports them, plus what the spec refers to."""

    pods: tuple[PodView, ...] = ()
    secret: bool = False
    service: bool = False
    deployment: bool = False
    deployment_hash: str | None = None
    model_config: Mapping[str, Any] | None = None  # read from spec.model.configMapRef
    model_config_error: str | None = None  # why it could not be read
    policy: Mapping[str, Any] | None = None  # the AutoscalingPolicy spec.policy names, when found


@dataclass(frozen=True)
class Event:
    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class Create:
    manifest: Mapping[str, Any]
    event: Event | None = None

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def name(self) -> str:
        return str(self.manifest["metadata"]["name"])


@dataclass(frozen=True)
class Update:
    """Replace an object's spec (the frontend Deployment when the stage addresses change)."""

    manifest: Mapping[str, Any]
    event: Event | None = None

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def name(self) -> str:
        return str(self.manifest["metadata"]["name"])


@dataclass(frozen=True)
class Delete:
    kind: str
    name: str
    event: Event | None = None


Action = Create | Update | Delete


@dataclass
class Outcome:
    """`result` is invalid | unsupported | waiting | ready; `waiting` asks for a prompt re-check."""

    status: dict[str, Any]
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    result: str = "waiting"

    @property
    def recheck(self) -> bool:
        return self.result == "waiting"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def spec_problems(body: Mapping[str, Any], observed: Observed) -> tuple[PipelineSpec | None, list[str]]:
    """The typed spec, or None with every problem (field path first).

    `validate_pipeline` is the authority, given what the spec refers to (the policy, the ConfigMap's
    config.json); the parser only speaks when validation passed something it could not type.
    """
    raw = body.get("spec")
    policy = (observed.policy or {}).get("spec") if observed.policy is not None else None
    found = validate_pipeline(raw, name=str((body.get("metadata") or {}).get("name", "")),
                              policy=policy if isinstance(policy, Mapping) else None,
                              model_config=observed.model_config)
    if found:
        return None, list(dict.fromkeys(str(e) for e in found))
    try:
        return parse_spec(raw), []
    except SpecError as e:
        return None, e.errors


def reconcile(body: Mapping[str, Any], observed: Observed, *, now: str,
              make_token: Callable[[], str] = new_token) -> Outcome:
    ref = PipelineRef.from_body(body)
    previous = body.get("status") or {}
    spec_changed = previous.get("observedGeneration") != ref.generation
    spec, errors = spec_problems(body, observed)
    ctx = _Context(ref, previous, spec_changed, now)
    if spec is None:
        return ctx.finish(result="invalid", phase=st.FAILED,
                          ready=st.Condition(st.READY, False, "InvalidSpec", _summary(errors)))
    ctx.events += _policy_events(spec, observed, spec_changed)
    if spec.layout is None:
        return ctx.finish(result="unsupported", phase=st.PENDING,
                          ready=st.Condition(st.READY, False, "AutoscalingNotAvailable", NO_LAYOUT_MESSAGE))
    if spec.model.config_map is not None and observed.model_config is None:
        why = observed.model_config_error or "not read yet"
        return ctx.finish(result="waiting", phase=st.PENDING,
                          ready=st.Condition(st.READY, False, "ModelConfigUnavailable", why))
    return _serve_pinned(ctx, spec, spec.layout, observed, make_token)


def _summary(errors: Sequence[str]) -> str:
    more = len(errors) - MAX_ERRORS
    return "; ".join(errors[:MAX_ERRORS]) + (f" (and {more} more)" if more > 0 else "")


class _Context:
    """The parts of one pass every outcome shares: identity, previous status, the time, events."""

    def __init__(self, ref: PipelineRef, previous: Mapping[str, Any], spec_changed: bool, now: str) -> None:
        self.ref, self.previous, self.spec_changed, self.now = ref, previous, spec_changed, now
        self.events: list[Event] = []
        self.actions: list[Action] = []
        self.extra: dict[str, Any] = {}

    def finish(self, *, result: str, phase: str, ready: st.Condition,
               degraded: st.Condition | None = None) -> Outcome:
        degraded = degraded or st.Condition(st.DEGRADED, False, "AsExpected", "nothing that served has stopped")
        idle = st.Condition(st.RECONFIGURING, False, "Idle", "no reconfiguration in progress")
        conditions = [ready, idle, degraded]
        old = self.previous.get("conditions") or []
        self.events += _condition_events(st.changed(old, conditions, _MESSAGE_EVENTS), old)
        status: dict[str, Any] = {
            "phase": phase,
            "observedGeneration": self.ref.generation,
            "conditions": st.merge_conditions(old, conditions, self.now, self.ref.generation),
            "stageCount": 0,
            "layoutSummary": None,
            "layout": None,
            "frontend": None,
            "reconfiguration": None,
        }
        status.update(self.extra)
        return Outcome(status=status, actions=self.actions, events=self.events, result=result)


def _condition_events(news: Sequence[st.Condition], old: Sequence[Mapping[str, Any]]) -> list[Event]:
    was = {c.get("type"): c.get("status") for c in old if isinstance(c, Mapping)}
    out = []
    for c in news:
        if c.type == st.READY and c.status:
            out.append(Event(NORMAL, "Ready", c.message))
        elif (c.type == st.READY and c.reason in _WARN_REASONS) or (c.type == st.DEGRADED and c.status):
            out.append(Event(WARNING, c.reason, c.message))
        elif c.type == st.DEGRADED and was.get(st.DEGRADED) == "True":
            out.append(Event(NORMAL, "Recovered", "every stage and the frontend serve again"))
    return out


def _policy_events(spec: PipelineSpec, observed: Observed, spec_changed: bool) -> list[Event]:
    """A policy that does not exist (yet) is reported once per spec generation; with a pinned layout
    it is not needed to serve. (A policy that exists but is invalid makes the spec invalid.)"""
    if spec.policy is None or not spec_changed or observed.policy is not None:
        return []
    return [Event(WARNING, "PolicyNotFound", f"spec.policy: no AutoscalingPolicy {spec.policy!r} in this namespace "
                                             "(the pinned layout is served regardless)")]


def layout_summary(layout: Layout) -> str:
    """`a100:0-4,l40s:4-8`: the LAYOUT printer column."""
    return ",".join(f"{s.pool}:{s.start}-{s.end}" for s in layout)


def _serve_pinned(ctx: _Context, spec: PipelineSpec, layout: Layout, observed: Observed,
                  make_token: Callable[[], str]) -> Outcome:
    ref = ctx.ref
    if not observed.secret:
        ctx.actions.append(Create(m.control_token_secret(ref, make_token())))
    if not observed.service:
        ctx.actions.append(Create(m.frontend_service(ref)))
    wanted = {s.stage_id: m.stage_pod(ref, spec, s, spec.pool(s.pool)) for s in layout}
    hashes = {sid: pod["metadata"]["annotations"][m.HASH_ANNOTATION] for sid, pod in wanted.items()}
    stage_pods = [p for p in observed.pods if p.role == m.ROLE_STAGE]
    _retire_stage_pods(ctx, stage_pods, wanted, hashes)

    by_name = {p.name: p for p in stage_pods}
    serving: dict[int, PodView] = {}
    waiting: list[str] = []
    unschedulable: list[str] = []
    for stage in layout:
        name = m.stage_pod_name(ref.name, stage.stage_id)
        pod = by_name.get(name)
        if pod is None:
            ctx.actions.append(Create(wanted[stage.stage_id], Event(
                NORMAL, "CreatedStagePod",
                f"stage {stage.stage_id} (pool {stage.pool}, layers [{stage.start}, {stage.end})): pod {name}")))
            waiting.append(f"stage {stage.stage_id} (creating {name})")
        elif pod.serving(hashes[stage.stage_id]):
            serving[stage.stage_id] = pod
        else:
            waiting.append(f"stage {stage.stage_id} ({_pod_state(pod)})")
            if pod.unschedulable and not pod.deleting:
                unschedulable.append(f"stage {stage.stage_id} (pool {stage.pool}): {pod.unschedulable}")

    frontend_pod, frontend_hash = None, None
    if len(serving) == len(layout):
        addresses = [m.stage_address(str(serving[s.stage_id].pod_ip)) for s in layout]
        deployment = m.frontend_deployment(ref, spec, addresses)
        frontend_hash = deployment["metadata"]["annotations"][m.HASH_ANNOTATION]
        if not observed.deployment:
            ctx.actions.append(Create(deployment, Event(NORMAL, "CreatedFrontend",
                                                        f"frontend with stages {','.join(addresses)}")))
        elif observed.deployment_hash != frontend_hash:
            ctx.actions.append(Update(deployment, Event(NORMAL, "UpdatedFrontend",
                                                        f"frontend re-pointed at stages {','.join(addresses)}")))
        frontend_pod = next((p for p in observed.pods if p.role == m.ROLE_FRONTEND and p.serving(frontend_hash)),
                            None)

    ctx.extra = {
        "stageCount": len(serving),
        "layoutSummary": layout_summary(layout),
        "layout": {"stages": [_stage_status(ref, s, serving.get(s.stage_id)) for s in layout]},
        "frontend": _frontend_status(frontend_pod),
    }
    is_serving = frontend_pod is not None
    phase = st.next_phase(invalid=False, serving=is_serving, previous_phase=ctx.previous.get("phase"),
                          spec_changed=ctx.spec_changed)
    if is_serving:
        assert frontend_pod is not None
        ready = st.Condition(st.READY, True, "Serving",
                             f"{len(layout)} stages ({layout_summary(layout)}); frontend at {_url(frontend_pod)}")
    elif unschedulable:
        ready = st.Condition(st.READY, False, "Unschedulable", "; ".join(unschedulable))
    elif waiting:
        ready = st.Condition(st.READY, False, "StagesStarting",
                             f"{len(serving)}/{len(layout)} stage pods Ready; waiting for " + ", ".join(waiting))
    else:
        ready = st.Condition(st.READY, False, "FrontendStarting",
                             f"every stage is Ready; waiting for the frontend pod of {m.frontend_name(ref.name)}")
    degraded = None
    if phase == st.DEGRADED:
        lost = "a stage" if waiting else "the frontend"
        degraded = st.Condition(st.DEGRADED, True, "StageLost" if waiting else "FrontendLost",
                                f"{lost} stopped serving: {ready.message}")
    return ctx.finish(result="ready" if is_serving else "waiting", phase=phase, ready=ready, degraded=degraded)


def _retire_stage_pods(ctx: _Context, pods: Sequence[PodView], wanted: Mapping[int, Mapping[str, Any]],
                       hashes: Mapping[int, str]) -> None:
    """Delete stage pods that left the layout, that no longer match the spec, or whose agent exited
    (`restartPolicy: Never`); a replacement is created once the old pod is gone (same name)."""
    for pod in pods:
        if pod.deleting:
            continue
        if pod.stage_id not in wanted or wanted[pod.stage_id]["metadata"]["name"] != pod.name:
            why, kind = "the stage left spec.layout", NORMAL
        elif pod.spec_hash != hashes[pod.stage_id]:
            why, kind = "spec changed (restart; live changes arrive with the autoscaling loop)", NORMAL
        elif pod.finished:
            why, kind = f"its agent exited ({pod.phase}); it is replaced", WARNING
        else:
            continue
        ctx.actions.append(Delete("Pod", pod.name, Event(kind, "DeletedStagePod", f"pod {pod.name}: {why}")))


def _pod_state(pod: PodView) -> str:
    if pod.deleting:
        return f"{pod.name} terminating"
    if pod.finished:
        return f"{pod.name} {pod.phase}"
    if pod.unschedulable:
        return f"{pod.name} unschedulable"
    if not pod.node:
        return f"{pod.name} not scheduled yet"
    if not pod.pod_ip:
        return f"{pod.name} on {pod.node}, no IP yet"
    return f"{pod.name} on {pod.node}, not Ready"


def _stage_status(ref: PipelineRef, stage: StagePlan, pod: PodView | None) -> dict[str, Any]:
    out: dict[str, Any] = {"stageId": stage.stage_id, "pool": stage.pool, "layers": [stage.start, stage.end],
                           "pod": m.stage_pod_name(ref.name, stage.stage_id)}
    if pod is not None and pod.pod_ip:
        out["podIP"] = pod.pod_ip
    return out


def _url(pod: PodView) -> str:
    host = f"[{pod.pod_ip}]" if pod.pod_ip and ":" in pod.pod_ip else pod.pod_ip
    return f"http://{host}:{m.FRONTEND_PORT}"


def _frontend_status(pod: PodView | None) -> dict[str, Any] | None:
    if pod is None:
        return None
    return {"pod": pod.name, "podIP": pod.pod_ip, "url": _url(pod)}
