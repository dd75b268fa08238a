"""Metric callbacks (margins, width, Hessian) and their plain-function cores."""

from .distributed import gather_by_index, is_distributed, weighted_mean
from .functional import collect_margins

__all__ = ["collect_margins", "gather_by_index", "is_distributed", "weighted_mean"]
