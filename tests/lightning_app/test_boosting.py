"""BoostingOrchestrator: gaps fed back by index, resume, kill-and-resume, DDP, the CLI path."""
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks import GradientNormWidth
from datamodules import Toy2DDataModule
from lightning_app import (
    BoostingOrchestrator,
    ClippedGapRule,
    MeanGapRule,
    build_cli,
    member_seed,
    resolve_config,
)
from marginboost.errors import ConfigError
from models import MarginClassifier

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


class _RecordBatches(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((batch["idx"].clone(), batch["gap"].clone()))


def _orchestrate(run_dir, dm, rounds=2, resume=True, recorders=None):
    def make_model(r, seed):
        return MarginClassifier(num_classes=2, input_shape=(2,), backbone="mlp", backbone_kwargs={"width": 8})

    def make_trainer(r, round_dir):
        cbs = [recorders[r - 1], GradientNormWidth(every_n_epochs=None)] if recorders else []
        return L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=str(round_dir), callbacks=cbs)

    orch = BoostingOrchestrator(rounds, ClippedGapRule(-1.0, 2.0), run_dir, seed=3, resume=resume)
    return orch.run(make_model, make_trainer, dm)


def _margins_by_hand(model, dm):
    model.eval()
    train = dm._ensure_loaded()[0]
    assert dm.mean is None  # Toy2D features are used as stored
    out = []
    for i in range(dm.num_train):
        logits = model(train.x[i:i + 1])[0].tolist()
        y = int(train.y[i])
        out.append(logits[y] - max(v for j, v in enumerate(logits) if j != y))
    return torch.tensor(out)


def _boost(tmp_path, name, *args, check=True):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{HERE}"}
    cmd = [sys.executable, str(HERE / "boost_run.py"), "--run-dir", str(tmp_path / name), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, torch.load(tmp_path / name / "state.pt", weights_only=True)


def test_orchestrator_feeds_rule_output_into_next_round(tmp_path):
    dm = Toy2DDataModule(num_train=48, num_val=20, batch_size=16)
    recorders = [_RecordBatches(), _RecordBatches()]
    summary = _orchestrate(tmp_path, dm, recorders=recorders)
    assert summary["rounds_done"] == 2 and len(summary["history"]) == 2
    # round 1 trains with zero gaps
    assert all(torch.equal(g, torch.zeros_like(g)) for _, g in recorders[0].seen)
    # margins of member 1, by hand from its checkpoint, give the round-2 gaps through the rule
    member1 = MarginClassifier.load_from_checkpoint(tmp_path / "round_1" / "member.ckpt")
    m1 = _margins_by_hand(member1, dm)
    saved = torch.load(tmp_path / "round_1" / "margins.pt")
    torch.testing.assert_close(saved["member_margins"], m1, atol=1e-5, rtol=0)
    expected = ClippedGapRule(-1.0, 2.0)(saved["member_margins"], 1)
    assert torch.equal(saved["gaps"], expected)
    idx = torch.cat([i for i, _ in recorders[1].seen])
    gaps = torch.cat([g for _, g in recorders[1].seen])
    assert sorted(idx.tolist()) == sorted(list(range(48)) * 2)  # two epochs, every object each epoch
    assert torch.equal(gaps, expected[idx])
    # the state after round 2: M is the sum of both members' margins
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    member2 = MarginClassifier.load_from_checkpoint(tmp_path / "round_2" / "member.ckpt")
    torch.testing.assert_close(state["M"], m1 + _margins_by_hand(member2, dm), atol=1e-5, rtol=0)
    assert torch.equal(dm.gaps, state["gaps"])
    assert [m["seed"] for m in state["members"]] == [member_seed(3, 1), member_seed(3, 2)]
    # summary.json and the TensorBoard events of the ensemble
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["history"][1]["boosted_acc"] == summary["history"][1]["boosted_acc"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "ensemble"), size_guidance={"histograms": 0, "images": 0}).Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"ensemble/boosted_acc", "ensemble/deep_acc", "ensemble/boosted_nll", "ensemble/deep_ece",
            "ensemble/disagreement", "member/acc"} <= scalars
    assert [e.step for e in acc.Scalars("ensemble/boosted_acc")] == [1, 2]
    assert {"margins/member", "margins/ensemble", "gaps/values"} <= set(acc.Tags()["histograms"])
    assert {"figures/margin_cdf", "figures/gap_cdf", "figures/reliability", "figures/accuracy_nll"} <= set(
        acc.Tags()["images"])
    # each member's fit-end sharpness lands in its round record and in the ensemble's events
    width = summary["history"][1]["sharpness"]
    assert width and all(k.startswith("width/") for k in width)
    key = next(iter(width))
    assert [e.value for e in acc.Scalars(f"member/{key}")] == pytest.approx(
        [h["sharpness"][key] for h in summary["history"]])


