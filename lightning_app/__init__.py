"""The ``lightning`` command (LightningCLI), packaged configs, and the boosting orchestrator."""

from .boosting import BoostingConfig, BoostingOrchestrator, training_set_fingerprint
from .cli import MarginBoostCLI, build_cli, main, packaged_configs, resolve_config
from .ensemble import ensemble_metrics
from .gap_rules import (
    ClippedGapRule,
    GapRule,
    MeanGapRule,
    NoGapRule,
    NormalizedGapRule,
    TargetGapRule,
)

__all__ = [
    "BoostingConfig",
    "BoostingOrchestrator",
    "ClippedGapRule",
    "GapRule",
    "MarginBoostCLI",
    "MeanGapRule",
    "NoGapRule",
    "NormalizedGapRule",
    "TargetGapRule",
    "build_cli",
    "ensemble_metrics",
    "main",
    "packaged_configs",
    "resolve_config",
    "training_set_fingerprint",
]
