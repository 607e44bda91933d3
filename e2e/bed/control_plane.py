"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.

Why not kind: CI has no Docker engine and no registry. The binaries come from `make e2e-tools`;
every daemon binds 127.0.0.1 on a port the kernel picked (several beds can run side by side), keeps
its data and log in the bed's work dir, and is checked ready by polling its health endpoint.
There is no kubelet and no kube-proxy: `kubelet.ProcessKubelet` stands in for the kubelet, and
tests reach pods by their pod IP.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from e2e.bed import paths
from e2e.bed.certs import Certs, make_certs
from e2e.bed.procs import BedError, Managed, free_port, wait_until
from e2e.bed.rest import Rest, local_session
from e2e.bed.rest import get as rest_get

SERVICE_CIDR = "10.0.0.0/24"
# What the bed's controller-manager runs. nodelifecycle stays on (the process kubelet keeps the
# fake nodes' leases and Ready condition fresh, as a kubelet would); cloud, storage and CSR
# controllers are left out because nothing in the bed needs them and the machine has 2 cores.
CONTROLLERS = ("deployment", "replicaset", "statefulset", "job", "daemonset", "serviceaccount",
               "serviceaccount-token", "garbagecollector", "namespace", "endpoint", "endpointslice", "podgc",
               "nodelifecycle", "resourcequota", "ttl")


