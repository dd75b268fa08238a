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
from .heads import HEAD_INITS, MarginHead, head_weight
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
    "HEAD_INITS",
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

# Variational networks, hypernetworks with complexity control, pruning (issue 13).
from .hypernet import (  # noqa: E402
    HYPERNET_MODES,
    BinnedAccuracy,
    HyperNetClassifier,
    HyperNetwork,
    LinearHyperNet,
    LowRankHyperNet,
    lambda_coordinate,
    sample_log_lambda,
)
from .pruning import (  # noqa: E402
    count_parameter_updates,
    plot_pruning_curves,
    prune_by_relative_density,
    pruned_mean,
    pruning_curve,
    pruning_masks,
    relative_density,
    stability,
)
from .variational import (  # noqa: E402
    VariationalModel,
    VariationalNet,
    gaussian_kl,
    negative_evidence,
    sample_weights,
)

__all__ += [
    "HYPERNET_MODES",
    "BinnedAccuracy",
    "HyperNetClassifier",
    "HyperNetwork",
    "LinearHyperNet",
    "LowRankHyperNet",
    "VariationalModel",
    "VariationalNet",
    "count_parameter_updates",
    "gaussian_kl",
    "lambda_coordinate",
    "negative_evidence",
    "plot_pruning_curves",
    "prune_by_relative_density",
    "pruned_mean",
    "pruning_curve",
    "pruning_masks",
    "relative_density",
    "sample_log_lambda",
    "stability",
    "sample_weights",
]
