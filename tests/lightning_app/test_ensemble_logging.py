"""The ensemble through Lightning loggers: TensorBoard events read back, CSV values, the crash repair."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from datamodules import Toy2DDataModule
from lightning_app import BoostingOrchestrator, ClippedGapRule
from lightning_app.ensemble_logging import (
    ENSEMBLE_METRICS,
    DefaultLearningRateMonitor,
    EnsembleLogger,
    ensemble_loggers,
    round_scalars,
    scalar_layout,
)
from lightning_app.figures import FIGURE_NAMES
from models import MarginClassifier

REPO = Path(__file__).resolve().parents[2]


def _model(t, seed):
    return MarginClassifier(num_classes=2, input_shape=(2,), backbone="mlp", backbone_kwargs={"width": 8})


def _trainer_factory(member_logger=True):
    def make(t, round_dir):
        logger = (TensorBoardLogger(str(round_dir.parent), name=round_dir.name, default_hp_metric=False)
                  if member_logger else False)
        return L.Trainer(max_epochs=2, accelerator="cpu", logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         log_every_n_steps=1, default_root_dir=str(round_dir),
                         callbacks=[DefaultLearningRateMonitor()])
    return make


def _run(run_dir, rounds=2, loggers=None, member_logger=True):
    orch = BoostingOrchestrator(rounds, ClippedGapRule(-1.0, 2.0), run_dir, seed=3,
                                ensemble_logger=EnsembleLogger(loggers))
    return orch.run(_model, _trainer_factory(member_logger), Toy2DDataModule(num_train=32, num_val=16))


def _accumulator(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # purge_orphaned_data=False: a round logged twice must show up twice, not be dropped as a restart
    return EventAccumulator(str(path), size_guidance={"images": 0, "tensors": 0, "scalars": 0},
                            purge_orphaned_data=False).Reload()


def _hparams(acc):
    """(hyperparameters, metric tags) of the HParams-tab record in a run's events."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    params, metrics = {}, []
    for content in acc.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            for key, value in data.session_start_info.hparams.items():
                params[key] = getattr(value, value.WhichOneof("kind"))
        if data.HasField("experiment"):
            metrics = [m.name.tag for m in data.experiment.metric_infos]
    return params, metrics


