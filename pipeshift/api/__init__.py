"""Plain data shared by every part of pipeshift: layouts and reconfiguration plans.

No I/O, no torch, no imports of other pipeshift packages.
"""

from pipeshift.api.layout import Layout, LayoutError, StagePlan
from pipeshift.api.moves import LayerMove, ReconfigPlan, plan_moves

__all__ = ["LayerMove", "Layout", "LayoutError", "ReconfigPlan", "StagePlan", "plan_moves"]
