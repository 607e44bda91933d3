"""Orchestration of live layout changes, spoken to agents and the frontend only over their HTTP control APIs.

Pure Python (no torch, nothing of `pipeshift.runtime`), so the Kubernetes operator runs it unchanged.
"""

from pipeshift.control.counters import needed_layer_tokens, stage_layer_tokens, tokens_recomputed
from pipeshift.control.http import ControlCallError, ControlClient
from pipeshift.control.phases import Phase, PhaseClock
from pipeshift.control.precopy import RoundStats, precopy_done
from pipeshift.control.reconfigure import (
    STRATEGIES,
    SWITCHES,
    WEIGHTS,
    ReconfigReport,
    SwitchBudget,
    reconfigure,
)

__all__ = [
    "STRATEGIES",
    "SWITCHES",
    "WEIGHTS",
    "ControlCallError",
    "ControlClient",
    "Phase",
    "PhaseClock",
    "ReconfigReport",
    "RoundStats",
    "SwitchBudget",
    "needed_layer_tokens",
    "precopy_done",
    "reconfigure",
    "stage_layer_tokens",
    "tokens_recomputed",
]
