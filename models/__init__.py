"""LightningModules, backbones, heads, losses, and the model-level maths the metrics share.

Where a thing lives:

* ``classifier``: ``MarginClassifier`` (backbone + ``W ∘ BN`` head + discounted loss);
  ``backbones``, ``heads``, ``losses`` (the discounted cross-entropy, margins, named criteria).
* ``manual_step``: ``ManualStepClassifier``, the base of multi-pass training methods;
  ``sam``: SAM / ASAM / Riemannian SAM; ``penalties``: gradient-norm and Hessian-trace penalties.
* ``state``: snapshot and restore of parameters, buffers, grads, modes and RNG; BN helpers.
* ``parameters``: parameters by regex (the one naming convention), the global norm.
* ``scale_invariance``: which weights are scale-invariant, and their unit-norm copy.
* ``curvature``: Hessian-vector products, Rademacher probes, Hutchinson, Hutch++, Lanczos.
"""

from .backbones import available_backbones, build_backbone, register_backbone
from .classifier import MarginClassifier, default_optimizer
from .curvature import (
    HessianOperator,
    TraceEstimate,
    hessian_vector_products,
    hutchinson,
    hutchinson_forms,
    hutchpp,
    lanczos_top_eigenvalues,
    rademacher,
    rademacher_like,
)
from .heads import (
    HEAD_INITS,
    HEADS,
    ArcFaceHead,
    CosFaceHead,
    Head,
    L2SoftmaxHead,
    LinearHead,
    MarginHead,
    build_head,
    head_weight,
)
from .losses import (
    CRITERIA,
    DiscountedCrossEntropy,
    discounted_cross_entropy,
    margins,
    resolve_criterion,
)
from .manual_step import ManualStepClassifier
from .parameters import global_norm, match_parameters
from .penalties import CurvaturePenaltyClassifier, composite_batchnorm
from .sam import SAMClassifier, riemannian_epsilon, sam_epsilon
from .scale_invariance import (
    UnitNormCopy,
    scale_invariant_parameters,
    scale_invariant_structure,
    select_scale_invariant,
    unit_norm_copy,
)
from .state import ModelState, batchnorm_mode, preserved_batchnorm_stats, preserved_state

__all__ = [
    "CRITERIA",
    "HEADS",
    "HEAD_INITS",
    "ArcFaceHead",
    "CosFaceHead",
    "Head",
    "L2SoftmaxHead",
    "LinearHead",
    "CurvaturePenaltyClassifier",
    "DiscountedCrossEntropy",
    "HessianOperator",
    "ManualStepClassifier",
    "MarginClassifier",
    "MarginHead",
    "ModelState",
    "SAMClassifier",
    "TraceEstimate",
    "UnitNormCopy",
    "available_backbones",
    "batchnorm_mode",
    "build_backbone",
    "build_head",
    "composite_batchnorm",
    "default_optimizer",
    "discounted_cross_entropy",
    "global_norm",
    "head_weight",
    "hessian_vector_products",
    "hutchinson",
    "hutchinson_forms",
    "hutchpp",
    "lanczos_top_eigenvalues",
    "margins",
    "match_parameters",
    "preserved_batchnorm_stats",
    "preserved_state",
    "rademacher",
    "rademacher_like",
    "register_backbone",
    "resolve_criterion",
    "riemannian_epsilon",
    "sam_epsilon",
    "scale_invariant_parameters",
    "scale_invariant_structure",
    "select_scale_invariant",
    "unit_norm_copy",
]
