"""The metrics as plain functions, usable without Lightning (one module per metric).

The estimators they are built on (Rademacher probes, Hutchinson, Hutch++, Lanczos, the Hessian
operator) live in :mod:`models.curvature` and the scale-invariance machinery in
:mod:`models.scale_invariance`; both are re-exported here for convenience.
"""

from models.curvature import (
    HessianOperator,
    TraceEstimate,
    hutchinson,
    hutchpp,
    lanczos_top_eigenvalues,
)
from models.scale_invariance import (
    UnitNormCopy,
    scale_invariant_parameters,
    scale_invariant_structure,
    unit_norm_copy,
)

from .hessian import hessian_top_eigenvalues, hessian_trace
from .margins import collect_margins, margin_summary
from .normalized_margins import (
    NormalizedMarginResult,
    margin_distribution_features,
    normalized_layer_margins,
)
from .width import WidthEstimate, gradient_norm_width

__all__ = [
    "HessianOperator",
    "NormalizedMarginResult",
    "TraceEstimate",
    "UnitNormCopy",
    "WidthEstimate",
    "collect_margins",
    "gradient_norm_width",
    "hessian_top_eigenvalues",
    "hessian_trace",
    "hutchinson",
    "hutchpp",
    "lanczos_top_eigenvalues",
    "margin_distribution_features",
    "margin_summary",
    "normalized_layer_margins",
    "scale_invariant_parameters",
    "scale_invariant_structure",
    "unit_norm_copy",
]
