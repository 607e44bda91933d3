"""The objects the operator creates for one `LLMPipeline`, as plain dicts (pure functions).

Every object carries the pipeline's labels and an owner reference to it, so deleting the pipeline lets
the garbage collector remove everything (the delete handler also removes them itself). A desired
object's `pipeshift.dev/spec-hash` annotation is a digest of what it should be: the reconciler
compares digests instead of diffing fields the API server defaults.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from pipeshift.api import StagePlan
from pipeshift.operator.spec import API_VERSION, KIND, PipelineRef, PipelineSpec, Pool

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "pipeshift"
LABEL_PIPELINE = "pipeshift.dev/pipeline"
LABEL_ROLE = "pipeshift.dev/role"
LABEL_STAGE = "pipeshift.dev/stage"
LABEL_POOL = "pipeshift.dev/pool"
HASH_ANNOTATION = "pipeshift.dev/spec-hash"
LAYERS_ANNOTATION = "pipeshift.dev/layers"

ROLE_STAGE = "stage"
ROLE_FRONTEND = "frontend"
GPU_RESOURCE = "nvidia.com/gpu"
AGENT_CONTROL_PORT = 9000
AGENT_DATA_PORT = 9001
FRONTEND_PORT = 8000
TOKEN_KEY = "token"
MODEL_VOLUME = "model"


def stage_pod_name(name: str, stage_id: int) -> str:
    return f"{name}-stage-{stage_id}"


def secret_name(name: str) -> str:
    return f"{name}-control-token"


def frontend_name(name: str) -> str:
    """The frontend Deployment's and Service's name."""
    return f"{name}-frontend"


def labels(name: str, role: str | None = None, stage_id: int | None = None) -> dict[str, str]:
    out = {MANAGED_BY: MANAGER, LABEL_PIPELINE: name}
    if role is not None:
        out[LABEL_ROLE] = role
    if stage_id is not None:
        out[LABEL_STAGE] = str(stage_id)
    return out


def selector(name: str, role: str | None = None) -> str:
    """A label selector string for list calls: everything of this pipeline (of one role)."""
    return ",".join(f"{k}={v}" for k, v in labels(name, role).items())


def owner_references(ref: PipelineRef) -> list[dict[str, Any]]:
    return [{"apiVersion": API_VERSION, "kind": KIND, "name": ref.name, "uid": ref.uid,
             "controller": True, "blockOwnerDeletion": True}]


def digest(obj: Any) -> str:
    """A stable short digest of a JSON-able object (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _metadata(ref: PipelineRef, name: str, lbls: dict[str, str], annotations: dict[str, str] | None = None
              ) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ref.namespace, "labels": lbls,
                            "ownerReferences": owner_references(ref)}
    if annotations:
        meta["annotations"] = annotations
    return meta


def _pod_ip_env(var: str) -> dict[str, Any]:
    return {"name": var, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def _token_env(ref: PipelineRef) -> dict[str, Any]:
    return {"name": "PIPESHIFT_CONTROL_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": secret_name(ref.name), "key": TOKEN_KEY}}}


def _model_volume(spec: PipelineSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, volumeMounts): the model source mounted read-only, or nothing when the image holds it."""
    if spec.model.volume is None:
        return [], []
    return ([{"name": MODEL_VOLUME, **spec.model.volume}],
            [{"name": MODEL_VOLUME, "mountPath": spec.model.mount_path, "readOnly": True}])


def stage_resources(spec: PipelineSpec) -> dict[str, Any]:
    """`spec.resources` plus one GPU: extended resources go in limits (requests then default to them).
    Quantities are strings, as the API's `Quantity` type is (the CRD also admits plain integers)."""
    out: dict[str, dict[str, str]] = {
        k: {name: str(q) for name, q in v.items()} for k, v in spec.resources.items() if isinstance(v, Mapping)
    }
    out.setdefault("limits", {})[GPU_RESOURCE] = "1"
    if GPU_RESOURCE in out.get("requests", {}):
        out["requests"][GPU_RESOURCE] = "1"
    return out


def stage_env(ref: PipelineRef, spec: PipelineSpec, stage: StagePlan) -> list[dict[str, Any]]:
    """The agent's whole configuration (`pipeshift agent --help` names each variable)."""
    env: list[dict[str, Any]] = [
        {"name": "PIPESHIFT_MODEL", "value": spec.model.path},
        {"name": "PIPESHIFT_LAYERS", "value": f"{stage.start}:{stage.end}"},
        {"name": "PIPESHIFT_STAGE_ID", "value": str(stage.stage_id)},
        _pod_ip_env("PIPESHIFT_HOST"),
        {"name": "PIPESHIFT_DATA_PORT", "value": str(AGENT_DATA_PORT)},
        {"name": "PIPESHIFT_CONTROL_PORT", "value": str(AGENT_CONTROL_PORT)},
        # Every stage pod starts warm: one a live change adds joins a running pipeline, and the same manifest
        # for all keeps the pod digest independent of how a stage came to be.
        {"name": "PIPESHIFT_WARM", "value": "1"},
        _token_env(ref),
    ]
    if spec.dtype is not None:
        env.append({"name": "PIPESHIFT_DTYPE", "value": spec.dtype})
    return env


