"""The bed's fake GPU nodes: two heterogeneous pools, as Node objects with `nvidia.com/gpu` capacity.

There is no real kubelet, so nothing would ever register a Node; the bed creates them, and the
process kubelet (kubelet.py) keeps them Ready. GPU names are catalogue keys of
`pipeshift/placement/catalogue.py`, so a pool's `gpu` and its nodes' label agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

POOL_LABEL = "pipeshift.dev/pool"
GPU_LABEL = "pipeshift.dev/gpu"
GPU_RESOURCE = "nvidia.com/gpu"
KUBELET_VERSION = "v1.20.2-pipeshift-process-kubelet"


@dataclass(frozen=True)
class FakeNode:
    name: str
    pool: str
    gpu: str
    gpus: int = 4
    cpu: str = "16"
    memory: str = "64Gi"
    pods: str = "110"
    extra_labels: dict[str, str] = field(default_factory=dict)

    @property
    def capacity(self) -> dict[str, str]:
        return {"cpu": self.cpu, "memory": self.memory, "pods": self.pods, GPU_RESOURCE: str(self.gpus)}

    @property
    def labels(self) -> dict[str, str]:
        return {"kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                POOL_LABEL: self.pool, GPU_LABEL: self.gpu, "nvidia.com/gpu.product": self.gpu, **self.extra_labels}


# The contract's two pools: 2 nodes each.
DEFAULT_NODES: tuple[FakeNode, ...] = (
    FakeNode("gpu-a100-0", "a100", "a100-80gb"),
    FakeNode("gpu-a100-1", "a100", "a100-80gb"),
    FakeNode("gpu-l40s-0", "l40s", "l40s"),
    FakeNode("gpu-l40s-1", "l40s", "l40s"),
)


def now() -> str:
    """RFC 3339 UTC, second precision, as the API server's metav1.Time wants."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    """RFC 3339 with microseconds, as metav1.MicroTime (Lease renewTime) wants."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def node_status(node: FakeNode, ready: bool = True) -> dict[str, Any]:
    """A kubelet-like NodeStatus: capacity == allocatable, Ready with a fresh heartbeat."""
    stamp = now()
    conditions = [
        {"type": t, "status": "False", "reason": f"KubeletHas{r}", "message": "process kubelet",
         "lastHeartbeatTime": stamp, "lastTransitionTime": stamp}
        for t, r in (("MemoryPressure", "SufficientMemory"), ("DiskPressure", "NoDiskPressure"),
                     ("PIDPressure", "SufficientPID"))
    ]
    conditions.append({"type": "Ready", "status": "True" if ready else "False",
                       "reason": "KubeletReady" if ready else "KubeletNotReady",
                       "message": "process kubelet is posting ready status", "lastHeartbeatTime": stamp,
                       "lastTransitionTime": stamp})
    return {
        "capacity": node.capacity, "allocatable": node.capacity, "conditions": conditions,
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": node.name}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        "nodeInfo": {"machineID": node.name, "systemUUID": node.name, "bootID": node.name,
                     "kernelVersion": "", "osImage": "pipeshift test bed", "containerRuntimeVersion": "process://",
                     "kubeletVersion": KUBELET_VERSION, "kubeProxyVersion": "", "operatingSystem": "linux",
                     "architecture": "amd64"},
    }


def node_object(node: FakeNode) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name, "labels": node.labels},
            "spec": {}, "status": node_status(node)}


def lease_object(node: FakeNode, uid: str) -> dict[str, Any]:
    """The node's heartbeat Lease in kube-node-lease, owned by the Node as a kubelet's is."""
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": node.name, "namespace": "kube-node-lease",
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node.name, "uid": uid}]},
            "spec": {"holderIdentity": node.name, "leaseDurationSeconds": 40, "renewTime": now_micro()}}
