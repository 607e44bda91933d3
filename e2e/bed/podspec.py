"""Turn a Pod's first container into a local process launch: argv, env, volumes, readiness probe.

This is the part of the process kubelet (kubelet.py) that reads the pod spec. What it supports,
and where it departs from a kubelet (the bed has no container runtime, so a pod is a process):
- argv is the container's `command + args` with `$(VAR)` expanded from its env; a container with
  no `command` cannot run (there is no image entrypoint to fall back on) and fails to start.
- env: plain values, `fieldRef` (metadata.name/namespace/uid/labels/annotations, spec.nodeName,
  spec.serviceAccountName, status.podIP/hostIP), `secretKeyRef`, `configMapKeyRef`,
  `resourceFieldRef` (the raw quantity, no divisor) and `envFrom`. PATH has the project venv's
  bin/ first, so `pipeshift` and `python` resolve to the project's.
- volumes: a pod sees the host's filesystem. `hostPath` is identity-mapped (tests use the same
  path on both sides); `secret`, `configMap`, `emptyDir` and projected secret/configMap sources
  are materialised in the pod's directory. Where a mountPath differs from the local directory,
  occurrences of the mountPath in env values, command and args are rewritten to the local path
  (a program that hard-codes the path, such as an in-cluster client's token path, cannot be
  redirected). Other volume types (PVCs, ...) fail the pod with a message naming the volume.
- readiness: `httpGet`, `tcpSocket` and `exec` probes are run against the pod IP. Liveness and
  startup probes, init containers and every container after the first are not run.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e2e.bed.rest import ApiError, Rest


class LaunchError(Exception):
    """The pod cannot start (yet): `reason` is the kubelet-style waiting reason."""

    def __init__(self, reason: str, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry = retry


@dataclass(frozen=True)
class Probe:
    kind: str  # httpGet | tcpSocket | exec
    port: int = 0
    path: str = "/"
    scheme: str = "HTTP"
    command: tuple[str, ...] = ()
    initial_delay: float = 0.0
    timeout: float = 1.0
    failure_threshold: int = 3
    success_threshold: int = 1


@dataclass
class Launch:
    container: str
    image: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    mounts: dict[str, Path] = field(default_factory=dict)  # mountPath -> local directory
    probe: Probe | None = None


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: known names are replaced, unknown left as is, `$$` is `$`."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR.sub(sub, text)


def _field_ref(pod: dict[str, Any], path: str, pod_ip: str) -> str:
    meta, spec = pod["metadata"], pod["spec"]
    simple = {"metadata.name": meta.get("name", ""), "metadata.namespace": meta.get("namespace", ""),
              "metadata.uid": meta.get("uid", ""), "spec.nodeName": spec.get("nodeName", ""),
              "spec.serviceAccountName": spec.get("serviceAccountName", ""), "status.podIP": pod_ip,
              "status.podIPs": pod_ip, "status.hostIP": "127.0.0.1"}
    if path in simple:
        return simple[path]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return str(meta.get(match.group(1), {}).get(match.group(2), ""))
    raise LaunchError("CreateContainerConfigError", f"unsupported fieldRef.fieldPath {path!r}", retry=False)


def _object_data(rest: Rest, kind: str, namespace: str, name: str) -> dict[str, str] | None:
    """A Secret's (decoded) or ConfigMap's data, or None when it does not exist."""
    plural = "secrets" if kind == "Secret" else "configmaps"
    try:
        obj = rest.get(f"/api/v1/namespaces/{namespace}/{plural}/{name}")
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise
    if kind == "Secret":
        return {k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("data") or {}).items()}
    return {**(obj.get("data") or {}), **{k: base64.b64decode(v).decode(errors="replace")
                                          for k, v in (obj.get("binaryData") or {}).items()}}


def _key_ref(rest: Rest, namespace: str, kind: str, ref: dict[str, Any], var: str) -> str | None:
    data = _object_data(rest, kind, namespace, ref["name"])
    if data is None or ref["key"] not in data:
        if ref.get("optional"):
            return None
        what = f"{kind.lower()} {ref['name']!r}" if data is None else f"key {ref['key']!r} in {kind} {ref['name']!r}"
        raise LaunchError("CreateContainerConfigError", f"env {var}: {what} not found", retry=True)
    return data[ref["key"]]


def resolve_env(pod: dict[str, Any], container: dict[str, Any], pod_ip: str, rest: Rest) -> dict[str, str]:
    """The container's environment as the kubelet would build it (envFrom first, then env in order)."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        kind, ref = ("Secret", source["secretRef"]) if "secretRef" in source else ("ConfigMap", source["configMapRef"])
        data = _object_data(rest, kind, namespace, ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise LaunchError("CreateContainerConfigError", f"envFrom: {kind} {ref['name']!r} not found", retry=True)
        env.update({source.get("prefix", "") + k: v for k, v in data.items()})
    for var in container.get("env") or []:
        name = var["name"]
        source = var.get("valueFrom")
        if source is None:
            env[name] = expand(var.get("value", ""), env)
        elif "fieldRef" in source:
            env[name] = _field_ref(pod, source["fieldRef"]["fieldPath"], pod_ip)
        elif "secretKeyRef" in source or "configMapKeyRef" in source:
            kind = "Secret" if "secretKeyRef" in source else "ConfigMap"
            value = _key_ref(rest, namespace, kind, source.get("secretKeyRef") or source["configMapKeyRef"], name)
            if value is not None:
                env[name] = value
        elif "resourceFieldRef" in source:
            limits_or_requests, _, resource = source["resourceFieldRef"]["resource"].partition(".")
            env[name] = str((container.get("resources") or {}).get(limits_or_requests, {}).get(resource, "0"))
    return env


def _write_files(directory: Path, data: dict[str, str], items: list[dict[str, Any]] | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    wanted = [(i["key"], i["path"]) for i in items] if items else [(k, k) for k in data]
    for key, rel in wanted:
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(data.get(key, ""))


def _materialise(pod: dict[str, Any], volume: dict[str, Any], pod_dir: Path, rest: Rest) -> Path:
    """The local directory that backs `volume`."""
    namespace, name = pod["metadata"]["namespace"], volume["name"]
    local = pod_dir / "volumes" / name
    if "hostPath" in volume:
        host = Path(volume["hostPath"]["path"])
        if volume["hostPath"].get("type") == "DirectoryOrCreate":
            host.mkdir(parents=True, exist_ok=True)
        return host
    if "emptyDir" in volume:
        local.mkdir(parents=True, exist_ok=True)
        return local
    if "projected" in volume:
        sources = volume["projected"].get("sources") or []
    elif any(k in volume for k in ("secret", "configMap", "downwardAPI")):
        sources = [volume]
    else:
        kinds = sorted(k for k in volume if k != "name")
        raise LaunchError("CreateContainerConfigError",
                          f"volume {name!r}: type {kinds} is not supported by the process kubelet", retry=False)
    local.mkdir(parents=True, exist_ok=True)
    for source in sources:
        if "secret" in source or "configMap" in source:
            kind = "Secret" if "secret" in source else "ConfigMap"
            ref = source.get("secret") or source["configMap"]
            ref_name = ref.get("secretName") or ref.get("name")
            data = _object_data(rest, kind, namespace, ref_name)
            if data is None:
                if ref.get("optional"):
                    continue
                raise LaunchError("ContainerCreating", f"volume {name!r}: {kind} {ref_name!r} not found", retry=True)
            _write_files(local, data, ref.get("items"))
        elif "serviceAccountToken" not in source and "downwardAPI" not in source:  # those two: left empty
            raise LaunchError("CreateContainerConfigError",
                              f"volume {name!r}: source {sorted(source)} is not supported by the process kubelet",
                              retry=False)
    return local


def rewrite(text: str, mounts: dict[str, Path]) -> str:
    """Replace mount paths inside `text` with their local directories (longest mount first)."""
    for mount in sorted(mounts, key=len, reverse=True):
        local = str(mounts[mount])
        if local != mount:
            text = re.sub(rf"(?<![\w.-]){re.escape(mount.rstrip('/'))}(?=/|$|[^\w.-])", local, text)
    return text


def _probe(container: dict[str, Any]) -> Probe | None:
    spec = container.get("readinessProbe")
    if not spec:
        return None
    common = {"initial_delay": float(spec.get("initialDelaySeconds", 0)),
              "timeout": float(spec.get("timeoutSeconds", 1)),
              "failure_threshold": int(spec.get("failureThreshold", 3)),
              "success_threshold": int(spec.get("successThreshold", 1))}
    if "exec" in spec:
        return Probe("exec", command=tuple(spec["exec"].get("command") or ()), **common)
    kind = "httpGet" if "httpGet" in spec else "tcpSocket"
    action = spec.get(kind)
    if action is None:
        raise LaunchError("CreateContainerConfigError", f"readinessProbe: unsupported handler {sorted(spec)}",
                          retry=False)
    port = action["port"]
    if isinstance(port, str) and not port.isdigit():
        named = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
        if port not in named:
            raise LaunchError("CreateContainerConfigError", f"readinessProbe.{kind}.port: no container port "
                              f"named {port!r}", retry=False)
        port = named[port]
    return Probe(kind, port=int(port), path=action.get("path", "/"), scheme=action.get("scheme", "HTTP"), **common)


def resolve_launch(pod: dict[str, Any], pod_ip: str, pod_dir: Path, rest: Rest,
                   base_env: dict[str, str]) -> Launch:
    """Everything needed to start the pod's first container as a local process."""
    container = pod["spec"]["containers"][0]
    if not container.get("command"):
        raise LaunchError("CreateContainerError", f"container {container['name']!r} has no command; the process "
                          "kubelet cannot run an image's entrypoint", retry=False)
    volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
    mounts: dict[str, Path] = {}
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount["name"])
        if volume is None:
            raise LaunchError("CreateContainerConfigError", f"volumeMount {mount['name']!r}: no such volume",
                              retry=False)
        local = _materialise(pod, volume, pod_dir, rest)
        mounts[mount["mountPath"]] = local / mount["subPath"] if mount.get("subPath") else local
    env = {k: rewrite(v, mounts) for k, v in resolve_env(pod, container, pod_ip, rest).items()}
    argv = [rewrite(expand(a, env), mounts) for a in [*container["command"], *(container.get("args") or [])]]
    cwd = Path(container["workingDir"]) if container.get("workingDir") else pod_dir
    if not cwd.is_dir():
        cwd = pod_dir
    return Launch(container=container["name"], image=container.get("image", ""), argv=argv,
                  env={**base_env, "HOSTNAME": pod["metadata"]["name"], **env}, cwd=cwd, mounts=mounts,
                  probe=_probe(container))
