"""Pre-copy rounds: every source pushes its moving layers' dirty KV to each target, and the stop rule
that decides when the rest is small enough to move inside the switch.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeshift.api import ReconfigPlan
from pipeshift.control.http import ControlClient, call_all


@dataclass(frozen=True)
class CopyPair:
    """One source stage sending `layers` to one target stage."""

    source: int
    target: int
    layers: tuple[int, ...]


@dataclass(frozen=True)
class RoundStats:
    """What one round moved, summed over pairs; `seconds` is the pairs' transfer time summed (a
    conservative link speed: as if the pairs had shared one link)."""

    blocks: int
    bytes: int
    seconds: float
    dirty_blocks: int
    dirty_bytes: int

    @classmethod
    def total(cls, answers: Sequence[Mapping[str, Any]]) -> RoundStats:
        return cls(
            blocks=sum(int(a["blocks"]) for a in answers),
            bytes=sum(int(a["bytes"]) for a in answers),
            seconds=sum(float(a["seconds"]) for a in answers),
            dirty_blocks=sum(int(a["dirty_blocks_remaining"]) for a in answers),
            dirty_bytes=sum(int(a["dirty_bytes_remaining"]) for a in answers),
        )

    def to_json(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "bytes": self.bytes, "seconds": self.seconds,
                "dirty_blocks": self.dirty_blocks, "dirty_bytes": self.dirty_bytes}


def copy_pairs(plan: ReconfigPlan) -> list[CopyPair]:
    """The moves grouped by (source, target), in a stable order."""
    layers: dict[tuple[int, int], list[int]] = defaultdict(list)
    for move in plan.moves:
        layers[move.src_stage, move.dst_stage].append(move.layer)
    return [CopyPair(src, dst, tuple(sorted(ls))) for (src, dst), ls in sorted(layers.items())]


# A round that leaves dirty at least this fraction of what it sent has stopped converging: serving writes as
# fast as the link copies (each decode step dirties every live sequence's last block), so more rounds would
# only repeat the same small remainder; the switch's final copy or push moves it.
STALLED_FRACTION = 0.5


def precopy_done(rounds: Sequence[RoundStats], switch_budget_s: float, max_rounds: int) -> bool:
    """Stop when what is still dirty would move within the switch budget at the best speed a round measured
    (a small round's time is mostly the fixed latency of its control calls and worker hops, which one more
    round pays again rather than avoids), when the last round stalled (it left dirty at least
    `STALLED_FRACTION` of what it sent), or when `max_rounds` rounds ran. Without a measured speed only a
    clean state stops early."""
    if not rounds:
        return False
    last = rounds[-1]
    if last.dirty_bytes == 0 or len(rounds) >= max_rounds:
        return True
    if last.bytes > 0 and last.dirty_bytes >= STALLED_FRACTION * last.bytes:
        return True
    measured = [r for r in rounds if r.bytes > 0 and r.seconds > 0]
    if not measured:
        return False
    speed = max(r.bytes / r.seconds for r in measured)
    return last.dirty_bytes / speed <= switch_budget_s


def run_round(
    reconfig_id: str,
    pairs: Sequence[CopyPair],
    clients: Mapping[int, ControlClient],
    data_addresses: Mapping[int, str],
    timeout_s: float,
    rate: float | None = None,
) -> RoundStats:
    """One pre-copy round on every pair at once (sources work on their own compute workers); `rate`: bytes/s
    for all pairs together, each pair sending at its even share."""

    def one(pair: CopyPair) -> dict[str, Any]:
        body = {
            "request_id": f"{reconfig_id}-precopy-{uuid.uuid4().hex[:12]}",
            "reconfig_id": reconfig_id,
            "target": data_addresses[pair.target],
            "layers": list(pair.layers),
        }
        if rate is not None:
            body["max_bytes_per_s"] = rate / len(pairs)
        return clients[pair.source].post("/reconfig/precopy", body, timeout_s)

    if not pairs:
        return RoundStats(0, 0, 0.0, 0, 0)
    return RoundStats.total(call_all(one, pairs))

