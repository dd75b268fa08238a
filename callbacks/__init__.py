"""Metric callbacks (one metric a module) on one base class, and their plain-function forms.

* ``base``: ``SharpnessCallback`` (schedule, data, mode, seeding, restoring the model,
  reduction across ranks, logging), ``Measurement`` and ``TrainingLogits`` (a whole-training-set
  pass that can hand its logits on);
* ``margins``: ``PerSampleMargins``; ``normalized_margins``: ``NormalizedMargins`` (Jiang et al.);
  ``width``: ``GradientNormWidth``; ``hessian``:
  ``HessianTrace``, ``HessianEigenvalues``; ``rescaling``: their unit-norm option;
  ``decision_boundary``: ``DecisionBoundary`` (2-D inputs: boundary and margin level sets, with
  and without gaps, as an image);
* ``functional``: the same metrics as plain functions, usable without Lightning.
"""

from .base import Measurement, MeasurementBatches, SharpnessCallback, TrainingLogits
from .decision_boundary import DecisionBoundary
from .functional import (
    HessianOperator,
    TraceEstimate,
    UnitNormCopy,
    WidthEstimate,
    collect_margins,
    gradient_norm_width,
    hessian_top_eigenvalues,
    hessian_trace,
    hutchinson,
    hutchpp,
    lanczos_top_eigenvalues,
    margin_distribution_features,
    margin_summary,
    normalized_layer_margins,
    scale_invariant_parameters,
    scale_invariant_structure,
    unit_norm_copy,
)
from .hessian import HessianEigenvalues, HessianTrace
from .margins import PerSampleMargins
from .normalized_margins import NormalizedMargins
from .rescaling import UnitNormRescaling
from .theory import MarginTheoryCheck, theorem1_summary
from .width import GradientNormWidth

__all__ = [
    "DecisionBoundary",
    "GradientNormWidth",
    "HessianEigenvalues",
    "HessianOperator",
    "HessianTrace",
    "MarginTheoryCheck",
    "Measurement",
    "NormalizedMargins",
    "MeasurementBatches",
    "PerSampleMargins",
    "SharpnessCallback",
    "TrainingLogits",
    "TraceEstimate",
    "UnitNormCopy",
    "UnitNormRescaling",
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
    "theorem1_summary",
    "unit_norm_copy",
]
