"""Restoring a stage pod that died after a commit, without restarting the frontend or losing its requests.

The reconcile pass already deletes a stage pod whose agent exited and creates it again (same name, same
layer range, a new pod IP), and reports the pipeline `Degraded` (reason `StageLost`, naming the stage)
meanwhile. The frontend, meanwhile, keeps the requests of the broken chain (its recovery window,
`PIPESHIFT_FRONTEND_RECOVER_TIMEOUT`). This module finishes the job once every replacement is Ready: it
tells the running frontend the new chain (`POST /control/recover`), which re-prefills the affected
requests on it, and records the chain in the frontend Deployment's stages annotation, so the reconcile
pass sees a frontend already wired to these stages instead of restarting it with a new template.

`plan_restore` is pure (unit tested); `restore` does the two calls. A frontend pod that is gone or has no IP
yet is left to the reconcile pass (it starts one with the right stages); a live change in progress has
its own crash handling (`pipeshift/control/recovery.py`), so nothing is done then.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pipeshift.control.http import ControlClient
from pipeshift.operator import manifests as m
from pipeshift.operator.reconcile import STAGES_ANNOTATION, Observed, PodView

logger = logging.getLogger(__name__)

RECOVER_TIMEOUT_S = 60.0
_IDLE_PHASES = ("Failed", "ScaledToZero")


@dataclass(frozen=True)
class RestorePlan:
    """Re-wire the frontend at `frontend_url` onto `stages` (control addresses in layout order); `replaced`:
    the stage ids whose address changed. `request_id` is derived from the new chain, so a retry after a
    timeout (or an operator restart) repeats the same call, which the frontend answers once."""

    frontend_url: str
    stages: tuple[str, ...]
    replaced: tuple[int, ...]
    request_id: str


def running_stages(observed: Observed) -> tuple[str, ...] | None:
    """The chain the running frontend uses: the Deployment's annotation (kept current by live changes and
    restores), else its pod template's list."""
    if observed.deployment_stages:
        return tuple(observed.deployment_stages.split(","))
    return observed.deployment_template_stages


def plan_restore(status: Mapping[str, Any], observed: Observed, *, attach: bool = False) -> RestorePlan | None:
    """What to tell the frontend, or None: nothing was replaced, a replacement is not Ready yet, a live
    change is under way, or there is no running frontend pod to tell. `attach`: the frontend holds no stages
    (scaled to zero, see `zero`): every stage is new to it."""
    if status.get("phase") in _IDLE_PHASES or status.get("reconfiguration"):
        return None
    try:
        layout = [(int(s["stageId"]), str(s["pod"])) for s in (status.get("layout") or {})["stages"]]
    except (KeyError, TypeError, ValueError):
        return None
    running = running_stages(observed)
    if not attach and (not layout or running is None or len(running) != len(layout)):
        return None
    pods = {p.name: p for p in observed.pods if p.role == m.ROLE_STAGE}
    addresses: list[str] = []
    for _, pod_name in layout:
        pod = pods.get(pod_name)
        if pod is None or not _up(pod):
            return None
        addresses.append(m.stage_address(str(pod.pod_ip)))
    if attach:
        replaced = tuple(sid for sid, _ in layout)
    else:
        assert running is not None
        replaced = tuple(sid for (sid, _), new, old in zip(layout, addresses, running, strict=True) if new != old)
    if not replaced:
        return None
    frontend = next((p for p in observed.pods if p.role == m.ROLE_FRONTEND and p.pod_ip and p.phase == "Running"
                     and not p.deleting), None)
    if frontend is None:
        return None
    digest = hashlib.sha256(",".join(addresses).encode()).hexdigest()[:24]
    host = f"[{frontend.pod_ip}]" if ":" in str(frontend.pod_ip) else str(frontend.pod_ip)
    return RestorePlan(f"http://{host}:{m.FRONTEND_PORT}", tuple(addresses), replaced, f"restore-{digest}")


def _up(pod: PodView) -> bool:
    return pod.ready and bool(pod.pod_ip) and not pod.deleting and not pod.finished


class _Kube(Protocol):
    def control_token(self, namespace: str, name: str) -> str | None: ...

    def annotate_deployment(self, namespace: str, name: str, annotations: Mapping[str, str]) -> None: ...


@dataclass(frozen=True)
class RestoreResult:
    requests_reprefilled: int
    tokens_recomputed: int


def restore(kube: _Kube, namespace: str, name: str, plan: RestorePlan) -> RestoreResult:
    """Re-wire the frontend, then record the chain on its Deployment. A failure raises (ControlCallError,
    ApiException): the caller retries the pass, and the same request id makes the retry harmless."""
    client = ControlClient(plan.frontend_url, kube.control_token(namespace, name), timeout_s=RECOVER_TIMEOUT_S)
    answer = client.post("/control/recover", {"request_id": plan.request_id, "stages": list(plan.stages)})
    kube.annotate_deployment(namespace, m.frontend_name(name), {STAGES_ANNOTATION: ",".join(plan.stages)})
    return RestoreResult(int(answer.get("requests_reprefilled", 0)), int(answer.get("tokens_recomputed", 0)))


def restore_status(plan: RestorePlan, result: RestoreResult, now: str) -> dict[str, Any]:
    """`status.lastRestore`: what was replaced and what it cost."""
    return {"stages": list(plan.replaced), "requestsReprefilled": result.requests_reprefilled,
            "tokensRecomputed": result.tokens_recomputed, "at": now}


def summary(plan: RestorePlan, result: RestoreResult) -> str:
    stages = ", ".join(str(s) for s in plan.replaced)
    return (f"stage {stages} restored in its layer range; the frontend re-wired onto it without a restart: "
            f"{result.requests_reprefilled} requests re-prefilled, {result.tokens_recomputed} tokens recomputed")
