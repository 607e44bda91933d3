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
from pipeshift.operator.initial import NotPlanned, first_layout, kept
from pipeshift.operator.spec import PipelineRef, PipelineSpec, SpecError, parse_spec
from pipeshift.operator.validation import validate_pipeline

NORMAL, WARNING = "Normal", "Warning"
# A new message under these reasons is news (another field is wrong, another scheduler verdict).
_MESSAGE_EVENTS = frozenset({"InvalidSpec", "Unschedulable", "ModelConfigUnavailable"})
_WARN_REASONS = frozenset({"InvalidSpec", "Unschedulable", "ModelConfigUnavailable", "PolicyNotFound"})
MAX_ERRORS = 10  # listed in the condition and Event; more are counted


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
    layers: tuple[int, int] | None = None  # the range the pod was created with (a live change may move it)

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
        created = str(notes.get(m.LAYERS_ANNOTATION) or "").split(":")
        layers = (int(created[0]), int(created[1])) if len(created) == 2 and all(x.isdigit() for x in created) \
            else None
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
            layers=layers,
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
    # The frontend Deployment's stage list as its pod template has it, and as the running frontend uses it
    # (annotation `STAGES_ANNOTATION`: a live change re-wires the frontend without touching the template).
    deployment_template_stages: tuple[str, ...] | None = None
    deployment_stages: str | None = None
    # The layout the policy wants when spec.layout is not set (None: keep the current one).
    autoscale_layout: Layout | None = None
    # Allocatable `nvidia.com/gpu` per pool of spec.pools (its nodeSelector's Nodes), read when a first layout
    # is to be planned (no spec.layout, nothing served yet); None when not read.
    pool_gpus: Mapping[str, int] | None = None


@dataclass(frozen=True)
class Event:
    type: str
    reason: str
    message: str


class _Manifested:
    """An action that writes a whole manifest: its kind and name are the manifest's."""

    manifest: Mapping[str, Any]

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def name(self) -> str:
        return str(self.manifest["metadata"]["name"])


@dataclass(frozen=True)
class Create(_Manifested):
    manifest: Mapping[str, Any]
    event: Event | None = None


@dataclass(frozen=True)
class Update(_Manifested):
    """Replace an object's spec (the frontend Deployment when the stage addresses change)."""

    manifest: Mapping[str, Any]
    event: Event | None = None


@dataclass(frozen=True)
class Delete:
    kind: str
    name: str
    event: Event | None = None


Action = Create | Update | Delete


@dataclass(frozen=True)
class ChangeRequest:
    """`current`: the layout serving now (the stage ids of status.layout); `desired`: where to go (stage ids
    not yet assigned); `running`: status.reconfiguration when a change is under way."""

    current: Layout
    desired: Layout
    running: Mapping[str, Any] | None = None


STAGES_ANNOTATION = "pipeshift.dev/stages"  # on the frontend Deployment: the stages the running frontend uses
_SERVED_PHASES = (st.READY, st.RECONFIGURING, st.DEGRADED)


def current_layout(previous: Mapping[str, Any]) -> Layout | None:
    """The layout the pipeline served at the last pass (status.layout, with the stage ids a live change
    assigned), or None when it was not serving."""
    if previous.get("phase") not in _SERVED_PHASES and not previous.get("reconfiguration"):
        return None
    try:
        stages = (previous.get("layout") or {})["stages"]
        return Layout(tuple(StagePlan(int(s["stageId"]), str(s["pool"]), int(s["layers"][0]), int(s["layers"][1]))
                            for s in stages))
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def same_shape(a: Layout, b: Layout) -> bool:
    """The same pools and ranges in the same order (stage ids aside)."""
    return [(s.pool, s.start, s.end) for s in a] == [(s.pool, s.start, s.end) for s in b]