class Cluster:
    """The running control plane. `kubeconfig` (admin), `server`, `kubectl()`, `api()`, `rest`, `env`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.procs: list[Managed] = []
        self.certs: Certs = make_certs(workdir / "pki")
        self.server = ""
        self.kubeconfig = workdir / "admin.kubeconfig"
        self.rest: Rest
        self.start_seconds: dict[str, float] = {}
        self.etcd_data = _etcd_data_dir(workdir)

    # --- lifecycle ---
    def start(self) -> Cluster:
        t0 = time.monotonic()
        try:
            etcd_url = self._start_etcd()
            self.start_seconds["etcd"] = time.monotonic() - t0
            self._start_apiserver(etcd_url)
            self.start_seconds["kube-apiserver"] = time.monotonic() - t0
            # Both only need the API server: start them together, then wait for each.
            waits = [self._start_component("kube-controller-manager", [
                f"--service-account-private-key-file={self.certs.sa_key}",
                f"--root-ca-file={self.certs.ca}",
                f"--controllers={','.join(CONTROLLERS)}",
                "--use-service-account-credentials=false",
                "--concurrent-deployment-syncs=5", "--concurrent-gc-syncs=5",
            ]), self._start_component("kube-scheduler", [])]
            for wait in waits:
                wait()
            self.start_seconds["total"] = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the daemons in reverse order (scheduler first, etcd last)."""
        for proc in reversed(self.procs):
            proc.stop(grace=10)
        self.procs.clear()
        shutil.rmtree(self.etcd_data, ignore_errors=True)

    def describe(self, lines: int = 30) -> str:
        """Every daemon's state and log tail, for failure reports."""
        return "\n".join(proc.describe(lines) for proc in self.procs)

    # --- daemons ---
    def _spawn(self, name: str, argv: list[str]) -> Managed:
        proc = Managed(name, argv, self.logs / f"{name}.log")
        self.procs.append(proc)
        return proc

    def _start_etcd(self) -> str:
        client, peer = free_port(), free_port()
        url = f"http://127.0.0.1:{client}"
        proc = self._spawn("etcd", [
            str(paths.binary("etcd")), "--name=bed", f"--data-dir={self.etcd_data}",
            f"--listen-client-urls={url}", f"--advertise-client-urls={url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}", f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=bed=http://127.0.0.1:{peer}", "--initial-cluster-state=new",
        ])
        wait_until(lambda: rest_get(f"{url}/health", timeout=1).json().get("health") == "true", 30,
                   "etcd /health", watch=[proc])
        return url

    def _start_apiserver(self, etcd_url: str) -> None:
        port = free_port()
        self.server = f"https://127.0.0.1:{port}"
        c = self.certs
        proc = self._spawn("kube-apiserver", [
            str(paths.binary("kube-apiserver")), f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={port}", "--insecure-port=0",
            f"--tls-cert-file={c.serving_cert}", f"--tls-private-key-file={c.serving_key}", f"--client-ca-file={c.ca}",
            f"--service-account-key-file={c.sa_pub}", f"--service-account-signing-key-file={c.sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc",
            "--authorization-mode=Node,RBAC", f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--endpoint-reconciler-type=none", "--allow-privileged=true", f"--cert-dir={self.workdir / 'pki'}",
            "--event-ttl=1h", "--profiling=false",
            # Front-proxy CA: unused, but without it every component logs an error about the bundle.
            f"--requestheader-client-ca-file={c.ca}", "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        ])
        self._write_kubeconfig()
        self.rest = Rest(self.server, c.ca, c.admin_cert, c.admin_key, timeout=5)
        wait_until(lambda: self._readyz(self.server), 90, "kube-apiserver /readyz", watch=[proc])

    def _start_component(self, name: str, extra: list[str]) -> Callable[[], None]:
        """Spawn a component; returns the wait for its /healthz."""
        port = free_port()
        kc = str(self.kubeconfig)
        proc = self._spawn(name, [
            str(paths.binary(name)), f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}", "--bind-address=127.0.0.1", f"--secure-port={port}", "--port=0",
            "--leader-elect=false", *extra,
        ])
        return lambda: wait_until(lambda: self._readyz(f"https://127.0.0.1:{port}", "/healthz"), 60,
                                  f"{name} /healthz", watch=[proc])

    def _readyz(self, base: str, path: str = "/readyz") -> bool:
        # Components serve with self-signed certs of their own; only the API server's is ours.
        verify: str | bool = str(self.certs.ca) if base == self.server else False
        with local_session() as session, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # InsecureRequestWarning for the components' own certs
            response = session.get(base + path, verify=verify, timeout=2,
                                   cert=(str(self.certs.admin_cert), str(self.certs.admin_key)))
        return response.status_code == 200 and response.text.strip() == "ok"

    def _write_kubeconfig(self) -> None:
        c = self.certs
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "bed",
            "clusters": [{"name": "bed", "cluster": {"server": self.server, "certificate-authority": str(c.ca)}}],
            "users": [{"name": "admin", "user": {"client-certificate": str(c.admin_cert),
                                                  "client-key": str(c.admin_key)}}],
            "contexts": [{"name": "bed", "context": {"cluster": "bed", "user": "admin", "namespace": "default"}}],
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))

    # --- clients ---
    @property
    def env(self) -> dict[str, str]:
        """An environment for CLI tools (kubectl, helm) aimed at this bed, with helm's state in the work dir."""
        helm_home = self.workdir / "helm"
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig),
                "HELM_CACHE_HOME": str(helm_home / "cache"), "HELM_CONFIG_HOME": str(helm_home / "config"),
                "HELM_DATA_HOME": str(helm_home / "data")}

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the bed's kubectl (Debian's 1.20) against this cluster; raises with stderr on failure if `check`."""
        argv = [str(paths.binary("kubectl")), f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and result.returncode != 0:
            raise BedError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def api(self) -> Any:
        """A `kubernetes.client.ApiClient` authenticated as the bed's admin."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def token_kubeconfig(self, token: str, path: Path, namespace: str = "default") -> Path:
        """Write a kubeconfig that authenticates with a bearer token (e.g. a ServiceAccount's)."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "token",
            "clusters": [{"name": "bed", "cluster": {"server": self.server,
                                                      "certificate-authority": str(self.certs.ca)}}],
            "users": [{"name": "token", "user": {"token": token}}],
            "contexts": [{"name": "token", "context": {"cluster": "bed", "user": "token", "namespace": namespace}}],
        }
        path.write_text(yaml.safe_dump(config))
        return path



def _etcd_data_dir(workdir: Path) -> Path:
    """etcd's data on tmpfs when there is one: a throwaway bed needs no durability, and etcd's fsyncs
    on a shared CI disk slow every API write (etcd 3.4 has no --unsafe-no-fsync)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="pipeshift-etcd-", dir=shm))
    return workdir / "etcd"
