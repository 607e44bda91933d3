"""The phases of one reconfiguration, in the only order they may run, with the time spent in each.

The commit point splits them: before it any failure aborts back to the old layout; after it the change
can only be rolled forward. A drain switch goes HOLDING → FINAL_COPY → COMMITTING → RESUMING; an epoch
switch goes ARMING (the agents) → COMMITTING (the frontend arms: its point of no return) → RETIRING.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class Phase(enum.Enum):
    PLANNED = "planned"
    STARTING = "starting"
    PREPARING = "preparing"
    PRECOPYING = "precopying"
    ARMING = "arming"
    HOLDING = "holding"
    FINAL_COPY = "final_copy"
    COMMITTING = "committing"
    RESUMING = "resuming"
    RETIRING = "retiring"
    CLEANING = "cleaning"
    DONE = "done"
    ABORTED = "aborted"
    FAILED = "failed"


_FORWARD = [
    Phase.PLANNED,
    Phase.STARTING,
    Phase.PREPARING,
    Phase.PRECOPYING,
    Phase.ARMING,
    Phase.HOLDING,
    Phase.FINAL_COPY,
    Phase.COMMITTING,
    Phase.RESUMING,
    Phase.RETIRING,
    Phase.CLEANING,
    Phase.DONE,
]
_ENDS = frozenset({Phase.DONE, Phase.ABORTED, Phase.FAILED})


class PhaseError(RuntimeError):
    """A transition the protocol does not allow (a bug in the orchestrator, never a runtime condition)."""


class PhaseClock:
    """The current phase and the milliseconds spent in each one left so far."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.phase = Phase.PLANNED
        self.started_at = clock()
        self._entered = self.started_at
        self.durations_ms: dict[str, float] = {}
        # Set on entering COMMITTING: from then on failures roll forward, never back.
        self.committed = False

    def enter(self, phase: Phase) -> None:
        """Move forward (phases may be skipped, never revisited), or to ABORTED before commit / FAILED after."""
        if self.phase in _ENDS:
            raise PhaseError(f"the reconfiguration already ended ({self.phase.value}); cannot enter {phase.value}")
        if phase is Phase.ABORTED and self.committed:
            raise PhaseError(f"cannot abort in {self.phase.value}: the commit point was passed, roll forward")
        if phase is Phase.FAILED and not self.committed:
            raise PhaseError(f"a failure in {self.phase.value} is before commit and must abort instead")
        if phase in _FORWARD and _FORWARD.index(phase) <= _FORWARD.index(self.phase):
            raise PhaseError(f"cannot go from {self.phase.value} back to {phase.value}")
        now = self._clock()
        spent = (now - self._entered) * 1e3
        self.durations_ms[self.phase.value] = self.durations_ms.get(self.phase.value, 0.0) + spent
        self._entered = now
        self.phase = phase
        self.committed = self.committed or phase is Phase.COMMITTING

    def elapsed_ms(self) -> float:
        return (self._clock() - self.started_at) * 1e3
