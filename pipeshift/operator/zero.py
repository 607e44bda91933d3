"""Scale to zero and back: release every stage pod of an idle pipeline, keep the frontend (which holds the
requests that arrive meanwhile), and bring the stages back when those requests show up in its metrics.

Only pipelines that opt in (`spec.scaleToZero: true`) are scaled to zero; the idle period is the policy's
`scale_to_zero.idle_seconds` (the AutoscalingPolicy that `spec.policy` names, or `spec.inlinePolicy`), else
`DEFAULT_IDLE_SECONDS`. Idle means: the frontend's own `/metrics` (scraped directly, at every pass) show no
request running or queued and no request finished since the previous look, for the whole period.

Going to zero: `POST /control/scale-to-zero` on the frontend (it lets go of its stages and holds new
requests), then every stage pod is deleted and the phase becomes `ScaledToZero` (the layout stays in
status, to be brought back). While at zero the reconcile pass is not run (it would create the stage pods
again); each pass instead looks at `pipeshift_requests_waiting_for_stages`. Demand (> 0) writes the wake-up
time to status and phase `Pending`: the reconcile pass then creates the stage pods of the layout, and
`restore` attaches them to the waiting frontend, which serves the held requests. The time from demand seen
to stages attached is `status.coldStartSeconds` and the operator metric `pipeshift_operator_cold_start_seconds`.

This module is the one authority on scale to zero: `decide` alone releases the stages (for a pinned layout as
for a policy's). The autoscaling loop (`autoscale.py`) hands the policy to its `Autoscaler` with
`scale_to_zero` off, so it never proposes a release of its own, and it does nothing at zero (there is no
layout to serve), so waking up is `decide`'s too.

The decisions (`settings`, `parse_metrics`, `IdleTracker`, `decide`) are pure; the lifecycle hook
(`lifecycle.py`) does the I/O through `scale_down`.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pipeshift.control.http import ControlClient
from pipeshift.operator import manifests as m
from pipeshift.operator import status as st
from pipeshift.operator.reconcile import Delete, Observed

logger = logging.getLogger(__name__)

DEFAULT_IDLE_SECONDS = 900.0
SCRAPE_TIMEOUT_S = 3.0
STATUS_KEY = "zero"  # status.zero: {since} at zero, {demandAt} while waking


@dataclass(frozen=True)
class ZeroSettings:
    idle_seconds: float


def settings(spec: Mapping[str, Any], policy: Mapping[str, Any] | None) -> ZeroSettings | None:
    """None unless the pipeline opted in (`spec.scaleToZero`); the idle period from the policy body."""
    if spec.get("scaleToZero") is not True:
        return None
    body = spec.get("inlinePolicy") if isinstance(spec.get("inlinePolicy"), Mapping) else policy
    section = (body or {}).get("scale_to_zero") if isinstance(body, Mapping) else None
    idle = section.get("idle_seconds") if isinstance(section, Mapping) else None
    if isinstance(idle, int | float) and not isinstance(idle, bool) and idle > 0:
        return ZeroSettings(float(idle))
    return ZeroSettings(DEFAULT_IDLE_SECONDS)


@dataclass(frozen=True)
class FrontendSample:
    """The frontend's request gauges and counters, as one scrape showed them."""

    running: float
    queued: float
    finished: float  # pipeshift_requests_total over every outcome
    waiting_for_stages: float


def parse_metrics(text: str) -> FrontendSample:
    """The few frontend series this needs, from Prometheus text format (absent series count as 0)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            values[name] = values.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return FrontendSample(values.get("pipeshift_requests_running", 0.0), values.get("pipeshift_requests_queued", 0.0),
                          values.get("pipeshift_requests_total", 0.0),
                          values.get("pipeshift_requests_waiting_for_stages", 0.0))


class IdleTracker:
    """Since when each pipeline has been idle, from successive samples (in memory: an operator restart
    starts the idle period again, which only delays a scale-down)."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, float]] = {}  # key -> (finished count, idle since)
        self._lock = threading.Lock()

    def idle_for(self, key: str, sample: FrontendSample, now: float) -> float:
        """Seconds the pipeline has been idle at `now` (0 when it is busy or this is the first look)."""
        with self._lock:
            last = self._last.get(key)
            busy = sample.running > 0 or sample.queued > 0 or sample.waiting_for_stages > 0
            if busy or last is None or last[0] != sample.finished:
                self._last[key] = (sample.finished, now)
                return 0.0
            return now - last[1]

    def forget(self, key: str) -> None:
        with self._lock:
            self._last.pop(key, None)