def test_resume_refuses_other_data_and_existing_run(tmp_path):
    _orchestrate(tmp_path, Toy2DDataModule(num_train=32, num_val=8), rounds=1)
    with pytest.raises(ConfigError, match="data.training_set"):
        _orchestrate(tmp_path, Toy2DDataModule(num_train=32, num_val=8, seed=1), rounds=2)
    with pytest.raises(ConfigError, match="data.training_set.*num_train.*32.*40"):
        _orchestrate(tmp_path, Toy2DDataModule(num_train=40, num_val=8), rounds=2)
    with pytest.raises(ConfigError, match="boosting.resume"):
        _orchestrate(tmp_path, Toy2DDataModule(num_train=32, num_val=8), rounds=2, resume=False)


def test_bad_boosting_config():
    with pytest.raises(ConfigError, match="boosting.rounds: 0; allowed"):
        BoostingOrchestrator(rounds=0)
    with pytest.raises(ConfigError, match="boosting.gap_rule"):
        BoostingOrchestrator(gap_rule=lambda m, t: m)


def test_cli_boosting_section_is_optional():
    cfg = resolve_config("digits_boost.yaml")
    cli = build_cli(["--config", cfg, "--trainer.logger=false"], run=False)
    boosting = cli.config_init["boosting"]
    assert boosting.rounds == 3 and isinstance(boosting.gap_rule, ClippedGapRule)
    assert boosting.gap_rule.g_max == 4.0
    cli = build_cli(["--config", resolve_config("digits.yaml"), "--trainer.logger=false"], run=False)
    assert cli.config_init["boosting"] is None


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path):
    """Killed at the start of round 2's second epoch, the run continues from that round's last.ckpt."""
    _, full = _boost(tmp_path, "full", "--rounds", "3")
    proc, partial = _boost(tmp_path, "killed", "--rounds", "3", "--kill-round", "2", check=False)
    assert proc.returncode == 3 and partial["rounds_done"] == 1  # died in round 2, round 1 kept
    assert (tmp_path / "killed" / "round_2" / "checkpoints" / "last.ckpt").is_file()
    _, resumed = _boost(tmp_path, "killed", "--rounds", "3")
    assert resumed["rounds_done"] == 3
    # round 2 went on with epoch 1 (epoch 0 was not trained again)
    epochs = (tmp_path / "killed" / "epochs.txt").read_text().split("\n")
    assert epochs[:-1] == ["1 0", "1 1", "1 2", "2 0", "2 1", "2 1", "2 2", "3 0", "3 1", "3 2"]
    assert not (tmp_path / "killed" / "round_2" / "checkpoints" / "last.ckpt").exists()  # dropped once committed
    assert torch.equal(resumed["M"], full["M"]) and torch.equal(resumed["gaps"], full["gaps"])
    assert all(torch.equal(a, b) for a, b in zip(resumed["val_logits"], full["val_logits"], strict=True))
    keys = [k for k in full["history"][0] if k.startswith(("boosted_", "deep_", "member_", "disagreement"))]
    assert [[h[k] for k in keys] for h in resumed["history"]] == [[h[k] for k in keys] for h in full["history"]]


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    _, one = _boost(tmp_path, "one", "--devices", "1", "--batch-size", "16")
    _, two = _boost(tmp_path, "two", "--devices", "2", "--batch-size", "8")
    assert two["rounds_done"] == 2
    torch.testing.assert_close(two["M"], one["M"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(two["gaps"], one["gaps"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(two["val_logits"][1], one["val_logits"][1], atol=1e-4, rtol=1e-4)
    _assert_rescoring_identity(tmp_path, two)


def _assert_rescoring_identity(tmp_path, two):
    """What DDP keeps exactly: M and gaps saved by 2 processes = the same members rescored in one.

    Bit for bit when the one process scores the same per-rank batches (CPU kernels round by batch
    shape); with the plain one-process loader, equal to float32 rounding.
    """
    from torch.utils.data import DataLoader, DistributedSampler

    from callbacks import collect_margins
    from models import margins

    sys.path.insert(0, str(HERE))
    try:
        from boost_run import NoBatchStatsClassifier, SequentialToy
    finally:
        sys.path.pop(0)
    dm = SequentialToy(num_train=64, num_val=37, batch_size=8, eval_batch_size=10, seed=0)
    dataset = dm.train_eval_dataloader(distributed=False).dataset
    M_shards, M_plain = torch.zeros(64), torch.zeros(64)
    for member in two["members"]:
        model = NoBatchStatsClassifier.load_from_checkpoint(tmp_path / "two" / member["checkpoint"]).eval()
        logits = torch.full((64, 2), float("nan"))
        with torch.no_grad():
            for rank in range(2):  # rank r's shard and batches, scored in this one process
                sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False)
                for batch in DataLoader(dataset, batch_size=10, sampler=sampler):
                    logits[batch["idx"]] = model(batch["x"])
        M_shards = M_shards + margins(logits, dm.train_targets)
        M_plain = M_plain + collect_margins(model, dm.train_eval_dataloader(distributed=False), 64)
    assert torch.equal(M_shards, two["M"])
    assert torch.equal(ClippedGapRule(-2.0, 3.0)(M_shards, 2), two["gaps"])
    torch.testing.assert_close(M_plain, two["M"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_cli_boosting_run_and_ckpt_path_resume(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run_dir = tmp_path / "run"
    base = [sys.executable, "-m", "lightning_app", "fit", "--config", "digits_boost.yaml", "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=1"]
    first = subprocess.run(base + ["--boosting.rounds=2", f"--boosting.run_dir={run_dir}"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    two = json.loads((run_dir / "summary.json").read_text())
    assert two["rounds_done"] == 2 and (run_dir / "round_2" / "member.ckpt").exists()
    assert list((run_dir / "round_1").rglob("events.out.tfevents.*"))  # the member's own TensorBoard run
    more = subprocess.run(base + ["--boosting.rounds=3", "--ckpt_path", str(run_dir)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stderr[-3000:]
    three = json.loads((run_dir / "summary.json").read_text())
    assert three["rounds_done"] == 3 and three["history"][:2] == two["history"]
    assert "boosting round 3/3" in more.stdout and "boosting round 1/3" not in more.stdout


def test_resume_refuses_another_gap_rule(tmp_path):
    dm = Toy2DDataModule(num_train=32, num_val=8)
    _orchestrate(tmp_path, dm, rounds=1)
    orch = BoostingOrchestrator(2, MeanGapRule(), tmp_path, seed=3)
    with pytest.raises(ConfigError, match="boosting.gap_rule: .*ClippedGapRule.* -> .*MeanGapRule"):
        orch.run(None, None, dm)


def test_other_local_ranks_wait_for_the_download(monkeypatch):
    from lightning_app.boosting import _wait_for_training_set

    class Late:
        calls = 0

        @property
        def train_targets(self):
            Late.calls += 1
            if Late.calls < 3:
                raise FileNotFoundError("data.data_dir: not there yet")
            return torch.arange(4)

    monkeypatch.setenv("LOCAL_RANK", "1")
    assert torch.equal(_wait_for_training_set(Late(), poll_s=0.01), torch.arange(4)) and Late.calls == 3
    monkeypatch.setenv("LOCAL_RANK", "0")  # the downloading process itself does not wait
    Late.calls = 0
    with pytest.raises(FileNotFoundError):
        _wait_for_training_set(Late(), poll_s=0.01)
