"""The lightning command: packaged configs, links, field errors, TensorBoard events."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_app import build_cli, packaged_configs, resolve_config
from lightning_app.cli import resolve_config_args

REPO = Path(__file__).resolve().parents[2]


def test_packaged_config_lookup(tmp_path, monkeypatch):
    assert "digits.yaml" in packaged_configs() and "cifar_single.yaml" in packaged_configs()
    assert resolve_config("digits.yaml").endswith("lightning_app/configs/digits.yaml")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits.yaml").write_text("seed_everything: 1\n")
    assert resolve_config("digits.yaml") == "digits.yaml"  # a local file wins
    with pytest.raises(SystemExit, match="nope.yaml.*packaged"):
        resolve_config("nope.yaml")
    assert resolve_config_args(["fit", "--config=cifar_single.yaml", "-c", "digits.yaml"])[1].endswith(
        "configs/cifar_single.yaml")


def test_config_builds_linked_model_and_data():
    cli = build_cli(["--config", resolve_config("digits.yaml"), "--trainer.logger=false"], run=False)
    assert cli.model.hparams.num_classes == 10 and tuple(cli.model.hparams.input_shape) == (1, 8, 8)
    assert type(cli.datamodule).__name__ == "DigitsDataModule"


def test_unknown_config_field_is_named(capsys):
    with pytest.raises(SystemExit):
        build_cli(["--config", resolve_config("digits.yaml"), "--model.init_args.hed_init=orthogonal"], run=False)
    assert "hed_init" in capsys.readouterr().err


def test_bad_values_fail_before_training():
    with pytest.raises(ValueError, match="model.backbone.*resnet18"):
        build_cli(["--config", resolve_config("digits.yaml"), "--model.init_args.backbone=resnet19",
                   "--trainer.logger=false"], run=False)
    with pytest.raises((ValueError, FileNotFoundError), match="data.data_dir"):
        build_cli(["--config", resolve_config("cifar_single.yaml"), "--data.init_args.data_dir=/nonexistent",
                   "--data.init_args.download=false", "--trainer.logger=false"], run=False)


@pytest.mark.slow
def test_lightning_fit_offline_config_writes_tensorboard_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "lightning_app", "fit", "--config", "digits.yaml", "--trainer.max_epochs=4",
           f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events, list(tmp_path.rglob("*"))
    acc = EventAccumulator(str(events[0].parent)).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/acc", "train/margin_mean", "train/seed_mean_margin_value", "val/loss", "val/acc"} <= tags
    val_acc = acc.Scalars("val/acc")
    assert len(val_acc) == 4 and val_acc[-1].value > 0.8
    assert (events[0].parent / "config.yaml").exists()


def _endpoint_checkpoints(tmp_path: Path) -> list[str]:
    """Two small checkpoints for configs that connect trained networks (connectivity_bezier.yaml)."""
    import torch

    from models import MarginClassifier

    args = []
    for key in ("a", "b"):
        m = MarginClassifier(num_classes=10, input_shape=(1, 8, 8), backbone="mlp", backbone_kwargs={"width": 8})
        torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}, tmp_path / f"{key}.ckpt")
        args.append(f"--model.init_args.checkpoint_{key}={tmp_path / f'{key}.ckpt'}")
    return args


# configs whose model reads files another config writes: instantiated with stand-ins for them
NEEDS_CHECKPOINTS = {"connectivity_bezier.yaml"}


@pytest.mark.parametrize("name", packaged_configs())
def test_every_packaged_config_parses_and_instantiates(name, tmp_path):
    extra = _endpoint_checkpoints(tmp_path) if name in NEEDS_CHECKPOINTS else []
    cli = build_cli(["--config", resolve_config(name), "--trainer.logger=false", *extra], run=False)
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes


def test_device_resident_reaches_the_datamodule_from_yaml():
    cli = build_cli(["--config", resolve_config("digits.yaml"), "--trainer.logger=false",
                     "--data.init_args.device_resident=true"], run=False)
    assert cli.datamodule.device_resident is True
    assert type(cli.datamodule.train_dataloader()).__name__ == "DeviceResidentLoader"
