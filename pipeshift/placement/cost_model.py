"""How long a stage takes and how much memory it needs, for a given pool, role and layer count.

The model (first order, documented so calibration can correct it):
- Concurrency B: requests resident when the SLOs are just met (Little's law), at least
  `Workload.min_concurrency`; KV is reserved for all of them (prompt mean + output p95 tokens each).
- The frontend cycles K = max(2, n) micro-batches of B/K sequences through n stages (the runtime's
  default slot count). A stage's time for one micro-batch is the roofline max of its compute and its
  memory traffic (weights, KV read), plus sending its activations to the next stage (inside the pool
  over `intra`, to another pool over the sender's `interconnect`), plus a fixed step overhead.
- Prefill work arrives at `rate` prompts/s and takes a fraction rho of each stage's time, so one
  decode iteration (every sequence advances one token) takes g = K * t_microbatch / (1 - rho) on a
  stage. The slowest stage's g is the bottleneck; TPOT p95 is predicted as that bottleneck, TTFT p95
  as two bottlenecks (waiting for a slot, one trip) plus the p95 prompt's own prefill on every stage.
All of a stage's costs grow with its layer count, which is what the search relies on.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipeshift.placement.calibration import Calibration
from pipeshift.placement.pools import Pool
from pipeshift.placement.profile import ModelProfile
from pipeshift.placement.workload import Slo, Workload

COMPUTE_EFFICIENCY = 0.5  # achieved / datasheet tensor FLOP/s for transformer matmuls
BANDWIDTH_EFFICIENCY = 0.8  # achieved / datasheet memory bandwidth
STEP_OVERHEAD_S = 2e-4  # per micro-batch on a stage: scheduling, kernel launches, framing
INTRA_LATENCY_S = 1e-5
INTER_LATENCY_S = 1e-4
USABLE_MEMORY_FRACTION = 0.9  # the rest: runtime context, allocator fragmentation
LOGIT_BYTES = 4  # logits are float32


class Position(enum.Enum):
    FIRST = "first"  # holds the embedding
    MID = "mid"
    LAST = "last"  # holds the final norm and LM head, sends nothing onward
    ONLY = "only"  # a one-stage pipeline: both


class Hop(enum.Enum):
    INTRA = "intra"  # the next stage is on the same pool
    INTER = "inter"  # the next stage is on another pool
    NONE = "none"  # last stage


class Role(enum.IntEnum):
    """A stage's position and the link to its successor: all that its time depends on besides k."""

    FIRST_INTRA = 0
    FIRST_INTER = 1
    MID_INTRA = 2
    MID_INTER = 3
    LAST = 4
    ONLY = 5

    @property
    def position(self) -> Position:
        return _POSITION[self]

    @property
    def hop(self) -> Hop:
        return _HOP[self]

    @classmethod
    def of(cls, position: Position, hop: Hop) -> Role:
        return next(r for r in cls if r.position is position and r.hop is hop)


_POSITION = {Role.FIRST_INTRA: Position.FIRST, Role.FIRST_INTER: Position.FIRST, Role.MID_INTRA: Position.MID,
             Role.MID_INTER: Position.MID, Role.LAST: Position.LAST, Role.ONLY: Position.ONLY}
_HOP = {Role.FIRST_INTRA: Hop.INTRA, Role.FIRST_INTER: Hop.INTER, Role.MID_INTRA: Hop.INTRA,
        Role.MID_INTER: Hop.INTER, Role.LAST: Hop.NONE, Role.ONLY: Hop.NONE}
FIRST_INTRA, FIRST_INTER, MID_INTRA, MID_INTER, LAST, ONLY = Role


def roles_of(pools: Sequence[int]) -> list[Role]:
    """The role of each stage of a pipeline given the pool of each stage, in order."""
    n = len(pools)
    if n == 1:
        return [ONLY]
    out = []
    for i, p in enumerate(pools):
        if i == n - 1:
            out.append(LAST)
            continue
        hop = Hop.INTRA if pools[i + 1] == p else Hop.INTER
        out.append(Role.of(Position.FIRST if i == 0 else Position.MID, hop))
    return out


@dataclass(frozen=True)
class StageMemory:
    weights: float
    kv: float
    activations: float
    capacity: float

    @property
    def total(self) -> float:
        return self.weights + self.kv + self.activations


