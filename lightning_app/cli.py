"""The ``lightning`` / ``marginboost`` command: a LightningCLI for ``MarginClassifier``.

``--config NAME.yaml`` is looked up as a path first, then among the packaged configs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI

from datamodules import GapDataModule
from models import MarginClassifier

CONFIG_DIR = Path(__file__).parent / "configs"


def packaged_configs() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config(name: str) -> str:
    """A local path if it exists, else a packaged config of that file name, else an error."""
    if Path(name).exists():
        return name
    packaged = CONFIG_DIR / Path(name).name
    if packaged.is_file():
        return str(packaged)
    raise SystemExit(f"error: --config {name!r}: no such file, and no packaged config of that name; "
                     f"packaged: {packaged_configs()}")


def resolve_config_args(argv: list[str]) -> list[str]:
    """Rewrite every ``--config X`` / ``--config=X`` / ``-c X`` argument with :func:`resolve_config`."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") and i + 1 < len(argv):
            out += [arg, resolve_config(argv[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + resolve_config(arg.split("=", 1)[1])
        out.append(arg)
        i += 1
    return out


class MarginBoostCLI(LightningCLI):
    """LightningCLI with the data set's ``num_classes``/``input_shape`` linked into the model."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # A Rich progress bar by default, unless the config turns bars off or brings its own.
        configured = list(config.get("callbacks") or []) + list(callbacks)
        if config.get("enable_progress_bar", True) is not False and not any(
                isinstance(c, ProgressBar) for c in configured):
            callbacks = [*callbacks, RichProgressBar()]
        return super()._instantiate_trainer(config, callbacks)


def build_cli(args: list[str] | None = None, run: bool = True, **kwargs) -> MarginBoostCLI:
    kwargs.setdefault("trainer_defaults", {
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": "runs", "name": "marginboost"}},
    })
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    return MarginBoostCLI(MarginClassifier, GapDataModule, subclass_mode_model=True, subclass_mode_data=True,
                          args=args, run=run, **kwargs)


def main(args: list[str] | None = None) -> None:
    argv = resolve_config_args(list(sys.argv[1:] if args is None else args))
    build_cli(argv)


if __name__ == "__main__":
    main()
