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
