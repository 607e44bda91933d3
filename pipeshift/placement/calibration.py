"""Measurements that override datasheet estimates: per-layer step times per pool and a global scale.

`step_seconds_per_layer[pool]` is what `rate(pipeshift_stage_step_seconds_sum) /
rate(pipeshift_stage_step_seconds_count) / pipeshift_stage_layers` reads for a stage on that pool;
`time_scale` stretches every predicted time (observed / predicted latency of the running layout).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from pipeshift.errors import UserError


@dataclass(frozen=True)
class Calibration:
    step_seconds_per_layer: Mapping[str, float] = field(default_factory=dict)
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        if not (self.time_scale > 0 and math.isfinite(self.time_scale)):
            raise UserError(f"calibration time_scale {self.time_scale}: must be a positive finite number")
        for pool, seconds in self.step_seconds_per_layer.items():
            if not (seconds > 0 and math.isfinite(seconds)):
                raise UserError(f"calibration step time for pool {pool!r} is {seconds}; must be positive")
