"""The ``lightning`` command (LightningCLI), packaged configs, and the boosting orchestrator."""

from .cli import MarginBoostCLI, build_cli, main, packaged_configs, resolve_config

__all__ = ["MarginBoostCLI", "build_cli", "main", "packaged_configs", "resolve_config"]
