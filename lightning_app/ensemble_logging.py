"""A boosting run's ensemble, logged through Lightning loggers (step = round).

:class:`EnsembleLogger` publishes every committed round to a list of ``lightning`` loggers:

* to **every** logger: the round's scalars (:func:`round_scalars`) at ``step = t``, and once per
  process the hyperparameters — the whole resolved config (boosting section included), or the
  run's fingerprint from Python;
* to a ``TensorBoardLogger`` in addition: the HParams-tab record with the final ensemble metrics
  as its metrics (:func:`write_tensorboard_hparams`), a ``custom_scalars`` layout
  (:func:`scalar_layout`: boosted/deep/member accuracy, NLL, ECE and Brier in one chart each, margin
  and gap quartiles as band charts), histograms of the margins and gaps, and the four figures of
  :mod:`lightning_app.figures` under ``figures/``.

Default: one ``TensorBoardLogger`` writing ``RUN_DIR/ensemble`` (one events file per process, not
per round). ``lightning fit`` passes the loggers of the config's ``trainer.logger`` instead
(:func:`ensemble_loggers`). Publishing is idempotent: ``ensemble/logged_round.json`` names the last
round logged, so a run that died between ``state.pt`` and its events logs the missing rounds on its
next start, each exactly once.

:class:`ConfigHyperparameters` gives member runs the same hyperparameters (whole config, round,
member seed) in place of the model's ``hparams`` (which carry LightningCLI's ``_instantiator`` and
no optimizer, data or boosting section), without TensorBoard's ``hp_metric = -1`` placeholder.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from models import margins

from .figures import FigureLimits, RunFigureData, figure_to_array, round_figures
from .run_dir import round_dir, save_atomic

ENSEMBLE_DIR = "ensemble"
LOGGED_MARKER = "logged_round.json"
LIMITS_FILE = "figure_limits.json"

ENSEMBLE_METRICS = ("boosted_acc", "boosted_nll", "boosted_ece", "boosted_brier", "deep_acc", "deep_nll",
                    "deep_ece", "deep_brier", "disagreement")
MEMBER_METRICS = ("acc", "nll", "ece", "brier")
# The margin and gap summaries logged as scalars: the quartiles feed the band charts; mean, min and
# the share of negative margins are read on their own. (summary.json keeps all twelve statistics.)
MARGIN_STATS = ("q1", "median", "q3", "mean", "min", "frac_negative")
GAP_STATS = ("q1", "median", "q3", "mean")
MEMBER_HPARAM_METRICS = ("val/acc", "val/loss")


def round_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """``{tag: value}`` of one round record of ``summary.json`` (its ``round`` is the step).

    >>> rec = {"round": 1, **{k: 0.5 for k in ENSEMBLE_METRICS}, **{f"member_{k}_1": 0.25 for k in MEMBER_METRICS},
    ...        "member_train_margin": {k: 1.0 for k in MARGIN_STATS},
    ...        "ensemble_train_margin": {k: 2.0 for k in MARGIN_STATS}, "gap": {k: 3.0 for k in GAP_STATS},
    ...        "sharpness": {"width/width": 4.0}}
    >>> s = round_scalars(rec)
    >>> s["ensemble/boosted_acc"], s["member/acc"], s["member/train_margin_median"], s["gaps/q3"], s["member/width/width"]
    (0.5, 0.25, 1.0, 3.0, 4.0)
    """
    t = record["round"]
    out = {f"ensemble/{key}": float(record[key]) for key in ENSEMBLE_METRICS}
    out.update({f"member/{key}": float(record[f"member_{key}_{t}"]) for key in MEMBER_METRICS})
    for who in ("member", "ensemble"):
        if record.get(f"{who}_train_margin") is None:  # the training set was not scored
            continue
        out.update({f"{who}/train_margin_{key}": float(record[f"{who}_train_margin"][key]) for key in MARGIN_STATS})
    out.update({f"gaps/{key}": float(record["gap"][key]) for key in GAP_STATS})
    out.update({f"member/{key}": float(value) for key, value in record.get("sharpness", {}).items()})
    return out


def scalar_layout() -> dict[str, dict[str, list]]:
    """The ``custom_scalars`` layout: one chart per metric, the three predictors on it; quartile bands."""
    charts = {
        f"{name} (boosted, deep, member t)": ["Multiline", [f"ensemble/boosted_{key}", f"ensemble/deep_{key}",
                                                            f"member/{key}"]]
        for key, name in (("acc", "accuracy"), ("nll", "NLL"), ("ece", "ECE"), ("brier", "Brier"))}
    charts["disagreement"] = ["Multiline", ["ensemble/disagreement"]]
    bands = {
        f"{name}: median, q1-q3 band": ["Margin", [f"{prefix}median", f"{prefix}q1", f"{prefix}q3"]]
        for prefix, name in (("member/train_margin_", "member training margin"),
                             ("ensemble/train_margin_", "ensemble training margin"), ("gaps/", "gap"))}
    return {"boosting: validation": charts, "boosting: margins and gaps": bands}


def hparams_from_config(config: Any, prefix: str = "") -> dict[str, bool | int | float | str]:
    """A resolved config as flat ``{dotted.field: value}``: numbers, booleans and strings as they are,
    ``None`` and containers as JSON text (what every logger's hyperparameter table takes)."""
    from .run_dir import flatten_config

    out: dict[str, bool | int | float | str] = {}
    for key, text in flatten_config(config, prefix).items():
        value = json.loads(text)
        out[key] = value if isinstance(value, (bool, int, float, str)) else text
    return out


def write_tensorboard_hparams(logger: TensorBoardLogger, params: Mapping[str, Any], metric_tags: Iterable[str]) -> None:
    """The HParams-tab record: ``params`` with ``metric_tags`` (scalar tags of the same run) as metrics.

    TensorBoard reads each metric's latest value from its scalar tag, so the table shows the final
    ensemble metrics without a placeholder value at step 0 (Lightning's ``hp_metric``).
    """
    from torch.utils.tensorboard.summary import hparams

    params = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in params.items()}
    exp, ssi, sei = hparams(params, {tag: 0.0 for tag in metric_tags})  # values unused: names only
    writer = logger.experiment._get_file_writer()
    for summary in (exp, ssi, sei):
        writer.add_summary(summary)


