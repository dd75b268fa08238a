from lightning_app import build_cli, resolve_config


def test_member_trainers_take_sync_batchnorm_from_the_config(tmp_path):
    """``trainer.sync_batchnorm`` reaches every member's Trainer (batch statistics over all ranks)."""
    for flag in (True, False):
        cli = build_cli(["--config", resolve_config("digits_boost.yaml"), f"--trainer.sync_batchnorm={flag}",
                         "--trainer.logger=false"], run=False)
        cli._member_model(1, 0)
        trainer = cli._member_trainer(1, tmp_path / "round_1")
        assert (trainer._accelerator_connector._layer_sync is not None) is flag
        assert trainer.default_root_dir == str(tmp_path / "round_1")
