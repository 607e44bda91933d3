"""`LLMPipeline.status`: the phase rules and conditions that keep their transition time.

Conditions follow the Kubernetes convention: `lastTransitionTime` changes only when `status` flips, so
a message that is merely refreshed ("1/2 stages ready" → "2/2") does not look like a new transition.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PENDING = "Pending"
READY = "Ready"
RECONFIGURING = "Reconfiguring"
DEGRADED = "Degraded"
FAILED = "Failed"
SCALED_TO_ZERO = "ScaledToZero"
PHASES = (PENDING, READY, RECONFIGURING, DEGRADED, FAILED, SCALED_TO_ZERO)
VALID = "Valid"  # the one condition of an AutoscalingPolicy
CONDITION_TYPES = (READY, RECONFIGURING, DEGRADED, VALID)


def rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def utcnow() -> str:
    return rfc3339(dt.datetime.now(dt.UTC))


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str

    def __post_init__(self) -> None:
        # Never empty: the 1.20 API server turns "" inside a merge-patched list into null, which a
        # schema without `nullable` then refuses (and kubectl shows nothing useful either way).
        if not self.message:
            raise ValueError(f"condition {self.type}/{self.reason} needs a message")
        if self.type not in CONDITION_TYPES:
            raise ValueError(f"condition type {self.type!r} is not one of {', '.join(CONDITION_TYPES)}")
        if not self.reason or not self.reason[0].isupper() or not self.reason.isalnum():
            raise ValueError(f"condition reason {self.reason!r} must be UpperCamelCase")

    @property
    def status_text(self) -> str:
        return "True" if self.status else "False"


def merge_conditions(previous: Iterable[Mapping[str, Any]], current: Sequence[Condition], now: str,
                     generation: int | None = None) -> list[dict[str, Any]]:
    """The conditions to write: each keeps its old `lastTransitionTime` unless its status changed."""
    before = {c.get("type"): c for c in previous if isinstance(c, Mapping)}
    out = []
    for c in current:
        old = before.get(c.type)
        kept = old is not None and old.get("status") == c.status_text and old.get("lastTransitionTime")
        entry = {"type": c.type, "status": c.status_text, "reason": c.reason, "message": c.message,
                 "lastTransitionTime": kept or now}
        if generation is not None:
            entry["observedGeneration"] = generation
        out.append(entry)
    return out


def changed(previous: Iterable[Mapping[str, Any]], current: Sequence[Condition],
            message_matters: frozenset[str] = frozenset()) -> list[Condition]:
    """Conditions whose status or reason differ from before (or their message, for `message_matters`
    reasons): the ones worth an Event, so a re-check that changes nothing posts nothing."""
    before = {c.get("type"): c for c in previous if isinstance(c, Mapping)}
    out = []
    for c in current:
        old = before.get(c.type)
        if old is None or old.get("status") != c.status_text or old.get("reason") != c.reason \
                or (c.reason in message_matters and old.get("message") != c.message):
            out.append(c)
    return out


def next_phase(*, invalid: bool, serving: bool, previous_phase: str | None, spec_changed: bool) -> str:
    """Failed for a spec the operator cannot act on; Ready once every stage and the frontend serve;
    Degraded when a pipeline that served loses a part without its spec changing; else Pending."""
    if invalid:
        return FAILED
    if serving:
        return READY
    if previous_phase in (READY, DEGRADED) and not spec_changed:
        return DEGRADED
    return PENDING
