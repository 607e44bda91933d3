"""The test bed itself: a real control plane, real controllers and scheduler, the process kubelet, Prometheus.

Nothing here is mocked: the only stand-in is the process kubelet (pods run as local processes,
there is no container runtime on CI), and pods are reached by their pod IP (there is no kube-proxy).
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from typing import Any

from kubernetes import client

from e2e.bed import GPU_RESOURCE, POOL_LABEL, Cluster, ProcessKubelet, scrape_config
from e2e.bed.procs import free_port, wait_until
from e2e.bed.rest import get


def _pod(name: str, argv: list[str], **spec: Any) -> dict[str, Any]:
    """A Pod whose container runs `argv`, with POD_IP from the downward API."""
    container: dict[str, Any] = {"name": "main", "image": "local/process", "command": argv,
                                 "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]}
    container.update(spec.pop("container", {}))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [container], **spec}}


def _apply(cluster: Cluster, namespace: str, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def _get(cluster: Cluster, namespace: str, kind: str, name: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", "-n", namespace, kind, name, "-o", "json").stdout)


def _ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); a zombie's state in /proc is 'Z'.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_control_plane_answers(cluster: Cluster) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["major"] == "1"
    assert cluster.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"

    with cluster.api() as api:
        names = {ns.metadata.name for ns in client.CoreV1Api(api).list_namespace().items}
    assert {"default", "kube-system", "kube-node-lease"} <= names
    # The admin identity really is checked: an anonymous request is refused.
    anonymous = get(f"{cluster.server}/api/v1/namespaces", verify=str(cluster.certs.ca), timeout=5)
    assert anonymous.status_code in (401, 403)


def test_nodes_ready_with_gpu_capacity(cluster: Cluster, gpu_nodes: tuple) -> None:
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    by_name = {n["metadata"]["name"]: n for n in nodes}
    pools: dict[str, int] = {}
    for fake in gpu_nodes:
        node = by_name[fake.name]
        assert node["status"]["allocatable"][GPU_RESOURCE] == "4"
        assert _ready(node)
        pools[node["metadata"]["labels"][POOL_LABEL]] = pools.get(node["metadata"]["labels"][POOL_LABEL], 0) + 1
    assert pools == {"a100": 2, "l40s": 2}

    # The node leases are renewed, as a kubelet's are (else the node-lifecycle controller taints them).
    lease_path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{gpu_nodes[0].name}"
    first = cluster.rest.get(lease_path)["spec"]["renewTime"]
    wait_until(lambda: cluster.rest.get(lease_path)["spec"]["renewTime"] != first, 30, "lease renewal")


def test_gpu_pod_is_scheduled_onto_its_pool_and_serves_on_its_pod_ip(
        cluster: Cluster, gpu_nodes: tuple, kubelet: ProcessKubelet, namespace: str) -> None:
    """Real scheduler (nodeSelector + nvidia.com/gpu), a secret volume rewritten to a local dir, a probe."""
    secret_value = uuid.uuid4().hex
    _apply(cluster, namespace, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "files"},
                                "stringData": {"token.txt": secret_value}})
    port = free_port()
    pod = _pod("web", ["python", "-m", "http.server", str(port), "--bind", "$(POD_IP)", "--directory", "/etc/files"],
               nodeSelector={POOL_LABEL: "l40s"}, volumes=[{"name": "files", "secret": {"secretName": "files"}}],
               container={"resources": {"limits": {GPU_RESOURCE: "1"}},
                          "volumeMounts": [{"name": "files", "mountPath": "/etc/files", "readOnly": True}],
                          "readinessProbe": {"httpGet": {"path": "/token.txt", "port": port}, "periodSeconds": 1}})
    _apply(cluster, namespace, pod)
    wait_until(lambda: _ready(_get(cluster, namespace, "pod", "web")), 60, "pod web Ready")

    got = _get(cluster, namespace, "pod", "web")
    l40s = {n.name for n in gpu_nodes if n.pool == "l40s"}
    assert got["spec"]["nodeName"] in l40s
    assert got["status"]["phase"] == "Running"
    pod_ip = got["status"]["podIP"]
    assert pod_ip.startswith("127.0.") and pod_ip != "127.0.0.1"
    assert get(f"http://{pod_ip}:{port}/token.txt", timeout=5).text == secret_value
    pid = kubelet.pid(namespace, "web")
    assert pid is not None and _alive(pid)


def test_unsatisfiable_gpu_request_stays_pending(cluster: Cluster, gpu_nodes: tuple, namespace: str) -> None:
    """Each fake node has 4 GPUs: a pod asking for 5 is never bound, and the scheduler says why."""
    _apply(cluster, namespace, _pod("greedy", ["python", "-c", "pass"],
                                    container={"resources": {"limits": {GPU_RESOURCE: "5"}}}))

    def unschedulable() -> bool:
        status = _get(cluster, namespace, "pod", "greedy").get("status", {})
        return any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"
                   for c in status.get("conditions", []))

    wait_until(unschedulable, 60, "scheduler marks pod greedy Unschedulable")
    pod = _get(cluster, namespace, "pod", "greedy")
    assert not pod["spec"].get("nodeName")
    assert GPU_RESOURCE in next(c["message"] for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")


def test_deployment_creates_a_running_pod_and_its_deletion_removes_it(
        cluster: Cluster, gpu_nodes: tuple, kubelet: ProcessKubelet, namespace: str) -> None:
    """The deployment and replicaset controllers, the scheduler and the garbage collector all take part."""
    sleep = ["python", "-c", "import time; time.sleep(3600)"]
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "sleeper"},
        "spec": {"replicas": 1, "strategy": {"type": "Recreate"}, "selector": {"matchLabels": {"app": "sleeper"}},
                 "template": {"metadata": {"labels": {"app": "sleeper"}},
                              "spec": {"nodeSelector": {POOL_LABEL: "a100"}, "terminationGracePeriodSeconds": 5,
                                       "containers": [{"name": "main", "image": "local/process",
                                                       "command": sleep}]}}},
    }
    _apply(cluster, namespace, deployment)

    def available() -> bool:
        return _get(cluster, namespace, "deployment", "sleeper").get("status", {}).get("availableReplicas") == 1

    wait_until(available, 90, "deployment sleeper available")
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-l", "app=sleeper", "-o", "json").stdout)
    (pod,) = pods["items"]
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"
    pid = kubelet.pid(namespace, pod["metadata"]["name"])
    assert pid is not None and _alive(pid)

    cluster.kubectl("delete", "deployment", "sleeper", "-n", namespace, "--wait=true")
    wait_until(lambda: not json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"],
               60, "garbage collection of the deployment's pods")
    wait_until(lambda: not _alive(pid), 15, "process of the deleted pod exits")


def test_deleting_a_pod_kills_its_process_even_if_it_ignores_sigterm(
        cluster: Cluster, gpu_nodes: tuple, kubelet: ProcessKubelet, namespace: str) -> None:
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"
    _apply(cluster, namespace, _pod("polite", ["python", "-c", "import time; time.sleep(3600)"]))
    _apply(cluster, namespace, _pod("stubborn", ["python", "-c", stubborn], terminationGracePeriodSeconds=2))
    for name in ("polite", "stubborn"):
        wait_until(lambda name=name: _ready(_get(cluster, namespace, "pod", name)), 60, f"pod {name} Ready")
    pids = {name: kubelet.pid(namespace, name) for name in ("polite", "stubborn")}
    assert all(pid is not None and _alive(pid) for pid in pids.values())

    cluster.kubectl("delete", "pod", "polite", "stubborn", "-n", namespace, "--wait=true", timeout=120)
    for name, pid in pids.items():
        assert pid is not None and not _alive(pid), f"process of pod {name} survived its deletion"
    remaining = cluster.kubectl("get", "pods", "-n", namespace, "-o", "name").stdout.split()
    assert remaining == []


def test_exit_codes_follow_the_restart_policy(cluster: Cluster, gpu_nodes: tuple, namespace: str) -> None:
    _apply(cluster, namespace, _pod("once", ["python", "-c", "raise SystemExit(3)"], restartPolicy="Never"))
    _apply(cluster, namespace, _pod("done", ["python", "-c", "pass"], restartPolicy="OnFailure"))
    _apply(cluster, namespace, _pod("again", ["python", "-c", "raise SystemExit(1)"], restartPolicy="Always"))

    wait_until(lambda: _get(cluster, namespace, "pod", "once")["status"].get("phase") == "Failed", 60, "once Failed")
    wait_until(lambda: _get(cluster, namespace, "pod", "done")["status"].get("phase") == "Succeeded", 60,
               "done Succeeded")
    state = _get(cluster, namespace, "pod", "once")["status"]["containerStatuses"][0]["state"]
    assert state["terminated"]["exitCode"] == 3

    def restarted() -> bool:
        status = _get(cluster, namespace, "pod", "again")["status"]
        return bool(status.get("containerStatuses")) and status["containerStatuses"][0]["restartCount"] >= 2

    wait_until(restarted, 60, "pod again restarted twice")
    status = _get(cluster, namespace, "pod", "again")["status"]
    assert status["phase"] == "Running"
    assert status["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] == 1


def test_service_account_token_authenticates_with_its_rbac(cluster: Cluster, namespace: str, tmp_path: Any) -> None:
    """The token controller mints a Secret for a new ServiceAccount; RBAC then decides what it may do."""
    _apply(cluster, namespace, {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "robot"}})

    def token() -> str:
        sa = _get(cluster, namespace, "serviceaccount", "robot")
        (ref,) = sa["secrets"]
        return str(cluster.kubectl("get", "secret", ref["name"], "-n", namespace, "-o",
                                   "jsonpath={.data.token}").stdout)

    wait_until(lambda: bool(token()), 60, "robot's token Secret")
    kubeconfig = cluster.token_kubeconfig(base64.b64decode(token()).decode(), tmp_path / "robot.kubeconfig",
                                          namespace)

    def as_robot(*args: str) -> Any:
        return cluster.kubectl(f"--kubeconfig={kubeconfig}", *args, check=False)

    assert as_robot("auth", "can-i", "list", "pods").stdout.strip() == "no"
    _apply(cluster, namespace, {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                                "metadata": {"name": "pod-reader"},
                                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]})
    _apply(cluster, namespace, {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                                "metadata": {"name": "robot-reads-pods"},
                                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                            "name": "pod-reader"},
                                "subjects": [{"kind": "ServiceAccount", "name": "robot", "namespace": namespace}]})
    wait_until(lambda: as_robot("auth", "can-i", "list", "pods").stdout.strip() == "yes", 30, "RBAC grant")
    assert as_robot("get", "pods").returncode == 0
    assert as_robot("auth", "can-i", "delete", "pods").stdout.strip() == "no"

    bogus = cluster.token_kubeconfig("not-a-token", tmp_path / "bogus.kubeconfig", namespace)
    refused = cluster.kubectl(f"--kubeconfig={bogus}", "get", "pods", check=False)
    assert refused.returncode != 0 and "Unauthorized" in refused.stderr


def test_prometheus_scrapes_a_pod(cluster: Cluster, gpu_nodes: tuple, namespace: str, prometheus: Any) -> None:
    """A pod serves an exposition file from a ConfigMap volume; the bed's Prometheus scrapes it by pod IP."""
    value = time.time_ns() % 100000
    _apply(cluster, namespace, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "exposition"},
                                "data": {"metrics": f"# TYPE bed_probe_value gauge\nbed_probe_value {value}\n"}})
    port = free_port()
    _apply(cluster, namespace, _pod(
        "exporter", ["python", "-m", "http.server", str(port), "--bind", "$(POD_IP)", "--directory", "/srv/metrics"],
        volumes=[{"name": "exposition", "configMap": {"name": "exposition"}}],
        container={"volumeMounts": [{"name": "exposition", "mountPath": "/srv/metrics"}],
                   "readinessProbe": {"tcpSocket": {"port": port}}}))
    wait_until(lambda: _ready(_get(cluster, namespace, "pod", "exporter")), 60, "pod exporter Ready")
    pod_ip = _get(cluster, namespace, "pod", "exporter")["status"]["podIP"]

    server = prometheus([scrape_config("exporter", [f"{pod_ip}:{port}"])])
    (sample,) = server.wait_for_samples("bed_probe_value", timeout=60)
    assert float(sample["value"][1]) == value
    assert sample["metric"]["instance"] == f"{pod_ip}:{port}"


