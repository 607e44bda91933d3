"""What runs before each reconcile pass: keeping the autoscaling loop's memory in status (`autoscale`), restoring
replaced stages onto the running frontend (`restore`), and scaling to zero and back (`zero`). Kept out of the pass
itself, which stays pure, and out of the kopf handlers, which stay thin: the handler calls `before_reconcile` and
skips the pass when told to.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pipeshift.operator import status as st
from pipeshift.operator import zero as z
from pipeshift.operator.reconcile import NORMAL, WARNING, Event, Observed
from pipeshift.operator.restore import plan_restore, restore, restore_status, summary
from pipeshift.operator.spec import PLURAL

if TYPE_CHECKING:
    from pipeshift.operator.handlers import PipelineOperator

logger = logging.getLogger(__name__)


def before_reconcile(op: PipelineOperator, body: dict[str, Any],
                     observed: Observed) -> tuple[dict[str, Any], Observed, bool]:
    """(body, observed, skip): what the pass should see, and whether it must not run (at zero)."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    status = body.get("status") or {}
    remembered = op.autoscale.status_patch(f"{ns}/{name}", status)
    if remembered is not None:  # the stabilization windows and target, for the next operator process
        op.kube.patch_status(PLURAL, ns, name, remembered)
        status = {**status, **remembered}
        body = {**body, "status": status}
    waking = isinstance(status.get(z.STATUS_KEY), Mapping) and "demandAt" in status[z.STATUS_KEY]
    plan = plan_restore(status, observed, attach=waking)
    if plan is not None:
        result = restore(op.kube, ns, name, plan)
        now = st.utcnow()
        extra: dict[str, Any] = {"lastRestore": restore_status(plan, result, now)}
        cold = z.cold_start_seconds(status, time.time()) if waking else None
        if cold is not None:
            extra.update({"coldStartSeconds": cold, z.STATUS_KEY: None})
            op.metrics.cold_starts.inc()
            op.metrics.cold_start_seconds.inc(cold)
            op.metrics.reprefilled.inc(result.requests_reprefilled, cause="cold_start")
            event = Event(NORMAL, "ColdStart", f"stages attached {cold:.1f}s after demand was seen at zero; "
                                               f"{result.requests_reprefilled} requests re-prefilled")
        else:
            extra.update({"requestsReprefilled": result.requests_reprefilled,
                          "tokensRecomputed": result.tokens_recomputed})
            op.metrics.restores.inc()
            op.metrics.reprefilled.inc(result.requests_reprefilled, cause="stage_restored")
            event = Event(NORMAL, "RestoredStage", summary(plan, result))
        op.kube.patch_status(PLURAL, ns, name, extra)
        op.post(body, event)
        logger.info("%s/%s: %s", ns, name, event.message)
        fresh = op.kube.get_pipeline(ns, name) or body
        return fresh, op.kube.observe(fresh), False
    return _zero(op, body, observed)


def _zero(op: PipelineOperator, body: dict[str, Any],
          observed: Observed) -> tuple[dict[str, Any], Observed, bool]:
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    status = body.get("status") or {}
    spec = body.get("spec") if isinstance(body.get("spec"), Mapping) else {}
    settings = z.settings(spec, (observed.policy or {}).get("spec") if observed.policy else None)
    at_zero = status.get("phase") == st.SCALED_TO_ZERO
    if not at_zero and (settings is None or status.get("phase") != st.READY):
        return body, observed, False
    url = z.frontend_url(observed)
    sample = z.scrape(url) if url is not None else None
    tracker = _tracker(op)
    key = f"{ns}/{name}"
    idle = tracker.idle_for(key, sample, time.monotonic()) if sample is not None and not at_zero else 0.0
    decision = z.decide(status, settings, sample, idle)
    generation = int(meta.get("generation") or 1)
    if decision == "hold":
        z.delete_stage_pods(op.kube, ns, observed)  # leftovers of the scale-down
        return body, observed, True
    if decision == "wake":
        assert sample is not None
        op.kube.patch_status(PLURAL, ns, name, z.wake_status(status, sample.waiting_for_stages, st.utcnow(),
                                                              generation, time.time()))
        op.post(body, Event(NORMAL, "ScaleFromZero", f"{sample.waiting_for_stages:.0f} requests wait at the "
                                                     "frontend: bringing the stages of the last layout back"))
        tracker.forget(key)
        fresh = op.kube.get_pipeline(ns, name) or body
        return fresh, observed, False
    if decision == "scale_to_zero":
        assert url is not None
        try:
            gone = z.scale_down(op.kube, ns, name, url, observed, generation)
        except Exception as error:  # the frontend refused (a switch in progress): try at a later pass
            op.post(body, Event(WARNING, "ScaleToZeroFailed", f"the frontend did not let go of its stages: {error}"))
            return body, observed, False
        op.kube.patch_status(PLURAL, ns, name, z.zero_status(status, idle, st.utcnow(), generation))
        op.metrics.scaled_to_zero.inc()
        op.post(body, Event(NORMAL, "ScaledToZero", f"idle for {idle:.0f}s: released stage pods "
                                                    f"{', '.join(gone) or '(none left)'}; the frontend holds requests"))
        tracker.forget(key)
        return body, observed, True
    return body, observed, False


def _tracker(op: PipelineOperator) -> z.IdleTracker:
    tracker = getattr(op, "_idle_tracker", None)
    if tracker is None:
        tracker = z.IdleTracker()
        op._idle_tracker = tracker  # type: ignore[attr-defined]
    return tracker
