"""The Kubernetes test bed: a real control plane on loopback, fake GPU nodes, a process kubelet, Prometheus.

`make e2e-tools` (install.sh) provides the binaries; `e2e/conftest.py` turns these pieces into
pytest fixtures. See docs/e2e.md for what the bed is and is not.
"""

from e2e.bed.control_plane import Cluster
from e2e.bed.kubelet import ProcessKubelet
from e2e.bed.nodes import DEFAULT_NODES, GPU_LABEL, GPU_RESOURCE, POOL_LABEL, FakeNode
from e2e.bed.procs import BedError
from e2e.bed.prometheus import Prometheus, scrape_config

__all__ = ["DEFAULT_NODES", "GPU_LABEL", "GPU_RESOURCE", "POOL_LABEL", "BedError", "Cluster", "FakeNode",
           "ProcessKubelet", "Prometheus", "scrape_config"]
