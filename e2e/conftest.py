"""Fixtures of the Kubernetes test bed (session-scoped unless said otherwise).

- `cluster`: etcd + kube-apiserver + kube-controller-manager + kube-scheduler on loopback
  (`.kubeconfig`, `.server`, `.kubectl(*args)`, `.api()`, `.rest`, `.env`, `.token_kubeconfig()`).
- `kubelet`: the process kubelet running the fake GPU nodes' pods as local processes.
- `gpu_nodes`: the fake nodes (two pools, `nvidia.com/gpu` capacity), Ready and schedulable.
- `helm`: path of the Helm 3 binary (run it with `env=cluster.env`).
- `prometheus` (function): `prometheus(scrape_configs) -> Prometheus`, stopped after the test.
- `namespace` (function): a fresh namespace whose default ServiceAccount has its token.
Binaries come from `make e2e-tools`; without them the fixtures fail, saying so. Every test here is
marked `e2e`. When a test fails, the control plane's and the pods' log tails join its report.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.bed import Cluster, FakeNode, ProcessKubelet, Prometheus
from e2e.bed.paths import binary
from e2e.bed.procs import wait_until
from e2e.bed.rest import ApiError

_E2E_DIR = Path(__file__).parent
_RUNNING: dict[str, Any] = {}
_TIMINGS: dict[str, float] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: runs on the Kubernetes test bed (make e2e)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _E2E_DIR in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and _E2E_DIR in item.path.parents:
        for name, thing in _RUNNING.items():
            report.sections.append((f"bed: {name}", thing.describe()))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _TIMINGS:
        terminalreporter.write_line("bed start-up: " + ", ".join(f"{k} {v:.1f} s" for k, v in _TIMINGS.items()))


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    bed = Cluster(tmp_path_factory.mktemp("bed"))
    bed.start()
    _TIMINGS["control plane"] = bed.start_seconds["total"]
    _RUNNING["control plane"] = bed
    try:
        yield bed
    finally:
        _RUNNING.pop("control plane", None)
        bed.stop()


@pytest.fixture(scope="session")
def kubelet(cluster: Cluster) -> Iterator[ProcessKubelet]:
    runner = ProcessKubelet(cluster.rest, cluster.workdir / "kubelet").start()
    _RUNNING["process kubelet"] = runner
    try:
        yield runner
    finally:
        _RUNNING.pop("process kubelet", None)
        runner.stop()


@pytest.fixture(scope="session")
def gpu_nodes(cluster: Cluster, kubelet: ProcessKubelet) -> tuple[FakeNode, ...]:
    """The nodes once Ready and free of the not-ready taint (the node-lifecycle controller lifts it)."""

    def schedulable() -> bool:
        for node in kubelet.nodes:
            obj = cluster.rest.get(f"/api/v1/nodes/{node.name}")
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in obj["status"].get("conditions", []))
            if not ready or obj["spec"].get("taints"):
                return False
        return True

    wait_until(schedulable, 60, "fake GPU nodes Ready without taints")
    _TIMINGS["nodes registered and schedulable"] = time.monotonic() - kubelet.started
    return kubelet.nodes


@pytest.fixture(scope="session")
def helm() -> Path:
    return binary("helm")


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[..., Prometheus]]:
    started: list[Prometheus] = []

    def start(scrape_configs: list[dict[str, Any]], interval: str = "1s") -> Prometheus:
        server = Prometheus(tmp_path / f"prometheus-{len(started)}", scrape_configs, interval)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace, ready for pods: the ServiceAccount admission plugin of 1.20 rejects pods until
    the namespace's `default` ServiceAccount has its token Secret. Deleted afterwards; waits (bounded)
    for its pods to go, so one test's processes do not outlive it."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    cluster.rest.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def token_ready() -> bool:
        sa = cluster.rest.get(f"/api/v1/namespaces/{name}/serviceaccounts/default")
        return bool(sa.get("secrets"))

    wait_until(token_ready, 60, f"default ServiceAccount token in namespace {name}")
    try:
        yield name
    finally:
        try:
            cluster.rest.delete(f"/api/v1/namespaces/{name}")
        except ApiError as exc:
            if exc.status != 404:
                raise
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _pods_left(cluster, name):
            time.sleep(0.5)


def _pods_left(cluster: Cluster, namespace: str) -> bool:
    try:
        return bool(cluster.rest.get(f"/api/v1/namespaces/{namespace}/pods")["items"])
    except ApiError as exc:
        if exc.status == 404:
            return False
        raise

