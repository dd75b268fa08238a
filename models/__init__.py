"""LightningModules, backbones, heads and losses."""

from .backbones import available_backbones, build_backbone, register_backbone
from .classifier import MarginClassifier, default_optimizer
from .heads import HEAD_INITS, MarginHead, head_weight
from .losses import DiscountedCrossEntropy, discounted_cross_entropy, margins

__all__ = [
    "HEAD_INITS",
    "DiscountedCrossEntropy",
    "MarginClassifier",
    "MarginHead",
    "available_backbones",
    "build_backbone",
    "default_optimizer",
    "discounted_cross_entropy",
    "head_weight",
    "margins",
    "register_backbone",
]

# Sharpness-aware training and curvature penalties (issue 5).
from .penalties import CurvaturePenaltyClassifier, gradient_norm, hutchinson_trace  # noqa: E402
from .sam import find_scale_invariant, riemannian_epsilon, sam_epsilon  # noqa: E402
from .sharpness_aware import ManualStepClassifier, SAMClassifier  # noqa: E402

__all__ += [
    "CurvaturePenaltyClassifier",
    "ManualStepClassifier",
    "SAMClassifier",
    "find_scale_invariant",
    "gradient_norm",
    "hutchinson_trace",
    "riemannian_epsilon",
    "sam_epsilon",
]
