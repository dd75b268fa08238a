"""Metric callbacks (margins, width, Hessian) and their plain-function cores."""

from .base import Measurement, MeasurementBatches, ModelState, SharpnessCallback, preserved_state
from .distributed import gather_by_index, is_distributed, weighted_mean
from .functional import collect_logits, collect_margins, margin_summary, per_sample_outputs
from .hessian import (
    HessianOperator,
    TraceEstimate,
    hessian_top_eigenvalues,
    hessian_trace,
    hutchinson,
    hutchpp,
    hvp,
    lanczos_top_eigenvalues,
)
from .metrics import GradientNormWidth, HessianEigenvalues, HessianTrace, PerSampleMargins
from .width import (
    WidthEstimate,
    gradient_norm_width,
    scale_invariant_parameters,
    scale_invariant_structure,
    unit_norm_copy,
)

__all__ = [
    "GradientNormWidth",
    "HessianEigenvalues",
    "HessianOperator",
    "HessianTrace",
    "Measurement",
    "MeasurementBatches",
    "ModelState",
    "PerSampleMargins",
    "SharpnessCallback",
    "TraceEstimate",
    "WidthEstimate",
    "collect_logits",
    "collect_margins",
    "gather_by_index",
    "gradient_norm_width",
    "hessian_top_eigenvalues",
    "hessian_trace",
    "hutchinson",
    "hutchpp",
    "hvp",
    "is_distributed",
    "lanczos_top_eigenvalues",
    "margin_summary",
    "per_sample_outputs",
    "preserved_state",
    "scale_invariant_parameters",
    "scale_invariant_structure",
    "unit_norm_copy",
    "weighted_mean",
]