class RoleModel:
    """Costs of a stage of k layers in one role on one pool, in an n-stage pipeline.

    `time(k)` is the stage's decode-iteration time g; `max_layers` the most layers that fit in memory
    with prefill utilisation below 1. Both are exact float computations shared by every search.
    """

    __slots__ = (
        "_a1",
        "_a2",
        "_activations",
        "_b1",
        "_b2",
        "_c",
        "_r0",
        "_r1",
        "_scale",
        "capacity",
        "kv_layer",
        "max_layers",
        "pi_const",
        "pi_slope",
        "weights_fixed",
        "weights_layer",
    )

    def __init__(self, cm: CostModel, pool: Pool, n: int, role: Role) -> None:
        m, w = cm.model, cm.workload
        k_mb = cm.micro_batches(n)
        mu = cm.concurrency / k_mb
        flops = pool.tflops * 1e12 * COMPUTE_EFFICIENCY
        bw = pool.bandwidth_gbps * 1e9 * BANDWIDTH_EFFICIENCY
        has_head = role.position in (Position.LAST, Position.ONLY)
        has_embedding = role.position in (Position.FIRST, Position.ONLY)

        compute_layer = mu * m.decode_flops_per_layer(cm.context) / flops
        memory_layer = (m.layer_weight_bytes + mu * cm.context * m.kv_bytes_per_token_per_layer) / bw
        measured = cm.calibration.step_seconds_per_layer.get(pool.name)
        # A measured per-layer step replaces the roofline; the same ratio corrects what was not measured.
        ratio = measured / max(compute_layer, memory_layer) if measured else 1.0
        self._a1, self._a2 = (measured, measured) if measured else (compute_layer, memory_layer)
        self._b1 = ratio * mu * m.head_flops_per_token / flops if has_head else 0.0
        self._b2 = ratio * m.head_bytes / bw if has_head else 0.0

        act_row = m.hidden_size * m.dtype_bytes
        if role.hop is Hop.NONE:
            link, latency = math.inf, 0.0
        elif role.hop is Hop.INTRA:
            link, latency = pool.link_gbps * 1e9, INTRA_LATENCY_S
        else:
            link, latency = pool.interconnect_gbps * 1e9, INTER_LATENCY_S
        self._c = mu * act_row / link + latency + STEP_OVERHEAD_S
        self._scale = cm.calibration.time_scale * k_mb

        def prefill(prompt: float) -> tuple[float, float]:
            slope = ratio * m.prefill_flops_per_layer(prompt) / flops
            const = (ratio * m.head_flops_per_token / flops if has_head else 0.0) + prompt * act_row / link
            return slope, const + (latency if role.hop is not Hop.NONE else 0.0)

        s = cm.calibration.time_scale
        slope, const = prefill(w.prompt.mean)
        self._r1, self._r0 = w.rate * s * slope, w.rate * s * const
        slope, const = prefill(w.prompt.p95)
        self.pi_slope, self.pi_const = s * slope, s * const

        self.weights_fixed = float(m.embedding_bytes if has_embedding else 0)
        if role.position is Position.LAST or (role.position is Position.ONLY and not m.tie_word_embeddings):
            self.weights_fixed += m.head_bytes
        elif role.position is Position.ONLY:
            self.weights_fixed += m.hidden_size * m.dtype_bytes
        self.kv_layer = cm.concurrency * cm.kv_tokens * m.kv_bytes_per_token_per_layer
        tokens = mu + w.prompt.p95
        act = tokens * m.activation_bytes_per_token + k_mb * mu * act_row
        if has_head:
            act += (mu + 1) * m.vocab_size * LOGIT_BYTES
        self._activations = act
        self.weights_layer = m.layer_weight_bytes
        self.capacity = pool.memory_gb * 1e9 * USABLE_MEMORY_FRACTION
        self.max_layers = self._largest(self._fits, m.num_layers)

    def _fits(self, k: int) -> bool:
        return self.memory(k).total <= self.capacity and self._r1 * k + self._r0 < 1.0

    @staticmethod
    def _largest(ok: Callable[[int], bool], upper: int) -> int:
        """The largest k in 0..upper with ok(k), for ok true up to some point and false after."""
        lo, hi = 0, upper
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if ok(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def time(self, k: int) -> float:
        t = max(self._a1 * k + self._b1, self._a2 * k + self._b2) + self._c
        return self._scale * t / (1.0 - (self._r1 * k + self._r0))

    def cap(self, threshold: float) -> int:
        """Most layers this stage can hold with its time at most `threshold`."""
        return self._largest(lambda k: self.time(k) <= threshold, self.max_layers)

    def prefill(self, k: int) -> float:
        """The p95 prompt's prefill on this stage, part of the TTFT prediction."""
        return self.pi_const + self.pi_slope * k

    def memory(self, k: int) -> StageMemory:
        return StageMemory(weights=self.weights_fixed + k * self.weights_layer,
                           kv=k * self.kv_layer, activations=self._activations,
                           capacity=self.capacity)


class CostModel:
    """The plan-independent quantities of one planning problem, and a cache of role models."""

    def __init__(self, model: ModelProfile, pools: Sequence[Pool], workload: Workload, slo: Slo,
                 calibration: Calibration) -> None:
        self.model, self.pools, self.workload, self.slo, self.calibration = (
            model, tuple(pools), workload, slo, calibration)
        little = workload.rate * (slo.ttft_p95_s + workload.output.mean * slo.tpot_p95_s)
        self.concurrency = max(1.0, little, workload.min_concurrency)
        self.context = workload.prompt.mean + workload.output.mean / 2
        self.kv_tokens = workload.prompt.mean + workload.output.p95
        self._roles: dict[tuple[int, int, Role], RoleModel] = {}

    @staticmethod
    def micro_batches(n: int) -> int:
        return max(2, n)

    def role(self, pool: int, n: int, role: Role) -> RoleModel:
        key = (pool, n, role)
        found = self._roles.get(key)
        if found is None:
            found = self._roles[key] = RoleModel(self, self.pools[pool], n, role)
        return found