@dataclass
class Outcome:
    """`result` is invalid | waiting | ready; `waiting` asks for a prompt re-check.

    `change`: a live change to drive (`change.py`): the one in `status.reconfiguration`, or a new one to
    `desired` (the pipeline serves `current`, whose ranges differ from it); None when there is nothing to move."""

    status: dict[str, Any]
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    result: str = "waiting"
    change: ChangeRequest | None = None

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
    current = current_layout(previous)
    desired = spec.layout or observed.autoscale_layout or current
    ctx.events += _policy_events(spec, observed, spec_changed)
    if spec.model.config_map is not None and observed.model_config is None:
        why = observed.model_config_error or "not read yet"
        return ctx.finish(result="waiting", phase=st.PENDING,
                          ready=st.Condition(st.READY, False, "ModelConfigUnavailable", why))
    if desired is None:
        first = _first_layout(ctx, spec, observed)
        if isinstance(first, NotPlanned):
            ctx.events = [e for e in ctx.events if e.reason != first.reason]  # the condition says it, once
            return ctx.finish(result="waiting", phase=st.PENDING,
                              ready=st.Condition(st.READY, False, first.reason, first.message))
        desired = first
    if current is not None and current.num_layers != desired.num_layers:
        current = None  # another model: nothing can move live
    running = previous.get("reconfiguration")
    if current is not None and isinstance(running, Mapping) and running.get("id"):
        out = _serve_pinned(ctx, spec, current, observed, make_token, running=running, live=True)
        out.change = ChangeRequest(current, desired, running)
        return out
    if current is not None and not same_shape(current, desired):
        out = _serve_pinned(ctx, spec, current, observed, make_token, live=True)
        if out.result == "ready":  # a live change starts from a pipeline that serves
            out.change = ChangeRequest(current, desired)
            return out
        if ctx.previous.get("phase") == st.DEGRADED:
            return out  # restore what served first
        ctx = _Context(ref, previous, spec_changed, now)
    if current is not None and same_shape(current, desired):
        return _serve_pinned(ctx, spec, current, observed, make_token, live=True)
    return _serve_pinned(ctx, spec, desired, observed, make_token)


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
               degraded: st.Condition | None = None, reconfiguring: st.Condition | None = None) -> Outcome:
        degraded = degraded or st.Condition(st.DEGRADED, False, "AsExpected", "nothing that served has stopped")
        idle = reconfiguring or st.Condition(st.RECONFIGURING, False, "Idle", "no reconfiguration in progress")
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
    """A policy that does not exist (yet) is reported once per spec generation; with a pinned layout, or one
    that served, it is not needed to serve. (A policy that exists but is invalid makes the spec invalid; one
    missing where it must plan the first layout is the Ready condition's reason instead.)"""
    if spec.policy is None or not spec_changed or observed.policy is not None:
        return []
    served = "the pinned layout" if spec.layout is not None else "the layout that served"
    return [Event(WARNING, "PolicyNotFound", f"spec.policy: no AutoscalingPolicy {spec.policy!r} in this namespace "
                                             f"({served} is served regardless)")]


def _first_layout(ctx: _Context, spec: PipelineSpec, observed: Observed) -> Layout | NotPlanned:
    """Without spec.layout and before anything served: the layout a previous pass started, else the one the
    policy plans now (`initial.py`), announced once by an `InitialLayout` Event."""
    config = dict(spec.model.config or observed.model_config or {})
    started = kept(ctx.previous, spec, int(config.get("num_hidden_layers") or 0), observed.pool_gpus)
    if started is not None:
        return started
    policy = (observed.policy or {}).get("spec") if spec.policy is not None else spec.inline_policy
    first = first_layout(ctx.ref.name, spec, policy if isinstance(policy, Mapping) else None, config,
                         observed.pool_gpus)
    if isinstance(first, NotPlanned):
        return first
    ctx.events.append(Event(NORMAL, "InitialLayout",
                            f"no spec.layout: starting {layout_summary(first.layout)}, planned by {first.why}"))
    return first.layout


def layout_summary(layout: Layout) -> str:
    """`a100:0-4,l40s:4-8`: the LAYOUT printer column."""
    return ",".join(f"{s.pool}:{s.start}-{s.end}" for s in layout)