def log_config_hparams(logger: Logger, params: Mapping[str, Any], metric_tags: Iterable[str]) -> None:
    """``params`` as the hyperparameters of ``logger``'s run; TensorBoard also gets its HParams record."""
    if isinstance(logger, TensorBoardLogger):
        logger.hparams.update(params)  # hparams.yaml, written by save(); no hp_metric placeholder
        write_tensorboard_hparams(logger, params, metric_tags)
        logger.save()
    else:
        logger.log_hyperparams(dict(params))


class ConfigHyperparameters(L.Callback):
    """Log ``params`` (the resolved config) as a member run's hyperparameters, with ``metric_tags``.

    Lightning would log the model's and data module's ``hparams`` (LightningCLI's ``_instantiator``
    included, the optimizer, data and boosting section not); this callback turns that off for the
    run and logs the whole config instead, once, at fit start.
    """

    def __init__(self, params: Mapping[str, Any], metric_tags: Sequence[str] = MEMBER_HPARAM_METRICS) -> None:
        self.params, self.metric_tags = dict(params), tuple(metric_tags)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":  # validate/test/predict keep Lightning's behaviour
            return
        pl_module._log_hyperparams = False
        if trainer.datamodule is not None:
            trainer.datamodule._log_hyperparams = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                log_config_hparams(logger, self.params, self.metric_tags)


