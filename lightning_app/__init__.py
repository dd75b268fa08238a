"""The ``lightning`` command (LightningCLI), packaged configs, the boosting orchestrator,
the generalization-gap predictor; the model zoo is ``lightning_app.zoo`` (not imported here, so
``python -m lightning_app.zoo`` runs it as a script cleanly)."""

from .boosted_ensemble import BoostedEnsemble, EnsemblePredictionWriter
from .boosting import (
    BoostingConfig,
    BoostingOrchestrator,
    RoundCheckpoint,
    member_seed,
    training_set_fingerprint,
)
from .cli import MarginBoostCLI, build_cli, main, packaged_configs, resolve_config
from .ensemble import brier_score, ensemble_metrics
from .ensemble_logging import EnsembleLogger
from .gap_predictor import GapPredictor
from .gap_rules import (
    ClippedGapRule,
    GapRule,
    MeanGapRule,
    NoGapRule,
    NormalizedGapRule,
    TargetGapRule,
)
from .snapshot import warm_start

__all__ = [
    "BoostedEnsemble",
    "BoostingConfig",
    "BoostingOrchestrator",
    "ClippedGapRule",
    "EnsembleLogger",
    "EnsemblePredictionWriter",
    "GapPredictor",
    "GapRule",
    "MarginBoostCLI",
    "MeanGapRule",
    "NoGapRule",
    "NormalizedGapRule",
    "RoundCheckpoint",
    "TargetGapRule",
    "brier_score",
    "build_cli",
    "ensemble_metrics",
    "main",
    "member_seed",
    "packaged_configs",
    "resolve_config",
    "training_set_fingerprint",
    "warm_start",
]
