"""How many torch threads this process uses: several stages on one host must not oversubscribe it.

Precedence: an explicit `--threads`, then env `PIPESHIFT_THREADS`, then the cores divided evenly
among the pipeshift processes on this host.
"""

from __future__ import annotations

import logging
import os

import torch

from pipeshift.errors import UserError

ENV_VAR = "PIPESHIFT_THREADS"
logger = logging.getLogger(__name__)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), which containers often limit below cpu_count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def thread_count(requested: int | None = None, processes_on_host: int = 1) -> int:
    if requested is not None:
        if requested < 1:
            raise UserError(f"--threads {requested} must be at least 1")
        return requested
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            value = 0
        if value < 1:
            raise UserError(f"environment variable {ENV_VAR}={env!r} must be a positive integer")
        return value
    if processes_on_host < 1:
        raise ValueError(f"processes_on_host must be >= 1, got {processes_on_host}")
    return max(1, available_cores() // processes_on_host)


def configure_threads(requested: int | None = None, processes_on_host: int = 1) -> int:
    """Set torch's intra-op thread count for this process and return it."""
    n = thread_count(requested, processes_on_host)
    torch.set_num_threads(n)
    logger.debug("torch uses %d threads", n)
    return n
