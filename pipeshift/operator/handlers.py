"""The kopf side: which cluster events start a reconcile pass, and the settings the operator runs with.

Handlers are thin and synchronous (kopf runs them in worker threads): each fetches the pipeline
fresh and runs the same level-triggered pass (`PipelineOperator.reconcile`), so it does not matter
which trigger fired — a spec change, the operator starting (resume), a pod of the pipeline changing,
or the periodic re-check. A per-pipeline lock keeps two triggers from interleaving their actions.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
from collections.abc import Mapping
from typing import Any

import kopf

from pipeshift.operator import manifests as m
from pipeshift.operator import status as st
from pipeshift.operator.autoscale import AutoscaleLoop
from pipeshift.operator.change import ChangeDriver, Ports
from pipeshift.operator.kube import Kube
from pipeshift.operator.lifecycle import before_reconcile
from pipeshift.operator.metrics import OperatorMetrics
from pipeshift.operator.reconcile import (
    NORMAL,
    WARNING,
    Action,
    Create,
    Delete,
    Event,
    Observed,
    Outcome,
    current_layout,
    reconcile,
)
from pipeshift.operator.spec import GROUP, PLURAL, POLICY_PLURAL, VERSION, PipelineRef, SpecError, parse_spec
from pipeshift.operator.validation import validate_policy

logger = logging.getLogger(__name__)

FINALIZER = "pipeshift.dev/cleanup"
EVENT_PREFIX = "pipeshift-"


class PipelineOperator:
    """The domain code bound to one API adapter, the metrics, and a lock per pipeline."""

    # Passes run back to back while a live change advances (one phase each), at most this many per trigger.
    MAX_CHAINED_PASSES = 40

    def __init__(self, kube: Kube, metrics: OperatorMetrics, changes: ChangeDriver | None = None,
                 prometheus_url: str | None = None) -> None:
        self.kube, self.metrics = kube, metrics
        self.changes = changes or ChangeDriver()
        self.autoscale = AutoscaleLoop(prometheus_url, decided=lambda kind: metrics.decisions.inc(kind=kind))
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def post(self, body: Mapping[str, Any], event: Event) -> None:
        kopf.event(dict(body), type=event.type, reason=event.reason, message=event.message)
        self.metrics.events.inc(type=event.type, reason=event.reason)

    def reconcile(self, namespace: str, name: str) -> Outcome | None:
        """One pass over the pipeline as it is now; None when it is gone or being deleted."""
        with self._lock(namespace, name):
            try:
                for _ in range(self.MAX_CHAINED_PASSES):
                    outcome, again = self._pass(namespace, name)
                    if not again:
                        return outcome
                return outcome
            except Exception:
                self.metrics.reconciles.inc(outcome="error")
                raise

    def _pass(self, namespace: str, name: str) -> tuple[Outcome | None, bool]:
        """One pass, then one step of a live change when there is one; True: run the next pass at once."""
        found = self._reconcile(namespace, name)
        if found is None:
            return None, False
        outcome, body, observed = found
        if outcome.change is None or outcome.result == "invalid":
            return outcome, False
        ref = PipelineRef.from_body(body)
        ports = Ports(
            apply=lambda action: self._apply(namespace, action),
            patch_status=lambda patch: self.kube.patch_status(PLURAL, namespace, name, patch),
            annotate_frontend=lambda notes: self.kube.annotate_deployment(namespace, m.frontend_name(name), notes),
            token=lambda: self.kube.control_token(namespace, name),
            post=lambda event: self.post(body, event),
            ended=self._ended,
        )
        reason = self.autoscale.reason(f"{namespace}/{name}") if not body["spec"].get("layout") else None
        again = self.changes.advance(ref, parse_spec(body["spec"]), observed, outcome.change, ports, st.utcnow(),
                                     reason=reason or "spec.layout changed")
        return outcome, again

    def _autoscaled(self, body: dict[str, Any], observed: Observed) -> Observed:
        """Without spec.layout: the layout the policy wants (`autoscale`), seen by the pass as its target; before
        anything served, the pools' allocatable GPUs, for the pass to plan the first layout over."""
        raw = body.get("spec")
        if not isinstance(raw, Mapping) or raw.get("layout") is not None:
            return observed
        try:
            spec = parse_spec(raw)
        except SpecError:
            return observed  # the pass reports it
        if current_layout(body.get("status") or {}) is None:  # the pass plans a first layout over these GPUs
            try:
                observed = dataclasses.replace(observed, pool_gpus={p.name: self.kube.node_gpus(p.node_selector)
                                                                    for p in spec.pools})
            except Exception as error:  # the pass says the capacity is unknown; the next one reads again
                logger.warning("%s: cannot read the Nodes of spec.pools: %s", body["metadata"]["name"], error)
        policy = (observed.policy or {}).get("spec") if observed.policy is not None else spec.inline_policy
        key = f"{body['metadata']['namespace']}/{body['metadata']['name']}"
        try:
            layout, events = self.autoscale.desired(key, body, spec, policy if isinstance(policy, Mapping) else None,
                                                    observed, self.kube.node_gpus)
        except Exception as error:  # a policy the planner cannot use: hold, say why, try again next pass
            logger.warning("%s: autoscaling holds: %s", key, error)
            return observed
        for event in events:
            self.post(body, event)
        return dataclasses.replace(observed, autoscale_layout=layout) if layout is not None else observed

    def _ended(self, outcome: str, seconds: float, pause_s: float) -> None:
        self.metrics.reconfigurations.inc(outcome=outcome)
        self.metrics.reconfig_seconds.inc(seconds, outcome=outcome)
        if outcome == "committed":
            self.metrics.pause_seconds.inc(pause_s)

    def _apply(self, namespace: str, action: Action) -> bool:
        """Carry out one action and count what it created or deleted; False: it was already done."""
        if not self.kube.apply(namespace, action):
            return False
        if isinstance(action, Create):
            role = (action.manifest["metadata"].get("labels") or {}).get(m.LABEL_ROLE, "")
            self.metrics.created.inc(kind=action.kind, role=role)
        elif isinstance(action, Delete):
            self.metrics.deleted.inc(kind=action.kind)
        return True

    def _reconcile(self, namespace: str, name: str) -> tuple[Outcome, dict[str, Any], Observed] | None:
        body = self.kube.get_pipeline(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        observed = self._autoscaled(body, self.kube.observe(body))
        body, observed, at_zero = before_reconcile(self, body, observed)  # restore, scale to zero (lifecycle.py)
        if at_zero:
            return None
        outcome = reconcile(body, observed, now=st.utcnow())
        for action in outcome.actions:
            if not self._apply(namespace, action):
                continue
            logger.info("%s/%s: %s %s/%s", namespace, name, type(action).__name__.lower(), action.kind, action.name)
            if action.event is not None:
                self.post(body, action.event)
        previous = body.get("status") or {}
        if any(previous.get(k) != v for k, v in outcome.status.items()):
            self.kube.patch_status(PLURAL, namespace, name, outcome.status)
            if previous.get("phase") != outcome.status["phase"]:
                logger.info("%s/%s: phase %s -> %s (reconfiguration %s)", namespace, name, previous.get("phase"),
                            outcome.status["phase"], (previous.get("reconfiguration") or {}).get("id"))
        for event in outcome.events:
            self.post(body, event)
        self.metrics.reconciles.inc(outcome=outcome.result)
        logger.debug("%s/%s: %s (%d actions)", namespace, name, outcome.result, len(outcome.actions))
        return outcome, body, observed

    def delete(self, body: Mapping[str, Any]) -> None:
        """Remove every child explicitly, so cleanup does not depend on a garbage collector."""
        meta = body["metadata"]
        with self._lock(meta["namespace"], meta["name"]):
            gone = self.kube.delete_children(meta["namespace"], meta["name"])
        for item in gone:
            self.metrics.deleted.inc(kind=item.split("/", 1)[0])
        if gone:
            self.post(body, Event(NORMAL, "Deleted", "removed " + ", ".join(gone)))

    def check_policy(self, body: Mapping[str, Any]) -> None:
        """An AutoscalingPolicy's `Valid` condition, with the field path of every problem."""
        meta = body["metadata"]
        problems = [str(p) for p in validate_policy(body.get("spec") or {}, name=meta["name"])]
        condition = (st.Condition(st.VALID, False, "InvalidPolicy", "; ".join(problems)) if problems
                     else st.Condition(st.VALID, True, "Valid", "the policy passes validation"))
        previous = body.get("status") or {}
        old = previous.get("conditions") or []
        generation = int(meta.get("generation") or 1)
        news = st.changed(old, [condition], frozenset({"InvalidPolicy"}))
        if not news and previous.get("observedGeneration") == generation:
            return
        conditions = st.merge_conditions(old, [condition], st.utcnow(), generation)
        self.kube.patch_status(POLICY_PLURAL, meta["namespace"], meta["name"],
                               {"conditions": conditions, "observedGeneration": generation})
        if news:
            self.post(body, Event(WARNING, "InvalidPolicy", condition.message) if problems
                      else Event(NORMAL, "ValidPolicy", condition.message))


def settings(posting_instance: str | None = None) -> kopf.OperatorSettings:
    """Annotations under our own prefix, a finalizer named after us, no cluster scanning (least RBAC:
    the operator never needs to list CRDs or namespaces), and Events that say who posted them.

    kopf keeps the finalizer until the object's timers have exited and, for a re-check pass still running
    when the delete arrives, looks again only after `cancellation_polling` (60 s by default): a delete
    overlapping a pass held `kubectl delete` for a minute. A pass is short, so look again every second."""
    s = kopf.OperatorSettings()
    s.persistence.finalizer = FINALIZER
    s.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    s.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP,
                                                                      key="last-handled-configuration")
    s.scanning.disabled = True
    s.posting.reporting_component = "pipeshift-operator"
    s.posting.reporting_instance = posting_instance or socket.gethostname()
    s.posting.event_name_prefix = EVENT_PREFIX
    s.execution.max_workers = 8
    s.background.cancellation_polling = 1.0
    return s


