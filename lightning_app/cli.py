"""The ``lightning`` / ``marginboost`` command: a LightningCLI for the project's LightningModules.

``--config NAME.yaml`` is looked up as a path first, then among the packaged configs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import BasePredictionWriter, LearningRateMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from datamodules import GapDataModule
from marginboost.allocator import tune_malloc
from marginboost.errors import ConfigError

from .boosted_ensemble import BoostedEnsemble, EnsemblePredictionWriter
from .boosting import BoostingConfig, BoostingOrchestrator, _check_trainer_trains, member_seed
from .cli_help import parser_kwargs, program_name
from .console import VERBOSE_FLAG, ConsoleSettings, quiet_console
from .ensemble_logging import (
    ConfigHyperparameters,
    DefaultLearningRateMonitor,
    EnsembleLogger,
    ensemble_loggers,
    hparams_from_config,
)
from .run_dir import STATE_FILE, flatten_config, load_state

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


# Trainer fields that change what a member learns; the others (devices, loggers, progress bars,
# callbacks, validation cadence) are free to change when a boosting run is resumed.
RESULT_TRAINER_FIELDS = ("max_epochs", "min_epochs", "max_steps", "min_steps", "max_time", "limit_train_batches",
                         "overfit_batches", "precision", "accumulate_grad_batches", "gradient_clip_val",
                         "gradient_clip_algorithm", "deterministic", "sync_batchnorm",
                         "reload_dataloaders_every_n_epochs")
# Data fields that only change how data is delivered, not which samples or how they are augmented.
FREE_DATA_FIELDS = ("num_workers", "pin_memory", "persistent_workers", "data_dir", "download")
# Boosting fields outside the fingerprint: where the run lives, whether to resume, the number of
# rounds (raising it extends a run) and how many members train at once; the gap rule, seed and
# training_margins are compared by the orchestrator itself.
FREE_BOOSTING_FIELDS = ("run_dir", "resume", "rounds", "gap_rule", "seed", "training_margins", "concurrent_members")


def result_fingerprint(config) -> dict[str, str]:
    """``{field: json}`` of the resolved config fields that change a boosting run's results."""
    get = config.get if hasattr(config, "get") else (lambda key, default=None: getattr(config, key, default))
    out = flatten_config(get("model"), "model")
    for key, value in flatten_config(get("data"), "data").items():
        if key.rsplit(".", 1)[-1] not in FREE_DATA_FIELDS:
            out[key] = value
    trainer = get("trainer") or {}
    trainer = trainer.as_dict() if hasattr(trainer, "as_dict") else dict(trainer)
    out.update(flatten_config({k: trainer.get(k) for k in RESULT_TRAINER_FIELDS}, "trainer"))
    boosting = get("boosting")
    boosting = boosting.as_dict() if hasattr(boosting, "as_dict") else dict(vars(boosting) if boosting else {})
    out.update(flatten_config({k: v for k, v in boosting.items() if k not in FREE_BOOSTING_FIELDS}, "boosting"))
    return out


