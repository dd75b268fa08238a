"""boosting.concurrent_members: deep-ensemble members trained by worker processes, as a sequential run trains them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import Toy2DDataModule
from lightning_app import (
    BoostingOrchestrator,
    MeanGapRule,
    NoGapRule,
    build_cli,
    member_seed,
    resolve_config,
)
from marginboost.errors import ConfigError
from models import MarginClassifier

REPO = Path(__file__).resolve().parents[2]


def _model(t, seed):
    return MarginClassifier(num_classes=2, input_shape=(2,), backbone="mlp", backbone_kwargs={"width": 8})


def _trainer(t, round_dir):
    return L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=str(round_dir))


def _orchestrator(run_dir, concurrent=1):
    return BoostingOrchestrator(3, NoGapRule(), run_dir, seed=5, concurrent_members=concurrent)


def _dm():
    return Toy2DDataModule(num_train=64, num_val=16)


def test_bad_values_name_the_field_before_any_training(tmp_path):
    with pytest.raises(ConfigError, match=r"^boosting.concurrent_members: 0; allowed: an integer >= 1"):
        BoostingOrchestrator(3, NoGapRule(), tmp_path, concurrent_members=0)
    # a boosting rule feeds each member the earlier members' margins: nothing to train at once
    with pytest.raises(ConfigError, match=r"^boosting.concurrent_members: 2; allowed: 1 with MeanGapRule"):
        BoostingOrchestrator(3, MeanGapRule(), tmp_path, concurrent_members=2)
    with pytest.raises(ConfigError, match="without a member_launcher"):
        _orchestrator(tmp_path / "run", 2).run(_model, _trainer, _dm())
    assert not (tmp_path / "run" / "state.pt").exists()
    # a DDP member trainer: one line, before any data is read
    with pytest.raises(ConfigError, match=r"^boosting.concurrent_members: 2; allowed: 1 when each member's trainer "
                                          r"spans 2 processes"):
        build_cli(["fit", "--config", resolve_config("toy_boost.yaml"), "--boosting.gap_rule=lightning_app.NoGapRule",
                   "--boosting.concurrent_members=2", "--trainer.accelerator=cpu", "--trainer.devices=2",
                   "--trainer.strategy=ddp", f"--boosting.run_dir={tmp_path / 'ddp'}", "--trainer.logger=false"])


def test_a_failed_worker_is_reported_and_its_member_trained_here(tmp_path):
    sequential = _orchestrator(tmp_path / "seq").run(_model, _trainer, _dm())
    launched = []

    def failing_launcher(t, threads, log):
        launched.append((t, threads))
        return subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])

    with pytest.warns(UserWarning, match=r"worker process for round 2 exited with status 3 .*training the member here"):
        concurrent = _orchestrator(tmp_path / "conc", 2).run(_model, _trainer, _dm(), member_launcher=failing_launcher)
    # round 1 here beside round 2's worker; that fails, so round 2 here beside round 3's worker
    assert [t for t, _ in launched] == [2, 3]
    assert launched[0][1] == max(1, torch.get_num_threads() // 2)
    keys = ("member_acc_1", "member_nll_2", "member_acc_3", "deep_acc", "boosted_nll")
    # the same members up to the float order of this process's thread share (1 of 2 threads here)
    assert [concurrent["history"][-1][k] for k in keys] == pytest.approx(
        [sequential["history"][-1][k] for k in keys], rel=1e-5)
    assert not any(r.get("trained_in_worker") for r in concurrent["history"])


def test_a_stale_prefit_of_another_run_is_not_used(tmp_path):
    """A member a worker left under another configuration (fingerprint) is trained again."""
    run_dir = tmp_path / "run"
    (run_dir / "round_2").mkdir(parents=True)
    (run_dir / "round_2" / "member.ckpt").write_bytes(b"not a checkpoint")  # loading it would fail
    (run_dir / "round_2" / "prefit.json").write_text(json.dumps(
        {"round": 2, "seed": member_seed(5, 2), "fingerprint": "another run", "fit_seconds": 1.0, "sharpness": {}}))

    def idle_launcher(t, threads, log):  # the worker leaves the stale files as they are
        return subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])

    with pytest.warns(UserWarning, match="round 2 exited with status 1"):
        summary = BoostingOrchestrator(2, NoGapRule(), run_dir, seed=5, concurrent_members=2).run(
            _model, _trainer, _dm(), member_launcher=idle_launcher)
    assert summary["rounds_done"] == 2 and not any(r.get("trained_in_worker") for r in summary["history"])


def _fit(run_dir: Path, *extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "lightning_app", "fit", "--config", "digits_boost.yaml",
           "--boosting.gap_rule=lightning_app.NoGapRule", "--boosting.rounds=3", "--trainer.max_epochs=1",
           f"--boosting.run_dir={run_dir}", "--trainer.logger=false", *extra]
    proc = subprocess.run(cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return torch.load(run_dir / "state.pt", weights_only=True)


def _weights(run_dir: Path, t: int) -> dict:
    return torch.load(run_dir / f"round_{t}" / "member.ckpt", map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_workers_train_the_members_a_sequential_run_trains(tmp_path):
    sequential = _fit(tmp_path / "seq")
    concurrent = _fit(tmp_path / "conc", "--boosting.concurrent_members=3")
    run = tmp_path / "conc"
    # rounds 2 and 3 by workers (their logs and prefit records), round 1 here
    assert [r.get("trained_in_worker", False) for r in concurrent["history"]] == [False, True, True]
    # only round 1 trained here: the others' overhead would compare a wait with a worker's fit
    assert [r["overhead"] is None for r in concurrent["history"]] == [False, True, True]
    for t in (2, 3):
        assert json.loads((run / f"round_{t}" / "prefit.json").read_text())["seed"] == concurrent["history"][t - 1]["seed"]
        assert "max_epochs=1" in (run / f"round_{t}" / "worker.log").read_text()
    # the same members, bit for bit (one thread each), hence the same ensemble
    for t in (1, 2, 3):
        a, b = _weights(tmp_path / "seq", t), _weights(run, t)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), t
    for x, y in zip(sequential["val_logits"], concurrent["val_logits"], strict=True):
        assert torch.equal(x, y)
    keys = [k for k in sequential["history"][0] if k.startswith(("boosted_", "deep_", "member_", "disagreement"))]
    assert [[h[k] for k in keys] for h in concurrent["history"]] == [[h[k] for k in keys] for h in sequential["history"]]
    # the fingerprint leaves concurrent_members out: the run resumes sequentially, complete
    again = _fit(run, "--boosting.concurrent_members=1")
    assert again["rounds_done"] == 3
