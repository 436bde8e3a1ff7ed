"""SWIFT: the paper's scheduler (§4.1, Eqs. 1-12) -- availability, mobility-aware clustering, pipeline templates.

Public entry points: `plan()` (one pipeline by greedy / dqn / exact / swift), `CostModel` (Eqs. 8-10),
`PreventiveTemplates` (§4.2), `availability` (Eqs. 1-2), `mobility` (Eqs. 3-5), `clustering` (Eq. 6).
"""

from flad_edge.swift.cost import CostModel, bottleneck, stage_costs, t_cmp, t_com, t_path, validate_plan
from flad_edge.swift.model import (
    DEVICES,
    Cluster,
    Layer,
    Plan,
    Profile,
    Vehicle,
    load_cluster,
    load_profile,
    random_cluster,
    synthetic_profile,
)
from flad_edge.swift.planners import METHODS, OBJECTIVES, PlannerError, plan

__all__ = [
    "DEVICES", "METHODS", "OBJECTIVES", "Cluster", "CostModel", "Layer", "Plan", "PlannerError", "Profile",
    "Vehicle", "bottleneck", "load_cluster", "load_profile", "plan", "random_cluster", "stage_costs",
    "synthetic_profile", "t_cmp", "t_com", "t_path", "validate_plan",
]
