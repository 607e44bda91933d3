"""The operator's only door to the API server: observe a pipeline's children, apply actions, write status.

Responses are read as plain JSON (`_preload_content=False`), the same shape `kubectl get -o json`
shows, so the domain code never sees the client library's model classes. Creating something that
exists (409) and deleting something gone (404) count as done: two passes racing each other, or a
pass repeated after a restart, converge instead of failing.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from pipeshift.operator import manifests as m
from pipeshift.operator.reconcile import STAGES_ANNOTATION, Action, Create, Delete, Observed, PodView, Update
from pipeshift.operator.spec import DEFAULT_CONFIG_KEY, GROUP, PLURAL, POLICY_PLURAL, VERSION

logger = logging.getLogger(__name__)
MERGE_PATCH = "application/merge-patch+json"


class Kube:
    """Typed calls over one `ApiClient` (configured from the kubeconfig or the in-cluster account)."""

    def __init__(self, api: client.ApiClient | None = None) -> None:
        self.api = api or client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    # --- reading -------------------------------------------------------------------------------------

    @staticmethod
    def _json(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        resp = call(*args, _preload_content=False, **kwargs)
        return json.loads(resp.data)

    def _maybe(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any | None:
        """The object, or None when it does not exist."""
        try:
            return self._json(call, *args, **kwargs)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def get_pipeline(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._maybe(self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name)

    def observe(self, body: Mapping[str, Any]) -> Observed:
        meta = body["metadata"]
        ns, name = meta["namespace"], meta["name"]
        spec = body.get("spec") if isinstance(body.get("spec"), Mapping) else {}
        pods = self._json(self.core.list_namespaced_pod, ns, label_selector=m.selector(name))["items"]
        deployment = self._maybe(self.apps.read_namespaced_deployment, m.frontend_name(name), ns)
        config, config_error = self._model_config(ns, spec)
        return Observed(
            pods=tuple(PodView.from_pod(p) for p in pods),
            secret=self._maybe(self.core.read_namespaced_secret, m.secret_name(name), ns) is not None,
            service=self._maybe(self.core.read_namespaced_service, m.frontend_name(name), ns) is not None,
            deployment=deployment is not None,
            deployment_hash=((deployment or {}).get("metadata", {}).get("annotations") or {}).get(m.HASH_ANNOTATION),
            deployment_template_stages=_template_stages(deployment),
            deployment_stages=((deployment or {}).get("metadata", {}).get("annotations") or {}).get(STAGES_ANNOTATION),
            model_config=config,
            model_config_error=config_error,
            policy=self._policy(ns, spec.get("policy")),
        )

    def _model_config(self, ns: str, spec: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        ref = (spec.get("model") or {}).get("configMapRef") if isinstance(spec.get("model"), Mapping) else None
        if not isinstance(ref, Mapping) or not isinstance(ref.get("name"), str):
            return None, None
        key = ref.get("key") or DEFAULT_CONFIG_KEY
        where = f"spec.model.configMapRef: ConfigMap {ref['name']!r} key {key!r}"
        cm = self._maybe(self.core.read_namespaced_config_map, ref["name"], ns)
        if cm is None:
            return None, f"{where}: no such ConfigMap in this namespace"
        text = (cm.get("data") or {}).get(key)
        if text is None:
            return None, f"{where}: the ConfigMap has no such key"
        try:
            config = json.loads(text)
        except json.JSONDecodeError as e:
            return None, f"{where}: not JSON ({e})"
        if not isinstance(config, dict):
            return None, f"{where}: not a JSON object"
        return config, None

    def _policy(self, ns: str, name: Any) -> dict[str, Any] | None:
        if not isinstance(name, str) or not name:
            return None
        return self._maybe(self.custom.get_namespaced_custom_object, GROUP, VERSION, ns, POLICY_PLURAL, name)

    # --- writing -------------------------------------------------------------------------------------

    def apply(self, namespace: str, action: Action) -> bool:
        """Carry out one action; False when it was already done (exists, or already gone)."""
        try:
            if isinstance(action, Create):
                self._create(namespace, action.kind, action.manifest)
            elif isinstance(action, Update):
                if action.kind != "Deployment":
                    raise ValueError(f"updating a {action.kind} is not supported")
                self.apps.patch_namespaced_deployment(action.name, namespace, dict(action.manifest),
                                                      _content_type=MERGE_PATCH)
            elif isinstance(action, Delete):
                self.delete(namespace, action.kind, action.name)
            return True
        except ApiException as e:
            if (e.status == 409 and isinstance(action, Create)) or (e.status == 404 and isinstance(action, Delete)):
                return False
            raise

    def _create(self, ns: str, kind: str, manifest: Mapping[str, Any]) -> None:
        body = dict(manifest)
        creators: dict[str, Callable[..., Any]] = {
            "Pod": self.core.create_namespaced_pod,
            "Secret": self.core.create_namespaced_secret,
            "Service": self.core.create_namespaced_service,
            "Deployment": self.apps.create_namespaced_deployment,
        }
        if kind not in creators:
            raise ValueError(f"creating a {kind} is not supported")
        creators[kind](ns, body, _preload_content=False)

    def delete(self, ns: str, kind: str, name: str) -> None:
        deleters: dict[str, Callable[..., Any]] = {
            "Pod": self.core.delete_namespaced_pod,
            "Secret": self.core.delete_namespaced_secret,
            "Service": self.core.delete_namespaced_service,
            "Deployment": self.apps.delete_namespaced_deployment,
            "ReplicaSet": self.apps.delete_namespaced_replica_set,
        }
        if kind not in deleters:
            raise ValueError(f"deleting a {kind} is not supported")
        # Background: the garbage collector (where there is one) removes the dependents too.
        deleters[kind](name, ns, propagation_policy="Background", _preload_content=False)

    def delete_children(self, namespace: str, name: str) -> list[str]:
        """Everything the operator created for a pipeline, without relying on the garbage collector:
        the Deployment first (so no new ReplicaSet), then its ReplicaSets (so no new pod), then pods."""
        gone = []
        targets = [("Deployment", m.frontend_name(name)), ("Service", m.frontend_name(name))]
        sets = self._json(self.apps.list_namespaced_replica_set, namespace, label_selector=m.selector(name))["items"]
        targets += [("ReplicaSet", rs["metadata"]["name"]) for rs in sets]
        pods = self._json(self.core.list_namespaced_pod, namespace, label_selector=m.selector(name))["items"]
        targets += [("Pod", p["metadata"]["name"]) for p in pods]
        targets.append(("Secret", m.secret_name(name)))
        for kind, obj in targets:
            if self.apply(namespace, Delete(kind, obj)):
                gone.append(f"{kind}/{obj}")
        return gone

    def control_token(self, namespace: str, name: str) -> str | None:
        """The pipeline's control token (what the agents and the frontend require on control calls)."""
        secret = self._maybe(self.core.read_namespaced_secret, m.secret_name(name), namespace)
        raw = ((secret or {}).get("data") or {}).get(m.TOKEN_KEY)
        return base64.b64decode(raw).decode() if raw else None

    def annotate_deployment(self, namespace: str, name: str, annotations: Mapping[str, str]) -> None:
        """Metadata only: the pod template (and so the running frontend pod) stays as it is."""
        self.apps.patch_namespaced_deployment(name, namespace, {"metadata": {"annotations": dict(annotations)}},
                                              _content_type=MERGE_PATCH, _preload_content=False)

    def node_gpus(self, selector: Mapping[str, str]) -> int:
        """Allocatable `nvidia.com/gpu` summed over the schedulable Nodes that match `selector`."""
        text = ",".join(f"{k}={v}" for k, v in selector.items())
        nodes = self._json(self.core.list_node, label_selector=text)["items"]
        total = 0
        for node in nodes:
            if (node.get("spec") or {}).get("unschedulable"):
                continue
            value = ((node.get("status") or {}).get("allocatable") or {}).get(m.GPU_RESOURCE, "0")
            total += int(str(value)) if str(value).isdigit() else 0
        return total

    def patch_status(self, plural: str, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """A merge patch of the status subresource: keys set to None are removed."""
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, plural, name,
                                                          {"status": dict(status)}, _content_type=MERGE_PATCH,
                                                          _preload_content=False)


def _template_stages(deployment: Mapping[str, Any] | None) -> tuple[str, ...] | None:
    """PIPESHIFT_FRONTEND_STAGES of the Deployment's pod template, as a tuple of addresses."""
    try:
        containers = deployment["spec"]["template"]["spec"]["containers"]  # type: ignore[index]
    except (KeyError, TypeError):
        return None
    for env in (containers[0].get("env") or []) if containers else []:
        if env.get("name") == "PIPESHIFT_FRONTEND_STAGES" and isinstance(env.get("value"), str):
            return tuple(env["value"].split(","))
    return None
