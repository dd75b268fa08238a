"""LightningModules, backbones, heads, losses, and the model-level maths the metrics share.

Where a thing lives:

* ``classifier``: ``MarginClassifier`` (backbone + ``W ∘ BN`` head + discounted loss);
  ``backbones``, ``heads``, ``losses`` (the discounted cross-entropy, margins, named criteria).
* ``manual_step``: ``ManualStepClassifier``, the base of multi-pass training methods;
  ``sam``: SAM / ASAM / Riemannian SAM; ``penalties``: gradient-norm and Hessian-trace penalties.
* ``state``: snapshot and restore of parameters, buffers, grads, modes and RNG; BN helpers.
* ``parameters``: parameters by regex (the one naming convention), the global norm.
* ``scale_invariance``: which weights are scale-invariant, and their unit-norm copy.
* ``margin_bounds``: the seed's mean-margin value ``2/K·‖W‖₁`` and the actual maximum of the mean
  margin over BN-normalised features for a head ``W``.
* ``curvature``: Hessian-vector products, Rademacher probes, Hutchinson, Hutch++, Lanczos.
* ``schedulers``: learning-rate schedules over the run's length (``CosineAnnealingRunLR``).
* ``variational``: diagonal Gaussian weights over any network (``VariationalNet``,
  ``VariationalModel``), the closed-form KL; ``hypernet``: hypernetworks ``G(λ)`` and
  ``HyperNetClassifier``; ``pruning``: pruning by relative density, stability.
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
from .hypernet import (
    HYPERNET_MODES,
    BinnedAccuracy,
    HyperNetClassifier,
    HyperNetwork,
    LinearHyperNet,
    LowRankHyperNet,
    lambda_coordinate,
    sample_log_lambda,
)
from .losses import (
    CRITERIA,
    DiscountedCrossEntropy,
    discounted_cross_entropy,
    margins,
    resolve_criterion,
)
from .manual_step import ManualStepClassifier
from .margin_bounds import max_bn_mean_margin, seed_mean_margin_value
from .parameters import global_norm, match_parameters
from .penalties import CurvaturePenaltyClassifier, composite_batchnorm
from .pruning import (
    count_parameter_updates,
    plot_pruning_curves,
    prune_by_relative_density,
    pruned_mean,
    pruning_curve,
    pruning_masks,
    relative_density,
    stability,
)
from .sam import SAMClassifier, riemannian_epsilon, sam_epsilon
from .scale_invariance import (
    UnitNormCopy,
    scale_invariant_parameters,
    scale_invariant_structure,
    select_scale_invariant,
    unit_norm_copy,
)
from .schedulers import CosineAnnealingRunLR
from .state import ModelState, batchnorm_mode, preserved_batchnorm_stats, preserved_state
from .variational import (
    VariationalModel,
    VariationalNet,
    gaussian_kl,
    negative_evidence,
    sample_weights,
)

__all__ = [
    "CRITERIA",
    "HEADS",
    "HEAD_INITS",
    "CosineAnnealingRunLR",
    "HYPERNET_MODES",
    "BinnedAccuracy",
    "ArcFaceHead",
    "CosFaceHead",
    "Head",
    "L2SoftmaxHead",
    "LinearHead",
    "CurvaturePenaltyClassifier",
    "DiscountedCrossEntropy",
    "HessianOperator",
    "HyperNetClassifier",
    "HyperNetwork",
    "LinearHyperNet",
    "LowRankHyperNet",
    "ManualStepClassifier",
    "MarginClassifier",
    "MarginHead",
    "ModelState",
    "SAMClassifier",
    "TraceEstimate",
    "UnitNormCopy",
    "VariationalModel",
    "VariationalNet",
    "available_backbones",
    "batchnorm_mode",
    "build_backbone",
    "build_head",
    "composite_batchnorm",
    "count_parameter_updates",
    "default_optimizer",
    "discounted_cross_entropy",
    "gaussian_kl",
    "global_norm",
    "head_weight",
    "hessian_vector_products",
    "hutchinson",
    "hutchinson_forms",
    "hutchpp",
    "lambda_coordinate",
    "lanczos_top_eigenvalues",
    "margins",
    "match_parameters",
    "negative_evidence",
    "plot_pruning_curves",
    "max_bn_mean_margin",
    "preserved_batchnorm_stats",
    "preserved_state",
    "prune_by_relative_density",
    "pruned_mean",
    "pruning_curve",
    "pruning_masks",
    "rademacher",
    "rademacher_like",
    "register_backbone",
    "relative_density",
    "resolve_criterion",
    "riemannian_epsilon",
    "sam_epsilon",
    "sample_log_lambda",
    "sample_weights",
    "scale_invariant_parameters",
    "scale_invariant_structure",
    "seed_mean_margin_value",
    "select_scale_invariant",
    "stability",
    "unit_norm_copy",
]

# Mode connectivity (issue 12): paths, alignment, evaluation along paths, the curve LightningModule.
from .connectivity import (  # noqa: E402
    ArcPath,
    BezierCurve,
    CurvePath,
    LinearPath,
    PolygonalChain,
    align,
    align_activations,
    align_ot,
    align_weights,
    evaluate_path,
    hidden_layers,
    make_path,
    path_metrics,
    permute_hidden_units,
    reset_bn_statistics,
    t_grid,
)
from .connectivity.curve_classifier import CurveClassifier  # noqa: E402

__all__ += [
    "ArcPath",
    "BezierCurve",
    "CurveClassifier",
    "CurvePath",
    "LinearPath",
    "PolygonalChain",
    "align",
    "align_activations",
    "align_ot",
    "align_weights",
    "evaluate_path",
    "hidden_layers",
    "make_path",
    "path_metrics",
    "permute_hidden_units",
    "reset_bn_statistics",
    "t_grid",
]