def _layout(acc):
    from tensorboard.plugins.custom_scalar import layout_pb2

    event = acc.Tensors("custom_scalars__config__")[-1]
    return layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A 2-round run logging the ensemble to TensorBoard and CSV, members to TensorBoard with the LR."""
    run_dir = tmp_path_factory.mktemp("run")
    loggers = ensemble_loggers([TensorBoardLogger("unused"), CSVLogger("unused")], run_dir)
    summary = _run(run_dir, loggers=loggers)
    return run_dir, summary


def test_tensorboard_holds_hparams_layout_scalars_and_every_figure_each_round(logged_run):
    run_dir, summary = logged_run
    events = list((run_dir / "ensemble").glob("events.out.tfevents.*"))
    assert len(events) == 1  # one events stream for the run, not one file per round
    acc = _accumulator(run_dir / "ensemble")
    # scalars at step = round, equal to summary.json's
    for t, record in enumerate(summary["history"], start=1):
        for tag, value in round_scalars(record).items():
            logged = {e.step: e.value for e in acc.Scalars(tag)}
            assert logged[t] == pytest.approx(value, rel=1e-6), tag
    assert [e.step for e in acc.Scalars("ensemble/boosted_acc")] == [1, 2]
    # the figures, each at every round
    for name in FIGURE_NAMES:
        assert [e.step for e in acc.Images(f"figures/{name}")] == [1, 2], name
    assert {"margins/member", "margins/ensemble", "margins/cumulative", "gaps/values"} <= set(acc.Tags()["histograms"])
    # hparams: the run's fingerprint (gap rule, seed) and rounds, the final ensemble metrics as metrics
    params, metrics = _hparams(acc)
    assert metrics == [f"ensemble/{key}" for key in ENSEMBLE_METRICS]
    assert params["boosting.rounds"] == 2 and params["boosting.seed"] == 3
    assert "ClippedGapRule" in params["boosting.gap_rule"]
    assert "hp_metric" not in acc.Tags()["scalars"]
    # the custom_scalars layout: one chart per metric with the three predictors, quartile bands
    layout = _layout(acc)
    charts = {chart.title: chart for category in layout.category for chart in category.chart}
    assert list(charts["accuracy (boosted, deep, member t)"].multiline.tag) == [
        "ensemble/boosted_acc", "ensemble/deep_acc", "member/acc"]
    assert list(charts["ECE (boosted, deep, member t)"].multiline.tag) == [
        "ensemble/boosted_ece", "ensemble/deep_ece", "member/ece"]
    assert "ensemble/boosted_nll" in charts["NLL (boosted, deep, member t)"].multiline.tag
    band = charts["ensemble training margin: median, q1-q3 band"].margin.series[0]
    assert (band.value, band.lower, band.upper) == (
        "ensemble/train_margin_median", "ensemble/train_margin_q1", "ensemble/train_margin_q3")
    every_tag = {tag for c in charts.values() for tag in c.multiline.tag} | {
        getattr(s, f) for c in charts.values() for s in c.margin.series for f in ("value", "lower", "upper")}
    assert every_tag <= set(acc.Tags()["scalars"])  # the layout names only tags that exist
    assert layout == _layout_from(scalar_layout())


def _layout_from(layout_dict):
    from tensorboard.plugins.custom_scalar import layout_pb2
    from torch.utils.tensorboard.summary import custom_scalars

    return layout_pb2.Layout.FromString(custom_scalars(layout_dict).value[0].tensor.string_val[0])


def test_members_log_their_learning_rate(logged_run):
    run_dir, _ = logged_run
    for t in (1, 2):
        (version,) = (run_dir / f"round_{t}").glob("version_*")
        lr = _accumulator(version).Scalars("lr-SGD")
        assert lr and all(e.value == pytest.approx(0.05) for e in lr)  # MarginClassifier's default SGD lr


def test_csv_logger_gets_the_same_ensemble_metrics_as_summary_json(logged_run):
    run_dir, summary = logged_run
    on_disk = json.loads((run_dir / "summary.json").read_text())
    rows = {int(r["step"]): r for r in _csv_rows(run_dir / "ensemble" / "csv" / "metrics.csv")}
    assert sorted(rows) == [1, 2]
    for record in on_disk["history"]:
        t = record["round"]
        for key in ENSEMBLE_METRICS:
            assert float(rows[t][f"ensemble/{key}"]) == pytest.approx(record[key], rel=1e-12), key
        assert float(rows[t]["member/acc"]) == pytest.approx(record[f"member_acc_{t}"], rel=1e-12)
        assert float(rows[t]["gaps/median"]) == pytest.approx(record["gap"]["median"], rel=1e-12)
    hparams = yaml.safe_load((run_dir / "ensemble" / "csv" / "hparams.yaml").read_text())
    assert hparams["boosting.rounds"] == 2


def test_ensemble_loggers_reroot_files_and_keep_other_loggers(tmp_path):
    class Remote(Logger):  # a W&B / MLflow stand-in
        name, version = "remote", "0"

        def log_metrics(self, metrics, step=None):
            pass

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    remote = Remote()
    tb, csv_logger, same = ensemble_loggers([TensorBoardLogger("elsewhere"), CSVLogger("elsewhere"), remote], tmp_path)
    assert Path(tb.log_dir) == tmp_path / "ensemble" and Path(csv_logger.log_dir) == tmp_path / "ensemble" / "csv"
    assert same is remote
    assert ensemble_loggers([], tmp_path) == []


def test_crash_between_state_and_events_is_repaired_with_each_round_logged_once(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    csv_path = run_dir / "ensemble" / "csv" / "metrics.csv"

    def loggers():  # a fresh set per process, as a new `lightning fit` makes
        return ensemble_loggers([TensorBoardLogger("x"), CSVLogger("x")], run_dir)

    _run(run_dir, rounds=1, loggers=loggers(), member_logger=False)
    real = EnsembleLogger.publish

    def die_in_round_2(self, run_dir_, state, *args, **kwargs):  # dies after state.pt, before the events
        if state["rounds_done"] == 2:
            raise SystemExit("killed")
        return real(self, run_dir_, state, *args, **kwargs)

    monkeypatch.setattr(EnsembleLogger, "publish", die_in_round_2)
    with pytest.raises(SystemExit):
        _run(run_dir, rounds=2, loggers=loggers(), member_logger=False)
    monkeypatch.setattr(EnsembleLogger, "publish", real)
    assert torch.load(run_dir / "state.pt", weights_only=True)["rounds_done"] == 2
    assert [e.step for e in _accumulator(run_dir / "ensemble").Scalars("ensemble/boosted_acc")] == [1]
    for _ in range(2):  # the repairing start, then a start with nothing left to repair
        summary = _run(run_dir, rounds=2, loggers=loggers(), member_logger=False)
        acc = _accumulator(run_dir / "ensemble")
        assert [e.step for e in acc.Scalars("ensemble/boosted_acc")] == [1, 2]
        assert [e.value for e in acc.Scalars("ensemble/boosted_acc")] == pytest.approx(
            [h["boosted_acc"] for h in summary["history"]])
        for name in FIGURE_NAMES:
            assert [e.step for e in acc.Images(f"figures/{name}")] == [1, 2], name
        assert [int(r["step"]) for r in _csv_rows(csv_path)] == [1, 2]


def test_rounds_run_without_a_logger_are_logged_when_one_is_back(tmp_path):
    _run(tmp_path, rounds=2, loggers=[], member_logger=False)
    assert not (tmp_path / "ensemble" / "logged_round.json").exists()
    _run(tmp_path, rounds=2, member_logger=False)  # default logger: TensorBoard in run_dir/ensemble
    acc = _accumulator(tmp_path / "ensemble")
    assert [e.step for e in acc.Scalars("ensemble/deep_nll")] == [1, 2]
    assert [e.step for e in acc.Images("figures/margin_cdf")] == [1, 2]


@pytest.mark.slow
def test_lightning_fit_logs_whole_config_lr_and_figures(tmp_path):
    """End to end through the CLI: config hparams (ensemble and members), no `_instantiator`/`hp_metric`."""
    config = tmp_path / "loggers.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"logger": [
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(tmp_path)}},
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}}]}}))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "lightning_app", "fit", "--config", "digits_boost.yaml", "--config", str(config),
           "--boosting.rounds=2", f"--boosting.run_dir={run_dir}", "--trainer.max_epochs=1",
           "--trainer.limit_train_batches=3", "--model.init_args.backbone=mlp",
           "--model.init_args.backbone_kwargs={width: 8}", "--trainer.enable_progress_bar=false"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    acc = _accumulator(run_dir / "ensemble")
    params, metrics = _hparams(acc)
    assert params["boosting.gap_rule.init_args.g_max"] == 4.0 and params["boosting.rounds"] == 2
    assert params["model.init_args.optimizer.class_path"] == "torch.optim.SGD"
    assert params["data.class_path"] == "datamodules.DigitsDataModule"
    assert "ensemble/boosted_acc" in metrics
    for name in FIGURE_NAMES:
        assert [e.step for e in acc.Images(f"figures/{name}")] == [1, 2]
    rows = _csv_rows(run_dir / "ensemble" / "csv" / "metrics.csv")
    assert [float(r["ensemble/boosted_nll"]) for r in rows] == pytest.approx(
        [h["boosted_nll"] for h in summary["history"]], rel=1e-12)
    for t in (1, 2):
        (version,) = (run_dir / f"round_{t}").glob("version_*")
        member = _accumulator(version)
        member_params, member_metrics = _hparams(member)
        assert member_params["boosting.round"] == t and "model.init_args.optimizer.init_args.lr" in member_params
        assert not any("_instantiator" in k for k in member_params) and member_metrics == ["val/acc", "val/loss"]
        assert "hp_metric" not in member.Tags()["scalars"]
        assert len(member.Scalars("lr-SGD")) >= 1