def stage_pod(ref: PipelineRef, spec: PipelineSpec, stage: StagePlan, pool: Pool) -> dict[str, Any]:
    """One agent pod. `restartPolicy: Never`: a restarted agent would come back with its *original*
    layer range and an empty KV cache, so the operator replaces a dead stage instead."""
    volumes, mounts = _model_volume(spec)
    container: dict[str, Any] = {
        "name": "agent",
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["pipeshift", "agent"],
        "env": stage_env(ref, spec, stage),
        "ports": [{"name": "control", "containerPort": AGENT_CONTROL_PORT},
                  {"name": "data", "containerPort": AGENT_DATA_PORT}],
        "resources": stage_resources(spec),
        # /health answers once the layers are loaded and both servers listen.
        "readinessProbe": {"httpGet": {"path": "/health", "port": AGENT_CONTROL_PORT},
                           "periodSeconds": 2, "failureThreshold": 3},
    }
    if mounts:
        container["volumeMounts"] = mounts
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "nodeSelector": dict(pool.node_selector),
        "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [container],
    }
    if volumes:
        pod_spec["volumes"] = volumes
    lbls = labels(ref.name, ROLE_STAGE, stage.stage_id) | {LABEL_POOL: pool.name}
    annotations = {LAYERS_ANNOTATION: f"{stage.start}:{stage.end}",
                   HASH_ANNOTATION: digest({"labels": lbls, "spec": pod_spec})}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": _metadata(ref, stage_pod_name(ref.name, stage.stage_id), lbls, annotations),
            "spec": pod_spec}


def control_token_secret(ref: PipelineRef, token: str) -> dict[str, Any]:
    """The token every agent, the frontend and the operator share for control and data-plane calls."""
    if not token:
        raise ValueError("the control token must not be empty")
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _metadata(ref, secret_name(ref.name), labels(ref.name)),
            "stringData": {TOKEN_KEY: token}}


# Seconds the frontend keeps the requests of a chain that lost a stage: time to schedule and load a new pod.
FRONTEND_RECOVER_TIMEOUT_S = 180


def frontend_env(ref: PipelineRef, spec: PipelineSpec, stage_addresses: Sequence[str]) -> list[dict[str, Any]]:
    if not stage_addresses:
        raise ValueError("the frontend needs the control address of every stage")
    return [
        {"name": "PIPESHIFT_FRONTEND_MODEL", "value": spec.model.path},
        {"name": "PIPESHIFT_FRONTEND_STAGES", "value": ",".join(stage_addresses)},
        _pod_ip_env("PIPESHIFT_FRONTEND_HOST"),
        {"name": "PIPESHIFT_FRONTEND_PORT", "value": str(FRONTEND_PORT)},
        {"name": "PIPESHIFT_FRONTEND_MODEL_NAME", "value": ref.name},
        # A stage pod that dies is replaced by the operator (see `restore`): its requests wait for that.
        {"name": "PIPESHIFT_FRONTEND_RECOVER_TIMEOUT", "value": str(FRONTEND_RECOVER_TIMEOUT_S)},
        _token_env(ref),
    ]


def frontend_deployment(ref: PipelineRef, spec: PipelineSpec, stage_addresses: Sequence[str]) -> dict[str, Any]:
    """One frontend replica, `Recreate`: two frontends would each admit against the same KV budget."""
    volumes, mounts = _model_volume(spec)
    container: dict[str, Any] = {
        "name": "frontend",
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["pipeshift", "frontend"],
        "env": frontend_env(ref, spec, stage_addresses),
        "ports": [{"name": "http", "containerPort": FRONTEND_PORT}],
        # /health is 200 only while every stage answers: Ready means requests can be served.
        "readinessProbe": {"httpGet": {"path": "/health", "port": FRONTEND_PORT},
                           "periodSeconds": 2, "failureThreshold": 3},
    }
    if mounts:
        container["volumeMounts"] = mounts
    pod_spec: dict[str, Any] = {"containers": [container]}
    if volumes:
        pod_spec["volumes"] = volumes
    lbls = labels(ref.name, ROLE_FRONTEND)
    spec_hash = digest({"labels": lbls, "spec": pod_spec})
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _metadata(ref, frontend_name(ref.name), lbls, {HASH_ANNOTATION: spec_hash}),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": lbls},
            "template": {"metadata": {"labels": lbls, "annotations": {HASH_ANNOTATION: spec_hash}},
                         "spec": pod_spec},
        },
    }


def frontend_service(ref: PipelineRef) -> dict[str, Any]:
    lbls = labels(ref.name, ROLE_FRONTEND)
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _metadata(ref, frontend_name(ref.name), lbls),
        "spec": {"selector": lbls,
                 "ports": [{"name": "http", "port": FRONTEND_PORT, "targetPort": "http", "protocol": "TCP"}]},
    }


def stage_address(pod_ip: str) -> str:
    """How the frontend reaches a stage: its pod IP and the fixed control port (no DNS, no Service)."""
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    return f"{host}:{AGENT_CONTROL_PORT}"