def default_ensemble_logger(run_dir: str | Path) -> TensorBoardLogger:
    """TensorBoard events in ``run_dir/ensemble`` (no version subfolder, no ``hp_metric``)."""
    return TensorBoardLogger(save_dir=str(run_dir), name=ENSEMBLE_DIR, version="", default_hp_metric=False)


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` that continues the ``metrics.csv`` of a run's earlier processes.

    Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts; a resumed boosting
    run must keep the rounds logged before, so rank 0 reads the file first and writes it back
    under the new writer, whose header then starts from the old one.
    """

    @property
    def experiment(self):
        path = Path(self.log_dir) / "metrics.csv"
        restore = self._experiment is None and rank_zero_only.rank == 0 and path.is_file()
        previous = path.read_text() if restore else ""
        with warnings.catch_warnings():  # "... will be deleted": not this file, it is restored below
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            writer = CSVLogger.experiment.fget(self)
        if previous:
            path.write_text(previous)
            writer.metrics_keys = sorted(next(csv.reader(previous.splitlines()), []))
        return writer


def ensemble_loggers(configured: Sequence[Logger], run_dir: str | Path) -> list[Logger]:
    """The ensemble's loggers for the loggers a config brings.

    A ``TensorBoardLogger`` or ``CSVLogger`` (files) is re-rooted into the run directory
    (``run_dir/ensemble`` and ``run_dir/ensemble/csv``), so that a run's files stay together and a
    resumed run writes to the same place; any other logger (W&B, MLflow, ...) is used as configured.
    No logger (``trainer.logger: false``): nothing is logged.
    """
    run_dir = Path(run_dir)
    out: list[Logger] = []
    for logger in configured:
        if isinstance(logger, TensorBoardLogger):
            out.append(default_ensemble_logger(run_dir))
        elif isinstance(logger, CSVLogger):
            out.append(RunCSVLogger(save_dir=str(run_dir / ENSEMBLE_DIR), name="csv", version=""))
        else:
            out.append(logger)
    return out


def _hparams_from_state(state: Mapping[str, Any], rounds: int) -> dict[str, Any]:
    """Without a config (the Python API): the run's fingerprint, as the hyperparameters."""
    out: dict[str, Any] = {"boosting.rounds": rounds}
    for key, text in state["fingerprint"].items():
        value = json.loads(text)
        out[key] = value if isinstance(value, (bool, int, float, str)) else text
    return out


def load_figure_data(run_dir: str | Path, state: Mapping[str, Any], targets: Tensor | None = None) -> RunFigureData:
    """The figures' data of the committed rounds, from ``round_<t>/margins.pt`` and ``state``.

    A ``margins.pt`` saved before ensemble margins were kept lacks them: round 1's are member 1's
    margins (one member is its own ensemble), the last round's are recomputed from ``state``'s summed
    training logits when ``targets`` (training labels) are given, other rounds get no curve.
    """
    normalised, gaps = {}, {}
    for t in range(1, state["rounds_done"] + 1):
        saved = torch.load(round_dir(run_dir, t) / "margins.pt", map_location="cpu", weights_only=True)
        gaps[t] = saved["gaps"]
        if saved.get("member_margins") is None:  # a round that scored no training margins
            continue
        if "ensemble_margins" in saved:
            normalised[t] = saved["ensemble_margins"] / t
        elif t == 1:
            normalised[t] = saved["member_margins"]
        elif t == state["rounds_done"] and targets is not None and state.get("train_logit_sum") is not None:
            normalised[t] = margins(state["train_logit_sum"], targets) / t
    return RunFigureData(normalised_margins=normalised, gaps=gaps, history=list(state["history"]),
                         val_logits=list(state["val_logits"]), val_y=state.get("val_y"))


def figure_limits(run_dir: str | Path, data: RunFigureData, rounds: int,
                  gap_bounds: tuple[float | None, float | None] = (None, None), save: bool = True) -> FigureLimits:
    """The run's stored :class:`FigureLimits` (``ensemble/figure_limits.json``), else made from round 1."""
    path = Path(run_dir) / ENSEMBLE_DIR / LIMITS_FILE
    if path.is_file():
        return FigureLimits.load(path)
    limits = FigureLimits.from_round_one(data.normalised_margins.get(1), data.gaps[1], data.history[0], rounds,
                                         gap_bounds)
    if save:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(limits.to_json(), path)
    return limits


class EnsembleLogger:
    """Publishes a boosting run's committed rounds to Lightning loggers (see the module docstring).

    Args:
        loggers: the loggers; ``None``: :func:`default_ensemble_logger` in the run directory; ``[]``:
            no logging (the marker is left alone, so a later start with a logger logs every round).
        hparams: the hyperparameters (``lightning fit`` passes the whole resolved config, flat);
            ``None``: the run's fingerprint and ``rounds``.
    """

    def __init__(self, loggers: Sequence[Logger] | None = None, hparams: Mapping[str, Any] | None = None) -> None:
        self._loggers = None if loggers is None else list(loggers)
        self.hparams = None if hparams is None else dict(hparams)
        self._hparams_logged: set[int] = set()

    def loggers(self, run_dir: str | Path) -> list[Logger]:
        if self._loggers is None:
            self._loggers = [default_ensemble_logger(run_dir)]
        return self._loggers

    def publish(self, run_dir: str | Path, state: Mapping[str, Any], targets: Tensor, rounds: int,
                gap_bounds: tuple[float | None, float | None] = (None, None)) -> list[int]:
        """Log the committed rounds not logged yet; returns them. Call on rank 0 only."""
        run_dir = Path(run_dir)
        done = state["rounds_done"]
        loggers = self.loggers(run_dir)
        marker = run_dir / ENSEMBLE_DIR / LOGGED_MARKER
        logged = json.loads(marker.read_text())["round"] if marker.is_file() else 0
        if done == 0 or logged >= done or not loggers:
            return []
        data = load_figure_data(run_dir, state, targets)
        limits = figure_limits(run_dir, data, rounds, gap_bounds)
        ensemble_now = margins(state["train_logit_sum"], targets) if state.get("train_logit_sum") is not None else None
        published = []
        for t in range(logged + 1, done + 1):
            for logger in loggers:
                self._log_hparams_once(logger, state, rounds)
                logger.log_metrics(round_scalars(state["history"][t - 1]), step=t)
                if isinstance(logger, TensorBoardLogger):
                    self._log_tensorboard_extras(logger, run_dir, state, data, limits, t,
                                                 ensemble_now if t == done else None)
            for logger in loggers:
                logger.save()
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.flush()
            # after the events are on disk: a crash between the two logs round t again on the next
            # start (the other order would lose it)
            marker.parent.mkdir(parents=True, exist_ok=True)
            save_atomic({"round": t}, marker)
            published.append(t)
        return published

    def _log_hparams_once(self, logger: Logger, state: Mapping[str, Any], rounds: int) -> None:
        if id(logger) in self._hparams_logged:
            return
        params = self.hparams if self.hparams is not None else _hparams_from_state(state, rounds)
        log_config_hparams(logger, params, [f"ensemble/{key}" for key in ENSEMBLE_METRICS])
        if isinstance(logger, TensorBoardLogger):
            from torch.utils.tensorboard.summary import custom_scalars

            logger.experiment._get_file_writer().add_summary(custom_scalars(scalar_layout()))
        self._hparams_logged.add(id(logger))

    @staticmethod
    def _log_tensorboard_extras(logger: TensorBoardLogger, run_dir: Path, state: Mapping[str, Any],
                                data: RunFigureData, limits: FigureLimits, t: int,
                                ensemble_margins: Tensor | None) -> None:
        """Histograms and figures of round ``t`` (TensorBoard only: other loggers take no images)."""
        writer = logger.experiment
        saved = torch.load(round_dir(run_dir, t) / "margins.pt", map_location="cpu", weights_only=True)
        writer.add_histogram("gaps/values", saved["gaps"], t)
        if saved.get("member_margins") is not None:  # else the round scored no training margins
            writer.add_histogram("margins/member", saved["member_margins"], t)
            if t in data.normalised_margins:
                writer.add_histogram("margins/ensemble", data.normalised_margins[t] * t, t)
            elif ensemble_margins is not None:
                writer.add_histogram("margins/ensemble", ensemble_margins, t)
            writer.add_histogram("margins/cumulative", saved["M"], t)
        for name, fig in round_figures(data, t, limits).items():
            writer.add_image(f"figures/{name}", figure_to_array(fig), t, dataformats="HWC")


class DefaultLearningRateMonitor(LearningRateMonitor):
    """Lightning's ``LearningRateMonitor`` (``lr-<Optimizer>`` per epoch, or per step with a step
    scheduler), added to every ``lightning fit`` trainer by default: silent when the run has no logger
    (where the plain callback would stop the run)."""

    def on_train_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._enabled = bool(trainer.loggers)
        if self._enabled:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            super().on_train_epoch_start(trainer, *args, **kwargs)
