"""The dynamic routing network for semantic segmentation (Li et al., CVPR 2020).

Imports only torch, numpy and PyYAML: orchestration (Ray, MLflow, Optuna, DVC) lives elsewhere.
"""

from .builder import VARIANTS, NetworkConfig, build_network
from .cost import CostModel, Flops
from .losses import BUDGETS, Budget, BudgetLoss, BudgetSchedule, budget, segmentation_loss
from .network import DynamicRoutingNetwork, RoutingOutput
from .routes import Route, RouteError
from .routing_space import Path, RoutingSpace
from .stem import PIXEL_MEAN_BGR, normalize_bgr

__all__ = [
    "BUDGETS",
    "PIXEL_MEAN_BGR",
    "VARIANTS",
    "Budget",
    "BudgetLoss",
    "BudgetSchedule",
    "CostModel",
    "DynamicRoutingNetwork",
    "Flops",
    "NetworkConfig",
    "Path",
    "Route",
    "RouteError",
    "RoutingOutput",
    "RoutingSpace",
    "budget",
    "build_network",
    "normalize_bgr",
    "segmentation_loss",
]
