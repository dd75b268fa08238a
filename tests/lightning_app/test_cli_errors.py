"""Every mistake a user can make from the config or command line: one line, exit code 2, nothing trained."""

import pytest

from lightning_app import build_cli, main, resolve_config
from lightning_app.cli import result_fingerprint

FIT = ["fit", "--config", "digits_boost.yaml", "--trainer.enable_progress_bar=false", "--trainer.logger=false"]


def _fails(capsys, args):
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return exc.value.code, err[-1] if err else ""


CASES = {  # extra args -> the line's start (ConfigError: the full "field: given; allowed:" form)
    "rounds": (["--boosting.rounds=0"], "error: boosting.rounds: 0; allowed: an integer >= 1"),
    "g_min>g_max": (["--boosting.gap_rule.init_args.g_min=5"], "error: boosting.gap_rule.g_min: 5.0; allowed:"),
    "nan g_max": (["--boosting.gap_rule.init_args.g_max=.nan"], "error: boosting.gap_rule.g_max: nan; allowed:"),
    "inf tau": (["--boosting.gap_rule=lightning_app.TargetGapRule", "--boosting.gap_rule.init_args.tau=.inf"],
                "error: boosting.gap_rule.tau: inf; allowed:"),
    "max_epochs=0": (["--trainer.max_epochs=0"], "error: trainer.max_epochs: 0; allowed: an integer >= 1"),
    "backbone": (["--model.init_args.backbone=resnet19"], "error: model.backbone: 'resnet19'; allowed:"),
    "head_init": (["--model.init_args.head_init=nope"], "error: model.head_init: 'nope'; allowed:"),
    "batch_size": (["--data.init_args.batch_size=0"], "error: data.batch_size: 0; allowed: an integer >= 1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_value_is_one_line_and_exit_2(case, tmp_path, capsys):
    extra, expected = CASES[case]
    code, line = _fails(capsys, [*FIT, f"--boosting.run_dir={tmp_path / 'run'}", *extra])
    assert code == 2 and line.startswith(expected), line
    assert not (tmp_path / "run" / "state.pt").exists() and not (tmp_path / "run" / "round_1").exists()


def test_run_dir_and_ckpt_path_errors(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, line = _fails(capsys, [*FIT, f"--boosting.run_dir={tmp_path / 'file'}"])
    assert code == 2 and line.startswith("error: boosting.run_dir: ") and "allowed: a directory" in line
    code, line = _fails(capsys, [*FIT, "--boosting.run_dir=/proc/marginboost_run"])
    assert code == 2 and "allowed: a writable directory" in line
    code, line = _fails(capsys, [*FIT, f"--ckpt_path={tmp_path / 'typo'}"])
    assert code == 2 and line.startswith(f"error: ckpt_path: '{tmp_path / 'typo'}'; allowed: a boosting run")
    assert not (tmp_path / "typo").exists()


def test_missing_data_dir_without_download(tmp_path, capsys):
    code, line = _fails(capsys, ["fit", "--config", "cifar_boost.yaml", "--trainer.logger=false",
                                 f"--data.init_args.data_dir={tmp_path / 'none'}", "--data.init_args.download=false",
                                 f"--boosting.run_dir={tmp_path / 'run'}"])
    assert code == 2 and line.startswith(f"error: data.data_dir: '{tmp_path / 'none'}'; allowed:"), line


def test_evaluating_without_a_trained_model_is_refused(tmp_path, capsys):
    code, line = _fails(capsys, ["test", "--config", "digits_boost.yaml", f"--boosting.run_dir={tmp_path}"])
    assert code == 2 and line.startswith(f"error: boosting.run_dir: '{tmp_path}'; allowed: a directory holding")
    code, line = _fails(capsys, ["test", "--config", "digits.yaml", "--trainer.logger=false"])
    assert code == 2 and line.startswith("error: ckpt_path: None; allowed: the checkpoint of a trained model")


def test_one_optimizer_path(capsys):
    code, _ = _fails(capsys, ["fit", "--config", "digits.yaml", "--optimizer=Adam"])
    assert code == 2  # the top-level flags do not exist: only model.init_args.optimizer
    code, _ = _fails(capsys, ["fit", "--config", "digits.yaml", "--lr_scheduler=StepLR"])
    assert code == 2


def test_scheduler_horizon_follows_max_epochs():
    import lightning as L

    cli = build_cli(["--config", resolve_config("digits.yaml"), "--trainer.max_epochs=3", "--trainer.logger=false"],
                    run=False)
    trainer = L.Trainer(max_epochs=cli.trainer.max_epochs, limit_train_batches=2, limit_val_batches=0,
                        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(cli.model, datamodule=cli.datamodule)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.T_max == 3 and scheduler.last_epoch == 3
    # the schedule ran whole: cosine at e = T_max is eta_min (0 here)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_scheduler_fraction_and_explicit_t_max():
    import torch

    from marginboost.errors import ConfigError
    from models import CosineAnnealingRunLR

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    half = CosineAnnealingRunLR(opt, fraction=0.5)
    half.set_horizon(10)
    assert half.T_max == 5
    fixed = CosineAnnealingRunLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), T_max=7)
    fixed.set_horizon(10)
    assert fixed.T_max == 7
    with pytest.raises(ConfigError, match="model.lr_scheduler.fraction: 0; allowed"):
        CosineAnnealingRunLR(opt, fraction=0)


def test_resume_fingerprint_covers_result_fields_only():
    cli = build_cli(["--config", resolve_config("digits_boost.yaml"), "--trainer.logger=false"], run=False)
    fp = result_fingerprint(cli.config)
    assert fp["model.init_args.backbone"] == '"small_cnn"' and fp["trainer.max_epochs"] == "8"
    assert fp["data.init_args.batch_size"] == "64" and "trainer.precision" in fp
    for free in ("trainer.devices", "trainer.logger", "trainer.enable_progress_bar", "data.init_args.num_workers",
                 "boosting.run_dir", "boosting.resume", "boosting.rounds", "seed_everything"):
        assert free not in fp
