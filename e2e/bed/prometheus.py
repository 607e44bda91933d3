"""A throwaway Prometheus for the e2e tests: 127.0.0.1, a generated config, temp storage.

Never the packaged service (which listens on 0.0.0.0 and keeps state in /var/lib): each test
starts its own with the scrape targets it needs, scraping every second. First samples arrive a
few seconds after start, so callers poll with `wait_for_samples` rather than sleep.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from e2e.bed import paths
from e2e.bed.procs import BedError, Managed, free_port, wait_until
from e2e.bed.rest import get


def scrape_config(job: str, targets: list[str], metrics_path: str = "/metrics", **extra: Any) -> dict[str, Any]:
    """One `scrape_configs` entry with static targets (host:port)."""
    return {"job_name": job, "metrics_path": metrics_path, "static_configs": [{"targets": targets}], **extra}


class Prometheus:
    """A running Prometheus; `url` is its HTTP API base."""

    def __init__(self, workdir: Path, scrape_configs: list[dict[str, Any]], interval: str = "1s") -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        config = {"global": {"scrape_interval": interval, "evaluation_interval": interval,
                             "scrape_timeout": interval},
                  "scrape_configs": scrape_configs}
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = Managed("prometheus", [
            str(paths.binary("prometheus")), f"--config.file={self.config}",
            f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h", "--web.enable-lifecycle",
        ], workdir / "prometheus.log")
        try:
            wait_until(lambda: get(f"{self.url}/-/ready", timeout=1).status_code == 200, 60,
                       "prometheus /-/ready", watch=[self.proc])
        except BaseException:
            self.proc.stop()
            raise

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector (raises on a query error)."""
        body = get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5).json()
        if body.get("status") != "success":
            raise BedError(f"prometheus query {promql!r} failed: {body}")
        return list(body["data"]["result"])

    def wait_for_samples(self, promql: str, timeout: float = 60) -> list[dict[str, Any]]:
        """Poll `promql` until it returns at least one sample; the samples."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if result:
                return result
            if not self.proc.running() or time.monotonic() > deadline:
                targets = get(f"{self.url}/api/v1/targets", timeout=5).text if self.proc.running() else ""
                raise BedError(f"no samples for {promql!r} after {timeout:.0f} s; targets: {targets[:2000]}\n"
                               f"{self.proc.describe()}")
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.stop()