def _expected_hash(ref: PipelineRef, spec: PipelineSpec, stage: StagePlan, pod: PodView | None, live: bool) -> str:
    """The digest a stage pod should carry. `live`: `stage` is from the layout that served (status), where a
    live change may have moved the pod's layers without recreating it, so the digest is built with the range
    the pod was *created* with (only a change of anything else means a restart)."""
    if live and pod is not None and pod.layers is not None:
        stage = StagePlan(stage.stage_id, stage.pool, pod.layers[0], pod.layers[1])
    made = m.stage_pod(ref, spec, stage, spec.pool(stage.pool))
    return str(made["metadata"]["annotations"][m.HASH_ANNOTATION])


def _serve_pinned(ctx: _Context, spec: PipelineSpec, layout: Layout, observed: Observed,
                  make_token: Callable[[], str], running: Mapping[str, Any] | None = None,
                  live: bool = False) -> Outcome:
    """Serve `layout` (`live`: the layout that served, see `_expected_hash`); with `running` (a live change
    under way) its new stage pods are kept and the frontend is left alone (the change re-wires it)."""
    ref = ctx.ref
    if not observed.secret:
        ctx.actions.append(Create(m.control_token_secret(ref, make_token())))
    if not observed.service:
        ctx.actions.append(Create(m.frontend_service(ref)))
    wanted = {s.stage_id: m.stage_pod(ref, spec, s, spec.pool(s.pool)) for s in layout}
    stage_pods = [p for p in observed.pods if p.role == m.ROLE_STAGE]
    by_name = {p.name: p for p in stage_pods}
    hashes = {s.stage_id: _expected_hash(ref, spec, s, by_name.get(m.stage_pod_name(ref.name, s.stage_id)), live)
              for s in layout}
    keep = {m.stage_pod_name(ref.name, int(s["stageId"])) for s in ((running or {}).get("to") or {}).get("stages", [])
            if isinstance(s, Mapping) and "stageId" in s}
    _retire_stage_pods(ctx, [p for p in stage_pods if p.name not in keep], wanted, hashes)

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
        deployment["metadata"]["annotations"][STAGES_ANNOTATION] = ",".join(addresses)
        frontend_hash = deployment["metadata"]["annotations"][m.HASH_ANNOTATION]
        rewired = _rewired_hash(ref, spec, observed, addresses)
        if rewired is not None:
            frontend_hash = rewired  # a live change re-wired the running frontend: its template stays
        elif not observed.deployment:
            ctx.actions.append(Create(deployment, Event(NORMAL, "CreatedFrontend",
                                                        f"frontend with stages {','.join(addresses)}")))
        elif observed.deployment_hash != frontend_hash and running is None:
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
    reconfiguring = None
    if running is not None:
        ctx.extra["reconfiguration"] = dict(running)
        reconfiguring = st.Condition(st.RECONFIGURING, True, _camel(str(running.get("phase") or "starting")),
                                     f"live change {running.get('id')} to {running.get('toSummary', '?')}: "
                                     f"{running.get('phase')}")
        if phase != st.DEGRADED:
            phase = st.RECONFIGURING
    return ctx.finish(result="ready" if is_serving else "waiting", phase=phase, ready=ready, degraded=degraded,
                      reconfiguring=reconfiguring)


def _camel(phase: str) -> str:
    """A condition reason from a phase name (`rolling_back` → `RollingBack`)."""
    return "".join(part[:1].upper() + part[1:] for part in phase.replace("-", "_").split("_"))


def _rewired_hash(ref: PipelineRef, spec: PipelineSpec, observed: Observed, addresses: Sequence[str]) -> str | None:
    """The template digest of a Deployment whose running frontend a live change pointed at `addresses`
    (annotation) while its pod template kept the stages it was created with; None when that is not the case
    (no Deployment, other stages, or the template is stale in anything else: then it is updated)."""
    if not observed.deployment or observed.deployment_stages != ",".join(addresses) \
            or not observed.deployment_template_stages:
        return None
    made = m.frontend_deployment(ref, spec, list(observed.deployment_template_stages))
    digest = str(made["metadata"]["annotations"][m.HASH_ANNOTATION])
    return digest if digest == observed.deployment_hash else None


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
