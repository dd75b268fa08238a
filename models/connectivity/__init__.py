"""Mode connectivity: paths between trained networks, alignment of hidden units, evaluation."""

from .alignment import (
    ALIGN_METHODS,
    HiddenLayer,
    align,
    align_activations,
    align_ot,
    align_weights,
    hidden_layers,
    permute_hidden_units,
)
from .evaluation import (
    evaluate_path,
    evaluate_point,
    has_batchnorm,
    path_metrics,
    reset_bn_statistics,
)
from .paths import (
    PATH_KINDS,
    ArcPath,
    BezierCurve,
    CurvePath,
    LinearPath,
    PolygonalChain,
    make_path,
    parameters_of,
    t_grid,
)

__all__ = [
    "ALIGN_METHODS",
    "PATH_KINDS",
    "ArcPath",
    "BezierCurve",
    "CurvePath",
    "HiddenLayer",
    "LinearPath",
    "PolygonalChain",
    "align",
    "align_activations",
    "align_ot",
    "align_weights",
    "evaluate_path",
    "evaluate_point",
    "has_batchnorm",
    "hidden_layers",
    "make_path",
    "parameters_of",
    "path_metrics",
    "permute_hidden_units",
    "reset_bn_statistics",
    "t_grid",
]
