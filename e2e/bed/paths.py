"""Where the bed's binaries live: the links `e2e/bed/install.sh` (`make e2e-tools`) writes.

install.sh is the single place that decides between $KUBEBUILDER_ASSETS, PATH and the local build,
so the harness only has to read `<cache>/bin/<name>`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from e2e.bed.procs import BedError

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd", "kubectl", "prometheus", "helm")


def cache_dir() -> Path:
    """${PIPESHIFT_CACHE:-$HOME/.cache/pipeshift}: outside the repo, shared by clones."""
    return Path(os.environ.get("PIPESHIFT_CACHE") or Path.home() / ".cache" / "pipeshift")


def binary(name: str) -> Path:
    """The bed's `name` executable, or a BedError that says how to install it."""
    if name not in TOOLS:
        raise ValueError(f"unknown bed tool {name!r}; known: {', '.join(TOOLS)}")
    path = cache_dir() / "bin" / name
    if not os.access(path, os.X_OK):
        raise BedError(f"{name} not found at {path}: run `make e2e-tools` (e2e/bed/install.sh) first")
    return path


def venv_bin() -> Path:
    """The bin/ of the interpreter running the tests (the project venv), put first on pods' PATH.

    Not resolved: a venv's python is a symlink to the base interpreter, and the venv's bin/ is what
    holds the `pipeshift` entry point.
    """
    return Path(sys.executable).parent