class MarginBoostCLI(LightningCLI):
    """LightningCLI with the data set's ``num_classes``/``input_shape`` linked into the model.

    A ``boosting:`` section in the config turns ``fit`` into a :class:`BoostingOrchestrator` run and
    ``validate``/``test``/``predict`` into an evaluation of its :class:`BoostedEnsemble`; without it
    the subcommands train or evaluate one model (evaluation needs ``--ckpt_path``).
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")
        parser.add_argument("--boosting", type=BoostingConfig | None, default=None,
                            help="Boosting section: train members in sequence with gaps fed back.")

    def parse_arguments(self, parser, args) -> None:
        # Packaged config names are resolved here, on sys.argv itself when run from the command line:
        # handing a rewritten copy to LightningCLI(args=...) makes it warn about args and sys.argv.
        # The bare flag --verbose is the console's (Trainer.validate/test own a `verbose` argument).
        self.console_settings = ConsoleSettings()
        if isinstance(args, (dict, Namespace)):
            return super().parse_arguments(parser, args)
        argv = list(sys.argv[1:] if args is None else args)
        self.console_settings.verbose = VERBOSE_FLAG in argv
        argv = [arg for arg in argv if arg != VERBOSE_FLAG]
        self.config = parser.parse_args(resolve_config_args(argv))

    def before_instantiate_classes(self) -> None:
        quiet_console(self.console_settings.verbose)

    # -- checks before any training ---------------------------------------------------------
    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self.subcommand is None:
            return
        boosting = self._boosting()
        ckpt_path = self._get(self.config, "ckpt_path", default=None)
        if boosting is None:
            if self.subcommand in ("validate", "test", "predict") and ckpt_path is None:
                raise ConfigError("ckpt_path", None,
                                  f"the checkpoint of a trained model (lightning {self.subcommand} --config ... "
                                  "--ckpt_path PATH); without it the model is freshly initialised")
            return
        if self.subcommand == "fit":
            _check_trainer_trains(self.trainer)
            if boosting.concurrent_members != 1 and self.trainer.world_size > 1:
                raise ConfigError("boosting.concurrent_members", boosting.concurrent_members,
                                  f"1 when each member's trainer spans {self.trainer.world_size} processes "
                                  "(trainer.devices, trainer.num_nodes)")
            overrides = self._run_dir_overrides(ckpt_path)
            # the ensemble logs to the config's loggers (files re-rooted into the run directory)
            logger = EnsembleLogger(ensemble_loggers(self.trainer.loggers, overrides.get("run_dir", boosting.run_dir)),
                                    hparams=self._config_hparams())
            self.orchestrator = BoostingOrchestrator.from_config(
                boosting, config_fingerprint=result_fingerprint(self.config[self.subcommand]),
                ensemble_logger=logger, **overrides)
            self.orchestrator.check_startable()
        else:
            run_dir = self._run_dir_overrides(ckpt_path).get("run_dir", boosting.run_dir)
            load_state(run_dir)  # a clear error before any data is loaded if there is no run

    def _boosting(self):
        return self._get(self.config_init, "boosting", default=None)

    def _config_hparams(self) -> dict:
        """The whole resolved config, flat: the hyperparameters of every run this command logs."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        return {k: v for k, v in hparams_from_config(config).items() if k.split(".")[0] != "config"}

    @staticmethod
    def _run_dir_overrides(ckpt_path) -> dict:
        """``--ckpt_path RUN_DIR`` (or ``RUN_DIR/state.pt``) names the run to resume or evaluate."""
        if ckpt_path is None:
            return {}
        path = Path(ckpt_path)
        if path.is_file() and path.name != STATE_FILE:
            raise ConfigError("ckpt_path", str(ckpt_path), f"a boosting run directory or its {STATE_FILE} "
                              "(a config with a boosting: section evaluates the whole run)")
        return {"run_dir": str(path.parent if path.is_file() else path), "require_existing": True}

    # -- subcommands ------------------------------------------------------------------------
    def fit(self, model, datamodule=None, ckpt_path=None, **kwargs):
        if self._boosting() is None:
            return self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)
        return self.orchestrator.run(self._member_model, self._member_trainer, datamodule,
                                     member_launcher=self._member_launcher())

    def _member_launcher(self):
        """With ``boosting.concurrent_members > 1``: the resolved config written next to the run and
        the launcher of the worker processes that read it (``member_worker.py``)."""
        if self.orchestrator.concurrent_members == 1:
            return None
        from .member_worker import CONFIG_FILE, launcher

        path = self.orchestrator.run_dir / CONFIG_FILE
        path.write_text(self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False))
        return launcher(path.resolve())

    def _ensemble(self, ckpt_path) -> tuple[BoostedEnsemble, Path]:
        run_dir = Path(self._run_dir_overrides(ckpt_path).get("run_dir", self._boosting().run_dir))
        ensemble = BoostedEnsemble.from_run_dir(run_dir)
        state = load_state(run_dir)
        if state["rounds_done"] < self._boosting().rounds:
            rank_zero_warn(f"boosting run {run_dir} has {state['rounds_done']} of {self._boosting().rounds} rounds; "
                           "evaluating the members it has")
        return ensemble, run_dir

    def validate(self, model, datamodule=None, ckpt_path=None, **kwargs):
        if self._boosting() is None:
            return self.trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)
        return self.trainer.validate(self._ensemble(ckpt_path)[0], datamodule=datamodule, **kwargs)

    def test(self, model, datamodule=None, ckpt_path=None, **kwargs):
        if self._boosting() is None:
            return self.trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)
        return self.trainer.test(self._ensemble(ckpt_path)[0], datamodule=datamodule, **kwargs)

    def predict(self, model, datamodule=None, ckpt_path=None, **kwargs):
        if self._boosting() is None:
            return self.trainer.predict(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)
        ensemble, run_dir = self._ensemble(ckpt_path)
        writers = [c for c in self.trainer.callbacks if isinstance(c, BasePredictionWriter)]
        if not writers:
            writers = [EnsemblePredictionWriter(run_dir / "predictions")]
            self.trainer.callbacks.append(writers[0])
        kwargs.setdefault("return_predictions", False)
        out = self.trainer.predict(ensemble, datamodule=datamodule, **kwargs)
        for writer in writers:
            if getattr(writer, "path", None) is not None:
                rank_zero_info(f"predictions written to {writer.path}")
        return out

    # -- the members of a boosting run --------------------------------------------------------
    def _member_model(self, t: int, seed: int):
        """A fresh member: the config instantiated again (after the orchestrator seeded)."""
        self._member_init = self.parser.instantiate_classes(self.config)
        return self._get(self._member_init, "model")

    def _member_trainer(self, t: int, round_dir: Path):
        """A fresh Trainer from the same config, logging and checkpointing under ``round_dir``."""
        init = self._member_init
        config = dict(self._get(init, "trainer", default={}))
        if config.get("logger", True) is not False:
            config["logger"] = TensorBoardLogger(save_dir=str(round_dir.parent), name=round_dir.name,
                                                 default_hp_metric=False)
        config["default_root_dir"] = str(round_dir)
        extra = [self._get(init, key) for key in self._parser(self.subcommand).callback_keys]
        boosting = self._boosting()
        extra.append(ConfigHyperparameters({**self._config_hparams(), "boosting.round": t,
                                            "boosting.member_seed": member_seed(boosting.seed, t)}))
        return self._instantiate_trainer(config, extra)

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # Our Rich bar and a model summary once per process, unless configured otherwise (console.py).
        console = getattr(self, "console_settings", None) or ConsoleSettings()
        callbacks = console.trainer_callbacks(config, callbacks)
        configured = list(config.get("callbacks") or []) + list(callbacks)
        # the learning rate and the whole config as hyperparameters, unless the config brings its own
        if not any(isinstance(c, LearningRateMonitor) for c in configured):
            callbacks = [*callbacks, DefaultLearningRateMonitor()]
        if not any(isinstance(c, ConfigHyperparameters) for c in configured):
            callbacks = [*callbacks, ConfigHyperparameters(self._config_hparams())]
        return super()._instantiate_trainer(config, callbacks)


