"""Deleting an LLMPipeline while the operator's periodic re-check is in the middle of a pass.

kopf keeps its finalizer on the object until the object's timers have exited, and it looks again at a
timer still running at deletion only after `settings.background.cancellation_polling` (kopf's default:
60 s). A re-check pass is short, but one that overlapped a `kubectl delete` held the object (and the
kubectl waiting on it) for a minute. Here the overlap is forced: the test holds the pipeline's lock for four
re-check intervals before it deletes, so a timer pass is waiting on that lock when the delete arrives and
ends only after the test lets go (without the fix, this test fails: the object is still there 30 s later).

The operator runs in this process (kopf in a thread, against the bed's real API server, as the chart's
ServiceAccount) so that the test can hold that lock; nothing is mocked.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import kopf
import pytest
from kubernetes import config
from kubernetes.config import kube_config

from e2e.bed import Cluster
from e2e.bed.procs import wait_until
from e2e.bed.rest import ApiError
from e2e.test_pinned_pipeline import _apply, _pipeline, _pipeline_obj, installed_chart, tiny_model  # noqa: F401
from pipeshift.operator.handlers import PipelineOperator, build_registry, settings
from pipeshift.operator.kube import Kube
from pipeshift.operator.metrics import OperatorMetrics

RECHECK_SECONDS = 0.5


def test_a_pipeline_deleted_while_a_recheck_pass_runs_is_released_when_the_pass_ends(
    cluster: Cluster, helm: Path, namespace: str, tiny_model: Path, tmp_path: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with installed_chart(cluster, helm, tmp_path) as kubeconfig:
        api = config.new_client_from_config(config_file=str(kubeconfig))
        op = PipelineOperator(Kube(api), OperatorMetrics())
        stop, ready = threading.Event(), threading.Event()

        # kopf's login (`kopf.login_via_client`) loads the client library's default kubeconfig: this one.
        monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        thread = threading.Thread(target=kopf.run, daemon=True, kwargs={
            "registry": build_registry(op, RECHECK_SECONDS), "settings": settings("e2e"), "standalone": True,
            "clusterwide": False, "namespaces": [namespace], "ready_flag": ready, "stop_flag": stop})
        thread.start()
        try:
            assert ready.wait(60), "kopf did not start"
            # A pipeline the operator refuses (a typo in a pool name): it holds the finalizer and creates nothing.
            name = "held"
            body = _pipeline(name, tiny_model, "none")
            del body["spec"]["policy"]
            body["spec"]["layout"]["stages"][1]["pool"] = "l4O"
            _apply(cluster, namespace, body)
            wait_until(lambda: _pipeline_obj(cluster, namespace, name).get("status", {}).get("phase") == "Failed",
                       60, f"LLMPipeline {name} Failed")
            assert "pipeshift.dev/cleanup" in _pipeline_obj(cluster, namespace, name)["metadata"]["finalizers"]

            with op._lock(namespace, name):  # the next re-check pass blocks here, then the delete arrives
                time.sleep(4 * RECHECK_SECONDS)
                cluster.kubectl("delete", "llmp", name, "-n", namespace, "--wait=false")
                wait_until(lambda: bool(_pipeline_obj(cluster, namespace, name)["metadata"].get("deletionTimestamp")),
                           30, "the deletion timestamp")
                time.sleep(2.0)  # kopf has seen the deletion and found the timer still running
                assert _pipeline_obj(cluster, namespace, name)["metadata"]["finalizers"]

            # kopf's default would look at the timer again a minute later; ours within seconds.
            wait_until(lambda: _gone(cluster, namespace, name), 30, f"LLMPipeline {name} gone after the pass ended")
            assert op.metrics.reconciles.value(outcome="invalid") >= 1
        finally:
            stop.set()
            thread.join(30)
        assert not thread.is_alive(), "kopf did not stop"


def _gone(cluster: Cluster, namespace: str, name: str) -> bool:
    try:
        _pipeline_obj(cluster, namespace, name)
    except ApiError as error:
        if error.status == 404:
            return True
        raise
    return False
