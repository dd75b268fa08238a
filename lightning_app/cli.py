"""The ``lightning`` / ``marginboost`` command: a LightningCLI for the project's LightningModules.

``--config NAME.yaml`` is looked up as a path first, then among the packaged configs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from datamodules import GapDataModule

from .boosting import BoostingConfig, BoostingOrchestrator

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
    """LightningCLI with the data set's ``num_classes``/``input_shape`` linked into the model.

    A ``boosting:`` section in the config turns ``fit`` into a :class:`BoostingOrchestrator` run;
    without it ``fit`` trains one model.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")
        parser.add_argument("--boosting", type=BoostingConfig | None, default=None,
                            help="Boosting section: train members in sequence with gaps fed back.")

    def fit(self, model, datamodule=None, ckpt_path=None, **kwargs):
        boosting = self._get(self.config_init, "boosting", default=None)
        if boosting is None:
            return self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)
        overrides = {}
        if ckpt_path is not None:  # --ckpt_path RUN_DIR or RUN_DIR/state.pt resumes that run
            path = Path(ckpt_path)
            overrides = {"run_dir": path.parent if path.is_file() else path, "resume": True}
        orchestrator = BoostingOrchestrator.from_config(boosting, **overrides)
        return orchestrator.run(self._member_model, self._member_trainer, datamodule)

    def _member_model(self, round_index: int, seed: int):
        """A fresh member: the config instantiated again (after the orchestrator seeded)."""
        self._member_init = self.parser.instantiate_classes(self.config)
        return self._get(self._member_init, "model")

    def _member_trainer(self, round_index: int, round_dir: Path):
        """A fresh Trainer from the same config, logging and checkpointing under ``round_dir``."""
        init = self._member_init
        config = dict(self._get(init, "trainer", default={}))
        if config.get("logger", True) is not False:
            config["logger"] = TensorBoardLogger(save_dir=str(round_dir.parent), name=round_dir.name)
        config["default_root_dir"] = str(round_dir)
        extra = [self._get(init, key) for key in self._parser(self.subcommand).callback_keys]
        return self._instantiate_trainer(config, extra)

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
    # Any LightningModule (MarginClassifier, HyperNetClassifier, ...) taking num_classes/input_shape.
    return MarginBoostCLI(L.LightningModule, GapDataModule, subclass_mode_model=True, subclass_mode_data=True,
                          args=args, run=run, **kwargs)


def main(args: list[str] | None = None) -> None:
    argv = resolve_config_args(list(sys.argv[1:] if args is None else args))
    build_cli(argv)


if __name__ == "__main__":
    main()
