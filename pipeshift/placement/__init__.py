"""The heterogeneous placement planner: which pool each stage runs on and which layers it holds.

Pure Python (no torch, no Kubernetes), shared by the operator and local runs; it produces the
`Layout` of `pipeshift.api`.
"""

from pipeshift.placement.calibration import Calibration
from pipeshift.placement.catalogue import CATALOGUE, GpuSpec
from pipeshift.placement.estimate import Mode, PlanEstimate, StageEstimate
from pipeshift.placement.planner import Infeasible, Placement, PlacementRequest, estimate_layout, plan
from pipeshift.placement.pools import Pool, load_pools, make_pool, parse_pools
from pipeshift.placement.profile import ModelProfile
from pipeshift.placement.workload import LengthDist, Slo, Workload

__all__ = ["CATALOGUE", "Calibration", "GpuSpec", "Infeasible", "LengthDist", "Mode", "ModelProfile",
           "Placement", "PlacementRequest", "PlanEstimate", "Pool", "Slo", "StageEstimate", "Workload",
           "estimate_layout", "load_pools", "make_pool", "parse_pools", "plan"]
