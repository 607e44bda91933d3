"""A namespace with a running operator and a pipeline serving two stages, for the scenarios that stop the
operator in a phase of a live change (a restart, a stage pod deleted meanwhile) and check that the change
then finishes or rolls back: the bed, and the restart that waits for it to settle."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from e2e.bed import Cluster
from e2e.bed.procs import wait_until
from e2e.operator_proc import LoadGenerator, OperatorProcess, installed_chart, settled_committed
from e2e.test_live_change import MAX_TOKENS, PROMPTS, serve_two_stages
from e2e.test_pinned_pipeline import LAYERS, _pipeline_obj, _reference

TWO = {"stages": [{"pool": "a100", "layers": [0, 2]}, {"pool": "l40s", "layers": [2, LAYERS]}]}


def summary(layout: dict[str, Any]) -> str:
    return ",".join(f"{s['pool']}:{s['layers'][0]}-{s['layers'][1]}" for s in layout["stages"])


class Bed:
    def __init__(self, cluster: Cluster, namespace: str, name: str, operator: OperatorProcess,
                 expected: list[list[int]]) -> None:
        self.cluster, self.namespace, self.name, self.operator = cluster, namespace, name, operator
        self.expected = expected

    def status(self) -> dict[str, Any]:
        return _pipeline_obj(self.cluster, self.namespace, self.name).get("status", {})

    def pod(self, name: str) -> dict[str, Any] | None:
        found = self.cluster.rest.get(f"/api/v1/namespaces/{self.namespace}/pods",
                                      fieldSelector=f"metadata.name={name}")["items"]
        return found[0] if found else None


@contextmanager
def serving_bed(cluster: Cluster, helm: Path, model: Path, work: Path, name: str) -> Iterator[Bed]:
    """One namespace, one operator (restarted by the tests), one pipeline `name` serving two stages."""
    namespace = f"e2e-{uuid.uuid4().hex[:8]}"
    cluster.rest.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    wait_until(lambda: bool(cluster.rest.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/default").get("secrets")),
               60, "the namespace's default ServiceAccount token")
    with installed_chart(cluster, helm, work) as kubeconfig:
        operator = OperatorProcess(cluster, kubeconfig, work).start()
        try:
            serve_two_stages(cluster, namespace, name, model, operator)
            yield Bed(cluster, namespace, name, operator, _reference(model, PROMPTS, MAX_TOKENS))
        finally:
            # While the operator runs: its finalizer removes the children, then lets the pipeline go.
            if operator.proc is None or not operator.proc.running():  # no one left to run the finalizer
                cluster.kubectl("patch", "llmp", name, "-n", namespace, "--type=merge", "-p",
                                '{"metadata":{"finalizers":null}}', check=False)
            cluster.kubectl("delete", "llmp", name, "-n", namespace, "--timeout=60s", check=False, timeout=90)
            operator.stop()
            cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def restart_until_settled(bed: Bed, target: dict[str, Any], load: LoadGenerator, timeout_s: float, why: str) -> None:
    """Start the (exited) operator again, wait until the change to `target` is committed and settled, then
    until the load has answers through the new layout."""
    bed.operator.proc = None
    bed.operator.start()

    def settled() -> bool:
        s = bed.status()
        return settled_committed(s) and s.get("layoutSummary") == summary(target)

    wait_until(settled, timeout_s, f"the change to {summary(target)} finished {why}", watch=[bed.operator.proc],
               interval=0.3)
    served_at_end = load.served()
    wait_until(lambda: load.served() >= served_at_end + 4, 120, "answers through the new layout")
