"""The process kubelet: the test bed's stand-in for the kubelet, running pods as local processes.

The bed has no container runtime and no real kubelet (CI has no Docker), yet the operator must see
pods scheduled by the real scheduler become Running and Ready, die, and be deleted. This harness
does a kubelet's part of that contract for the fake GPU nodes (nodes.py):
- registers the nodes and keeps them Ready: every few seconds it renews each node's Lease in
  kube-node-lease and its Ready condition's heartbeat, so the node-lifecycle controller (which
  runs in the bed) neither taints them nor evicts their pods;
- lists the pods bound to its nodes a few times a second (polling is simpler than a watch and
  cheap at test scale) and starts each one's first container as a local process (podspec.py says
  what of the spec is honoured), with its own pod IP 127.0.x.y on loopback;
- keeps pod status true: Pending → Running with podIP, startTime, conditions and containerStatuses;
  Ready follows the readiness probe (polled about every second, faster than periodSeconds so
  tests do not wait) or, without a probe, the process running; an exit restarts the process per
  restartPolicy (Always/OnFailure, with a short capped backoff) or ends the pod Succeeded/Failed;
- finishes deletions: when deletionTimestamp is set it sends SIGTERM, SIGKILL after the grace
  period, then deletes the pod with grace 0, as the kubelet does; a pod that vanished (force
  deletion) has its process killed.
Not done: init containers, containers after the first, liveness/startup probes, `kubectl logs`
and `exec` (read a pod's output with `ProcessKubelet.logs()`), kubelet Events, resource isolation.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from e2e.bed.nodes import DEFAULT_NODES, FakeNode, lease_object, node_object, node_status, now, now_micro
from e2e.bed.paths import venv_bin
from e2e.bed.podspec import Launch, LaunchError, resolve_launch
from e2e.bed.procs import Managed, tail
from e2e.bed.rest import STRATEGIC_PATCH, ApiError, Rest
from e2e.bed.rest import get as http_get

SYNC_INTERVAL = 0.25
HEARTBEAT_INTERVAL = 5.0
PROBE_INTERVAL = 1.0
MAX_BACKOFF = 10.0
ORPHAN_GRACE = 5.0


class PodIPs:
    """Hands out 127.0.x.y addresses, never twice, starting at a random x so parallel beds rarely share one."""

    def __init__(self) -> None:
        self._x = random.randint(1, 200)
        self._y = 0

    def next(self) -> str:
        self._y += 1
        if self._y > 254:
            self._x, self._y = self._x % 254 + 1, 1
        return f"127.0.{self._x}.{self._y}"


@dataclass
class PodRun:
    """What the kubelet knows about one pod it runs."""

    uid: str
    namespace: str
    name: str
    pod_ip: str
    directory: Path
    launch: Launch | None = None
    proc: Managed | None = None
    started_at: str = ""
    container_started_at: str = ""
    ready: bool = False
    probe_ok: int = 0
    probe_fail: int = 0
    next_probe: float = 0.0
    restarts: int = 0
    backoff_until: float = 0.0
    retry_launch_at: float = 0.0
    waiting: tuple[str, str] | None = ("ContainerCreating", "")
    terminated: dict[str, Any] | None = None
    last_terminated: dict[str, Any] | None = None
    phase: str = "Pending"
    kill_at: float | None = None
    last_status: dict[str, Any] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.directory / "container.log"


class ProcessKubelet:
    """Runs the pods bound to `nodes` as local processes; see the module docstring."""

    def __init__(self, rest: Rest, workdir: Path, nodes: tuple[FakeNode, ...] = DEFAULT_NODES,
                 extra_env: dict[str, str] | None = None) -> None:
        self.rest = rest
        self.workdir = workdir
        self.nodes = nodes
        self._names = {n.name for n in nodes}
        self._ips = PodIPs()
        self._runs: dict[str, PodRun] = {}
        self._orphans: list[tuple[Managed, float]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.errors: list[str] = []
        self.started = 0.0
        path = f"{venv_bin()}{os.pathsep}{os.environ.get('PATH', '/usr/local/bin:/usr/bin:/bin')}"
        self.base_env = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8",
                         **(extra_env or {})}

    # --- lifecycle ---
    def start(self) -> ProcessKubelet:
        self.started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            self._register(node)
        for target in (self._heartbeat_loop, self._sync_loop):
            thread = threading.Thread(target=target, name=f"kubelet-{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop the loops, then every pod process (SIGTERM to all, SIGKILL after 5 s)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)
        with self._lock:
            procs = [run.proc for run in self._runs.values() if run.proc] + [p for p, _ in self._orphans]
        for proc in procs:
            proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in procs:
            proc.stop(grace=max(0.1, deadline - time.monotonic()))

    # --- what tests can ask ---
    def logs(self, namespace: str, name: str) -> str:
        """The output of the pod's process (the bed's `kubectl logs`)."""
        with self._lock:
            runs = [r for r in self._runs.values() if (r.namespace, r.name) == (namespace, name)]
        return runs[-1].log.read_text(errors="replace") if runs and runs[-1].log.exists() else ""

    def pid(self, namespace: str, name: str) -> int | None:
        """The pid of the pod's running process, if any."""
        with self._lock:
            for run in self._runs.values():
                if (run.namespace, run.name) == (namespace, name) and run.proc and run.proc.running():
                    return run.proc.pid
        return None

    def describe(self, lines: int = 20) -> str:
        with self._lock:
            runs = list(self._runs.values())
        parts = [f"--- pod {r.namespace}/{r.name} ip {r.pod_ip} phase {r.phase} ready {r.ready} "
                 f"restarts {r.restarts} ---\n{tail(r.log, lines)}" for r in runs]
        return "\n".join(parts + [f"kubelet error: {e}" for e in self.errors[-10:]])

    # --- nodes ---
    def _register(self, node: FakeNode) -> None:
        try:
            created = self.rest.post("/api/v1/nodes", node_object(node))
        except ApiError as exc:
            if exc.status != 409:
                raise
            created = self.rest.patch(f"/api/v1/nodes/{node.name}", {"metadata": {"labels": node.labels}})
        self._heartbeat(node, created["metadata"]["uid"])

    def _heartbeat(self, node: FakeNode, uid: str | None = None) -> None:
        self.rest.patch(f"/api/v1/nodes/{node.name}/status", {"status": node_status(node)})
        lease = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node.name}"
        try:
            self.rest.patch(lease, {"spec": {"renewTime": now_micro(), "holderIdentity": node.name}})
        except ApiError as exc:
            if exc.status != 404:
                raise
            uid = uid or self.rest.get(f"/api/v1/nodes/{node.name}")["metadata"]["uid"]
            self.rest.post("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", lease_object(node, uid))

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL):
            for node in self.nodes:
                self._guard(self._heartbeat, node)

    # --- pods ---
    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            self._guard(self._sync)
            self._stop.wait(SYNC_INTERVAL)

    def _guard(self, fn: Any, *args: Any) -> None:
        """A loop must survive API hiccups; errors are kept for failure reports."""
        try:
            fn(*args)
        except Exception as exc:
            self.errors.append(f"{getattr(fn, '__name__', fn)}: {exc!r}")
            del self.errors[:-50]

    def _sync(self) -> None:
        pods = self.rest.get("/api/v1/pods", fieldSelector="spec.nodeName!=")["items"]
        mine = {p["metadata"]["uid"]: p for p in pods if p["spec"].get("nodeName") in self._names}
        for pod in mine.values():
            self._guard(self._sync_pod, pod)
        with self._lock:
            gone = [uid for uid in self._runs if uid not in mine]
            for uid in gone:
                run = self._runs.pop(uid)
                if run.proc and run.proc.running():
                    run.proc.signal(signal.SIGTERM)
                    self._orphans.append((run.proc, time.monotonic() + ORPHAN_GRACE))
            still = []
            for proc, kill_at in self._orphans:
                if proc.running() and time.monotonic() > kill_at:
                    proc.stop(grace=0.5)
                elif proc.running():
                    still.append((proc, kill_at))
            self._orphans = still

    def _sync_pod(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        with self._lock:
            run = self._runs.get(uid)
        if meta.get("deletionTimestamp"):
            self._terminate(pod, run)
            return
        if run is None:
            if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                return  # finished before this kubelet started
            run = PodRun(uid, meta["namespace"], meta["name"], self._ips.next(),
                         self.workdir / meta["namespace"] / f"{meta['name']}-{uid[:8]}", started_at=now())
            run.directory.mkdir(parents=True, exist_ok=True)
            with self._lock:
                self._runs[uid] = run
        if run.phase in ("Succeeded", "Failed"):
            return
        self._supervise(pod, run)
        status = self._status(pod, run)
        if status != run.last_status:
            self.rest.patch(f"/api/v1/namespaces/{run.namespace}/pods/{run.name}/status", {"status": status},
                            content_type=STRATEGIC_PATCH)
            run.last_status = status

    def _supervise(self, pod: dict[str, Any], run: PodRun) -> None:
        """Start, restart, finish and probe the pod's process."""
        clock = time.monotonic()
        if run.proc is None or not run.proc.running():
            if run.proc is not None:
                self._exited(pod, run)
                if run.phase in ("Succeeded", "Failed"):
                    return
            if clock >= run.backoff_until and clock >= run.retry_launch_at:
                self._launch(pod, run)
            return
        if run.launch and run.launch.probe:
            self._probe(run, clock)
        else:
            run.ready = True

    def _launch(self, pod: dict[str, Any], run: PodRun) -> None:
        try:
            run.launch = resolve_launch(pod, run.pod_ip, run.directory, self.rest, self.base_env)
        except LaunchError as exc:
            # As a kubelet does, the pod stays Pending with the reason in its container's waiting state;
            # a missing Secret or ConfigMap may yet appear, a spec the bed cannot run never will.
            run.waiting = (exc.reason, exc.message)
            run.retry_launch_at = time.monotonic() + 2 if exc.retry else float("inf")
            return
        launch = run.launch
        with open(run.log, "ab") as out:
            out.write(f"[process kubelet] {' '.join(launch.argv)}\n".encode())
        try:
            run.proc = Managed(f"pod {run.namespace}/{run.name}", launch.argv, run.log, env=launch.env, cwd=launch.cwd)
        except OSError as exc:
            run.proc = None
            run.last_terminated = {"exitCode": 128, "reason": "StartError", "message": str(exc),
                                   "startedAt": now(), "finishedAt": now()}
            self._after_exit(pod, run, 128, run.last_terminated)
            return
        run.phase, run.waiting, run.terminated = "Running", None, None
        run.container_started_at = now()
        run.ready = False
        run.probe_ok = run.probe_fail = 0
        run.next_probe = time.monotonic() + (launch.probe.initial_delay if launch.probe else 0)

    def _exited(self, pod: dict[str, Any], run: PodRun) -> None:
        assert run.proc is not None
        code = run.proc.proc.returncode
        if code < 0:  # killed by a signal: report it as a container runtime does, 128 + signal
            code = 128 - code
        state = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                 "startedAt": run.container_started_at, "finishedAt": now()}
        run.proc = None
        run.ready = False
        self._after_exit(pod, run, code, state)

    def _after_exit(self, pod: dict[str, Any], run: PodRun, code: int, state: dict[str, Any]) -> None:
        policy = pod["spec"].get("restartPolicy", "Always")
        if policy == "Always" or (policy == "OnFailure" and code != 0):
            run.last_terminated = state
            run.restarts += 1
            delay = min(MAX_BACKOFF, 2.0 ** (run.restarts - 1))
            run.backoff_until = time.monotonic() + delay
            run.waiting = ("CrashLoopBackOff", f"back-off {delay:.0f}s restarting failed container")
        else:
            run.terminated = state
            run.phase = "Succeeded" if code == 0 else "Failed"

    def _probe(self, run: PodRun, clock: float) -> None:
        assert run.launch is not None and run.launch.probe is not None
        if clock < run.next_probe:
            return
        run.next_probe = clock + PROBE_INTERVAL
        probe = run.launch.probe
        ok = _run_probe(probe, run.pod_ip, run.launch)
        if ok:
            run.probe_ok, run.probe_fail = run.probe_ok + 1, 0
            if run.probe_ok >= probe.success_threshold:
                run.ready = True
        else:
            run.probe_ok, run.probe_fail = 0, run.probe_fail + 1
            if run.probe_fail >= probe.failure_threshold or not run.ready:
                run.ready = False

    def _terminate(self, pod: dict[str, Any], run: PodRun | None) -> None:
        """Graceful deletion: SIGTERM, SIGKILL after the grace period, then remove the pod object."""
        meta = pod["metadata"]
        if run is not None and run.proc is not None and run.proc.running():
            if run.kill_at is None:
                grace = meta.get("deletionGracePeriodSeconds")
                run.kill_at = time.monotonic() + (30 if grace is None else int(grace))
                run.proc.signal(signal.SIGTERM)
                return
            if time.monotonic() < run.kill_at:
                return
            run.proc.stop(grace=0.5)
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                "preconditions": {"uid": meta["uid"]}}
        try:
            self.rest.delete(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", body)
        except ApiError as exc:
            if exc.status not in (404, 409):
                raise
        with self._lock:
            self._runs.pop(meta["uid"], None)

    def _status(self, pod: dict[str, Any], run: PodRun) -> dict[str, Any]:
        """The PodStatus this kubelet reports (timestamps only change with state, so unchanged → no patch)."""
        container = pod["spec"]["containers"][0]
        ready = run.ready and run.phase == "Running" and run.proc is not None
        if run.terminated is not None:
            state: dict[str, Any] = {"terminated": run.terminated}
        elif run.waiting is not None:
            state = {"waiting": {"reason": run.waiting[0], **({"message": run.waiting[1]} if run.waiting[1] else {})}}
        else:
            state = {"running": {"startedAt": run.container_started_at}}
        container_status: dict[str, Any] = {
            "name": container["name"], "image": container.get("image", ""), "imageID": "",
            "ready": ready, "started": run.proc is not None, "restartCount": run.restarts, "state": state,
            "lastState": {"terminated": run.last_terminated} if run.last_terminated else {},
        }
        if run.proc is not None:
            container_status["containerID"] = f"process://{run.proc.pid}"
        stamp = pod.get("status", {}).get("startTime") or run.started_at
        flag = "True" if ready else "False"
        conditions = [
            {"type": "Initialized", "status": "True", "lastTransitionTime": stamp},
            {"type": "Ready", "status": flag, "lastTransitionTime": self._transition(pod, "Ready", flag)},
            {"type": "ContainersReady", "status": flag,
             "lastTransitionTime": self._transition(pod, "ContainersReady", flag)},
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp},
        ]
        return {"phase": run.phase, "hostIP": "127.0.0.1", "podIP": run.pod_ip, "podIPs": [{"ip": run.pod_ip}],
                "startTime": stamp, "conditions": conditions, "containerStatuses": [container_status],
                "qosClass": pod.get("status", {}).get("qosClass", "BestEffort")}

    @staticmethod
    def _transition(pod: dict[str, Any], kind: str, status: str) -> str:
        for cond in pod.get("status", {}).get("conditions") or []:
            if cond.get("type") == kind and cond.get("status") == status and cond.get("lastTransitionTime"):
                return str(cond["lastTransitionTime"])
        return now()


def _run_probe(probe: Any, pod_ip: str, launch: Launch) -> bool:
    timeout = min(probe.timeout, 1.0)
    try:
        if probe.kind == "httpGet":
            scheme = probe.scheme.lower()
            response = http_get(f"{scheme}://{pod_ip}:{probe.port}{probe.path}", timeout=timeout, verify=False)
            return 200 <= response.status_code < 400
        if probe.kind == "tcpSocket":
            with socket.create_connection((pod_ip, probe.port), timeout=timeout):
                return True
        result = subprocess.run(list(probe.command), env=launch.env, cwd=launch.cwd, capture_output=True,
                                timeout=max(1.0, probe.timeout))
        return result.returncode == 0
    except (OSError, requests.RequestException, subprocess.TimeoutExpired):
        return False