Decision = Literal["scale_to_zero", "wake", "hold"]


def decide(status: Mapping[str, Any], zero: ZeroSettings | None, sample: FrontendSample | None,
           idle_for: float) -> Decision | None:
    """At zero: `wake` on demand, else `hold` (the reconcile pass must not run). Serving (Ready):
    `scale_to_zero` once idle long enough. None: let the reconcile pass do its work."""
    if status.get("phase") == st.SCALED_TO_ZERO:
        return "wake" if sample is not None and sample.waiting_for_stages > 0 else "hold"
    if zero is None or sample is None or status.get("phase") != st.READY or status.get("reconfiguration"):
        return None
    return "scale_to_zero" if idle_for >= zero.idle_seconds else None


def zero_status(previous: Mapping[str, Any], idle_for: float, now: str, generation: int) -> dict[str, Any]:
    ready = st.Condition(st.READY, False, "ScaledToZero",
                         f"idle for {idle_for:.0f}s: every stage pod was released; the frontend holds new requests "
                         "and the stages come back when one arrives")
    return {"phase": st.SCALED_TO_ZERO, "stageCount": 0, STATUS_KEY: {"since": now},
            "conditions": _conditions(previous, ready, now, generation)}


def wake_status(previous: Mapping[str, Any], waiting: float, now: str, generation: int,
                wall: float) -> dict[str, Any]:
    ready = st.Condition(st.READY, False, "ColdStart",
                         f"{waiting:.0f} requests wait at the frontend: starting the stages of the last layout")
    return {"phase": st.PENDING, STATUS_KEY: {"demandAt": wall},
            "conditions": _conditions(previous, ready, now, generation)}


def _conditions(previous: Mapping[str, Any], ready: st.Condition, now: str, generation: int) -> list[dict[str, Any]]:
    old = previous.get("conditions") or []
    others = [st.Condition(st.RECONFIGURING, False, "Idle", "no reconfiguration in progress"),
              st.Condition(st.DEGRADED, False, "AsExpected", "nothing that served has stopped")]
    return st.merge_conditions(old, [ready, *others], now, generation)


def cold_start_seconds(previous: Mapping[str, Any], wall: float) -> float | None:
    """Seconds since the demand that woke the pipeline, when it is waking."""
    demand = (previous.get(STATUS_KEY) or {}).get("demandAt") if isinstance(previous.get(STATUS_KEY), Mapping) \
        else None
    return round(wall - float(demand), 3) if isinstance(demand, int | float) else None


class _Kube(Protocol):
    def control_token(self, namespace: str, name: str) -> str | None: ...

    def apply(self, namespace: str, action: Any) -> bool: ...

    def patch_status(self, plural: str, namespace: str, name: str, status: Mapping[str, Any]) -> None: ...


def frontend_url(observed: Observed) -> str | None:
    pod = next((p for p in observed.pods if p.role == m.ROLE_FRONTEND and p.pod_ip and p.phase == "Running"
                and not p.deleting), None)
    if pod is None:
        return None
    host = f"[{pod.pod_ip}]" if ":" in str(pod.pod_ip) else str(pod.pod_ip)
    return f"http://{host}:{m.FRONTEND_PORT}"


def scrape(url: str) -> FrontendSample | None:
    """The frontend's metrics, or None when it does not answer (then nothing is decided)."""
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # pod IPs: never via a proxy
        with opener.open(url + "/metrics", timeout=SCRAPE_TIMEOUT_S) as response:
            return parse_metrics(response.read().decode())
    except (OSError, ValueError) as error:
        logger.debug("scraping %s/metrics failed: %s", url, error)
        return None


def scale_down(kube: _Kube, namespace: str, name: str, url: str, observed: Observed, generation: int) -> list[str]:
    """Tell the frontend, then delete every stage pod; the names deleted."""
    token = kube.control_token(namespace, name)
    ControlClient(url, token).post("/control/scale-to-zero", {"request_id": f"zero-{name}-{time.time_ns()}"})
    return delete_stage_pods(kube, namespace, observed)


def delete_stage_pods(kube: _Kube, namespace: str, observed: Observed) -> list[str]:
    gone = []
    for pod in observed.pods:
        if pod.role == m.ROLE_STAGE and not pod.deleting and kube.apply(namespace, Delete("Pod", pod.name)):
            gone.append(pod.name)
    return gone