def build_cli(args: list[str] | None = None, run: bool = True, prog: str | None = None,
              cli_class: type[MarginBoostCLI] = MarginBoostCLI, **kwargs) -> MarginBoostCLI:
    """The CLI. ``auto_configure_optimizers=False``: the optimizer and LR scheduler exist only as
    ``model.init_args.optimizer`` / ``lr_scheduler`` (one path, honoured by boosting members too).
    ``prog``: the program name ``--help`` shows (``main`` passes how the command was started).
    On CPU, freed activations are kept for reuse (:mod:`marginboost.allocator`;
    ``MARGINBOOST_MALLOC_TUNING=0`` keeps glibc's defaults)."""
    tune_malloc()
    kwargs.setdefault("trainer_defaults", {
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": "runs", "name": "marginboost", "default_hp_metric": False}},
    })
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    kwargs.setdefault("auto_configure_optimizers", False)
    kwargs.setdefault("parser_kwargs", parser_kwargs(prog))
    # Any LightningModule (MarginClassifier, HyperNetClassifier, ...) taking num_classes/input_shape.
    return cli_class(L.LightningModule, GapDataModule, subclass_mode_model=True, subclass_mode_data=True,
                     args=args, run=run, **kwargs)


def user_error(exc: BaseException) -> str | None:
    """The one-line message of a user's mistake: a ``ConfigError`` in ``exc`` or its causes.

    jsonargparse wraps what a constructor raises while the config is instantiated in its own
    error, with the original as ``__cause__``; anything else is a bug and keeps its traceback.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConfigError):
            return str(exc)
        seen.add(id(exc))
        exc = exc.__cause__
    return None


def main(args: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["report"]:  # `lightning report RUN_DIR`: not a Trainer subcommand
        from .report import main as report_main

        return report_main(argv[1:], prog=f"{program_name()} report")
    try:
        build_cli(args, prog=program_name())
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