def build_registry(op: PipelineOperator, recheck_seconds: float) -> kopf.OperatorRegistry:
    """A registry of its own (nothing registered at import time), so tests can build several."""
    registry = kopf.OperatorRegistry()
    pipelines = (GROUP, VERSION, PLURAL)

    @kopf.on.login(registry=registry, id="login")
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.resume(*pipelines, registry=registry, id="reconcile", backoff=5)
    @kopf.on.create(*pipelines, registry=registry, id="reconcile", backoff=5)
    @kopf.on.update(*pipelines, registry=registry, id="reconcile", backoff=5)
    def changed(namespace: str, name: str, **_: Any) -> None:
        op.reconcile(namespace, name)

    @kopf.on.delete(*pipelines, registry=registry, id="cleanup", backoff=5)
    def deleted(body: kopf.Body, **_: Any) -> None:
        op.delete(body)

    @kopf.timer(*pipelines, registry=registry, id="recheck", interval=recheck_seconds, backoff=5)
    def recheck(namespace: str, name: str, **_: Any) -> None:
        op.reconcile(namespace, name)

    @kopf.on.event("", "v1", "pods", labels={m.MANAGED_BY: m.MANAGER}, registry=registry, id="pods")
    def pod_changed(namespace: str, labels: Mapping[str, str], **_: Any) -> None:
        pipeline = labels.get(m.LABEL_PIPELINE)
        if pipeline:
            op.reconcile(namespace, pipeline)

    @kopf.on.event(GROUP, VERSION, POLICY_PLURAL, registry=registry, id="policies")
    def policy_changed(type: str | None, body: kopf.Body, **_: Any) -> None:
        if type != "DELETED":
            op.check_policy(body)

    return registry
