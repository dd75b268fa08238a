"""Resume refuses what it cannot honour; a finished run repairs what a crash left stale."""

import json

import lightning as L
import pytest
import torch

from datamodules import Toy2DDataModule
from lightning_app import BoostingOrchestrator, ClippedGapRule
from lightning_app.boosting import BoostingOrchestrator as _Orch
from marginboost.errors import ConfigError
from models import MarginClassifier


def _model(t, seed):
    return MarginClassifier(num_classes=2, input_shape=(2,), backbone="mlp", backbone_kwargs={"width": 8})


def _trainer_factory(max_epochs=1):
    def make(t, round_dir):
        return L.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=str(round_dir))
    return make


def _run(run_dir, rounds=1, max_epochs=1, **kwargs):
    orch = BoostingOrchestrator(rounds, ClippedGapRule(-1.0, 2.0), run_dir, seed=3, **kwargs)
    return orch.run(_model, _trainer_factory(max_epochs), Toy2DDataModule(num_train=32, num_val=8))


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [e.step for e in EventAccumulator(str(run_dir / "ensemble")).Reload().Scalars(tag)]


def test_changed_config_is_refused_with_every_difference(tmp_path):
    old = {"model.init_args.backbone": '"small_cnn"', "trainer.max_epochs": "8", "data.init_args.batch_size": "64"}
    _run(tmp_path, config_fingerprint=old)
    new = {**old, "model.init_args.backbone": '"mlp"', "trainer.max_epochs": "3"}
    with pytest.raises(ConfigError) as err:
        _run(tmp_path, rounds=2, config_fingerprint=new)
    msg = str(err.value)
    assert 'model.init_args.backbone: "small_cnn" -> "mlp"' in msg and "trainer.max_epochs: 8 -> 3" in msg
    assert "batch_size" not in msg and "another boosting.run_dir" in msg
    assert not (tmp_path / "round_2").exists()  # nothing trained
    assert _run(tmp_path, rounds=2, config_fingerprint=old)["rounds_done"] == 2  # the same config resumes


def test_resume_refuses_missing_member_corrupt_state_and_fewer_rounds(tmp_path):
    _run(tmp_path, rounds=2)
    with pytest.raises(ConfigError, match="boosting.rounds: 1; allowed: an integer >= 2"):
        _run(tmp_path, rounds=1)
    ckpt = tmp_path / "round_1" / "member.ckpt"
    ckpt.rename(tmp_path / "moved.ckpt")
    with pytest.raises(ConfigError, match=r"round_1/member.ckpt: missing; allowed: .*restore the file"):
        _run(tmp_path, rounds=3)
    (tmp_path / "moved.ckpt").rename(ckpt)
    state = (tmp_path / "state.pt").read_bytes()
    (tmp_path / "state.pt").write_bytes(state[:100])
    with pytest.raises(ConfigError, match=r"state.pt: unreadable"):
        _run(tmp_path, rounds=3)
    assert not (tmp_path / "round_3").exists()


def test_ckpt_path_to_a_missing_run_and_untrained_members_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="ckpt_path: '.*typo'; allowed: a boosting run directory"):
        _run(tmp_path / "typo", require_existing=True)
    assert not (tmp_path / "typo").exists()
    with pytest.raises(ConfigError, match="trainer.max_epochs: 0; allowed: an integer >= 1"):
        _run(tmp_path / "zero", max_epochs=0)
    assert not (tmp_path / "zero" / "state.pt").exists() and not (tmp_path / "zero" / "round_1" / "member.ckpt").exists()


def test_finished_run_repairs_summary_and_events_once(tmp_path, monkeypatch, capsys):
    _run(tmp_path, rounds=1)
    real = _Orch._publish
    calls = {"n": 0}

    def die_in_round_2(self, state, targets):  # dies between state.pt and summary.json of round 2
        calls["n"] += 1
        if state["rounds_done"] == 2:
            raise SystemExit("killed")
        return real(self, state, targets)

    monkeypatch.setattr(_Orch, "_publish", die_in_round_2)
    with pytest.raises(SystemExit):
        _run(tmp_path, rounds=2)
    monkeypatch.setattr(_Orch, "_publish", real)
    assert torch.load(tmp_path / "state.pt", weights_only=True)["rounds_done"] == 2
    assert json.loads((tmp_path / "summary.json").read_text())["rounds_done"] == 1  # stale
    assert _scalars(tmp_path, "ensemble/boosted_acc") == [1]
    capsys.readouterr()
    summary = _run(tmp_path, rounds=2)  # nothing to train: repairs and says so
    assert "run complete (2/2 rounds)" in capsys.readouterr().out.replace("\n", " ")
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["rounds_done"] == 2 and [h["round"] for h in summary["history"]] == [1, 2]
    assert _scalars(tmp_path, "ensemble/boosted_acc") == [1, 2]
    _run(tmp_path, rounds=2)  # idempotent: no second copy of round 2's events
    assert _scalars(tmp_path, "ensemble/boosted_acc") == [1, 2]