def test_custom_resources_round_trip(cluster: Cluster) -> None:
    """A CRD is served and a custom object is stored and read back. kube-apiserver 1.20 built with Go 1.19
    crashes on the first custom-object create unless install.sh swapped in Debian's reflect2."""
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.bed.pipeshift.dev"},
        "spec": {"group": "bed.pipeshift.dev", "scope": "Namespaced",
                 "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                     "type": "object", "properties": {"spec": {"type": "object", "properties": {
                         "size": {"type": "integer", "minimum": 1}}}}}}}]},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(crd))
    cluster.kubectl("wait", "--for=condition=Established", "crd/widgets.bed.pipeshift.dev", "--timeout=60s")
    widget = {"apiVersion": "bed.pipeshift.dev/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 3}}
    wait_until(lambda: cluster.kubectl("apply", "-n", "default", "-f", "-", input=json.dumps(widget),
                                       check=False).returncode == 0, 30, "first Widget create")
    assert _get(cluster, "default", "widget", "w")["spec"] == {"size": 3}
    rejected = cluster.kubectl("apply", "-n", "default", "-f", "-", check=False,
                               input=json.dumps({**widget, "spec": {"size": 0}}))
    assert rejected.returncode != 0 and "spec.size" in rejected.stderr
    assert cluster.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    assert all(proc.running() for proc in cluster.procs)
    cluster.kubectl("delete", "crd", "widgets.bed.pipeshift.dev")


def _waiting(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    statuses = _get(cluster, namespace, "pod", name).get("status", {}).get("containerStatuses") or [{}]
    return dict(statuses[0].get("state", {}).get("waiting") or {})


def test_env_sources_and_specs_the_bed_cannot_run(
        cluster: Cluster, gpu_nodes: tuple, kubelet: ProcessKubelet, namespace: str) -> None:
    """The kubelet's env sources (downward API, Secret and ConfigMap keys, $(VAR)); a missing Secret holds
    the pod in CreateContainerConfigError until it appears; specs the bed cannot run say why."""
    names = ["POD_IP", "POD_NAME", "NS", "TOKEN", "COLOR", "GREETING"]
    show = f"import json, os, time; print(json.dumps({{k: os.environ.get(k) for k in {names!r}}}), flush=True); " \
           "time.sleep(3600)"
    _apply(cluster, namespace, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
                                "data": {"color": "teal"}})
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
           {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "late", "key": "token"}}},
           {"name": "COLOR", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "color"}}},
           {"name": "GREETING", "value": "hi $(POD_NAME)"}]
    pod = _pod("envy", ["python", "-c", show], restartPolicy="Never")
    pod["spec"]["containers"][0]["env"] += env
    _apply(cluster, namespace, pod)
    wait_until(lambda: _waiting(cluster, namespace, "envy").get("reason") == "CreateContainerConfigError", 60,
               "envy waits for its Secret")
    assert "late" in _waiting(cluster, namespace, "envy")["message"]

    _apply(cluster, namespace, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "late"},
                                "stringData": {"token": "s3cret"}})
    wait_until(lambda: _ready(_get(cluster, namespace, "pod", "envy")), 60, "envy Ready once its Secret exists")
    wait_until(lambda: kubelet.logs(namespace, "envy").strip().endswith("}"), 30, "envy prints its env")
    seen = json.loads(kubelet.logs(namespace, "envy").strip().splitlines()[-1])
    pod_ip = _get(cluster, namespace, "pod", "envy")["status"]["podIP"]
    assert seen == {"POD_IP": pod_ip, "POD_NAME": "envy", "NS": namespace, "TOKEN": "s3cret", "COLOR": "teal",
                    "GREETING": "hi envy"}

    no_command = _pod("entrypoint", [])
    del no_command["spec"]["containers"][0]["command"]
    nfs = _pod("nfs", ["python", "-c", "pass"], volumes=[{"name": "share", "nfs": {"server": "nas", "path": "/"}}],
               container={"volumeMounts": [{"name": "share", "mountPath": "/share"}]})
    _apply(cluster, namespace, no_command)
    _apply(cluster, namespace, nfs)
    wait_until(lambda: _waiting(cluster, namespace, "entrypoint").get("reason") == "CreateContainerError", 60,
               "entrypoint refused")
    wait_until(lambda: _waiting(cluster, namespace, "nfs").get("reason") == "CreateContainerConfigError", 60,
               "nfs volume refused")
    assert "no command" in _waiting(cluster, namespace, "entrypoint")["message"]
    assert "'share'" in _waiting(cluster, namespace, "nfs")["message"]
    assert _get(cluster, namespace, "pod", "nfs")["status"]["phase"] == "Pending"
