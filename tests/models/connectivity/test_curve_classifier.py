"""CurveClassifier: endpoints are the checkpoints, the training criterion by hand, the CLI run."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from marginboost.errors import ConfigError
from models import CurveClassifier, MarginClassifier


def _checkpoint(tmp_path: Path, name: str, seed: int) -> tuple[str, MarginClassifier]:
    torch.manual_seed(seed)
    model = MarginClassifier(num_classes=4, input_shape=(1, 4, 4), backbone="mlp",
                             backbone_kwargs={"width": 6, "depth": 2}, head_seed=seed)
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 1, 4, 4))  # BN statistics of its own
    path = tmp_path / f"{name}.ckpt"
    # the two entries CurveClassifier reads from a Lightning checkpoint
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return str(path), model


def test_curve_endpoints_are_the_checkpoints_and_only_bends_train(tmp_path):
    pa, a = _checkpoint(tmp_path, "a", 0)
    pb, b = _checkpoint(tmp_path, "b", 1)
    curve = CurveClassifier(pa, pb, curve="bezier", num_bends=2, num_classes=4, input_shape=[1, 4, 4])
    x = torch.randn(16, 1, 4, 4)
    curve.eval(), a.eval()  # eval mode at t = 0 uses A's own running statistics
    torch.testing.assert_close(curve.forward_at(x, 0.0), a(x), rtol=0, atol=1e-6)
    curve.train(), a.train(), b.train()  # batch statistics: the function of the parameters alone
    torch.testing.assert_close(curve.forward_at(x, 0.0), a(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(curve.forward_at(x, 1.0), b(x), rtol=0, atol=1e-6)
    trainable = {n for n, p in curve.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("curve.bends.") for n in trainable)
    # the frozen head W is not given bends: 2 bends × (parameters that were trainable in A)
    assert len(trainable) == 2 * sum(p.requires_grad for p in a.parameters())


def test_training_criterion_is_ce_plus_weight_decay_on_the_point(tmp_path, monkeypatch):
    pa, _ = _checkpoint(tmp_path, "a", 0)
    pb, _ = _checkpoint(tmp_path, "b", 1)
    curve = CurveClassifier(pa, pb, curve="chain", num_bends=1, curve_weight_decay=0.01)
    with torch.no_grad():
        for p in curve.curve.bends:
            p.add_(0.1 * torch.randn_like(p))
    monkeypatch.setattr(curve, "sample_t", lambda: 0.3)
    monkeypatch.setattr(curve, "log_train_metrics", lambda *args: None)
    batch = {"x": torch.randn(8, 1, 4, 4), "y": torch.randint(0, 4, (8,))}
    curve.train()
    loss = curve.training_step(batch, 0)
    point = curve.curve.point(0.3)
    moving = [n for n, p in curve.named_parameters() if n in point and n != "head.linear.weight"]
    expected = F.cross_entropy(functional_call(curve, point, (batch["x"],)), batch["y"]) \
        + 0.5 * 0.01 * sum(point[n].pow(2).sum() for n in moving)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None for p in curve.curve.bends)
    assert all(p.grad is None for n, p in curve.named_parameters() if not n.startswith("curve."))


def test_bad_configuration_is_refused(tmp_path):
    pa, _ = _checkpoint(tmp_path, "a", 0)
    with pytest.raises(ConfigError, match="model.checkpoint_b: 'nope.ckpt'"):
        CurveClassifier(pa, "nope.ckpt")
    with pytest.raises(ConfigError, match="model.curve: 'spline'"):
        CurveClassifier(pa, pa, curve="spline")
    with pytest.raises(ConfigError, match="model.num_classes: 10"):
        CurveClassifier(pa, pa, num_classes=10)
    with pytest.raises(ConfigError, match="model.align: 'activations'"):
        CurveClassifier(pa, pa, align="activations")
    assert CurveClassifier(pa, pa).reset_bn is True and CurveClassifier(pa, pa, reset_bn=False).reset_bn is False
    with pytest.raises(ConfigError, match="model.curve: 'linear'"):
        CurveClassifier(pa, pa, curve="linear").configure_optimizers()


@pytest.mark.slow
def test_lightning_fit_trains_a_bezier_curve_better_than_the_line(tmp_path, monkeypatch):
    from lightning_app.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small MLPs: one thread is faster on a shared 2-core machine
    monkeypatch.chdir(tmp_path)
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    try:
        main(["fit", "--config", "connectivity_endpoints.yaml", "--trainer.max_epochs=4",
              "--model.init_args.lr_scheduler.init_args.T_max=4", "--model.init_args.backbone_kwargs.width=16",
              "--boosting.run_dir=ends", *quiet])
        main(["fit", "--config", "connectivity_bezier.yaml", "--trainer.max_epochs=3",
              "--model.init_args.checkpoint_a=ends/round_1/member.ckpt",
              "--model.init_args.checkpoint_b=ends/round_2/member.ckpt", "--model.init_args.grid_points=5",
              "--trainer.logger.init_args.save_dir=logs", *quiet])
    finally:
        torch.set_num_threads(threads)
    out = json.loads(next(Path("logs").rglob("path_eval.json")).read_text())
    assert out["t"] == [0.0, 0.25, 0.5, 0.75, 1.0] and out["reset_bn"] is True
    curve, line = out["curve"], out["linear"]
    for i in (0, -1):  # same endpoints, same BN reset: identical records at t = 0 and 1
        assert curve["records"][i] == line["records"][i]
    assert curve["metrics"]["val"]["max_loss"] < line["metrics"]["val"]["max_loss"]
    assert curve["metrics"]["train"]["integral"] < line["metrics"]["train"]["integral"]
    assert next(Path("logs").rglob("path_eval.csv")).read_text().count("\n") == 1 + 2 * 5
    events = list(Path("logs").rglob("events.out.tfevents.*"))
    assert events


@pytest.mark.slow
def test_curve_trains_under_two_process_ddp(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[3]
    script = Path(__file__).with_name("ddp_curve.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["t"] == r1["t"] and len(r0["t"]) == 8  # one seeded t per batch, the same on both ranks
    assert r0["moved"] > 1e-3  # the bends trained
    b0, b1 = torch.load(tmp_path / "bends0.pt"), torch.load(tmp_path / "bends1.pt")
    for p, q in zip(b0, b1):  # gradients all-reduced: identical bends on both ranks
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # validation accuracy at t = 0.5, synchronised over the two val shards, is the full-set value
    # (up to one sample the DistributedSampler may repeat to even out the shards)
    for r in (r0, r1):
        assert abs(r["logged_val_acc"] - r0["full_val_acc"]) <= 1.0 / r0["num_val"] + 1e-6
    assert (tmp_path / "path_eval.json").exists() or list(tmp_path.rglob("path_eval.json"))


def test_an_epoch_cut_short_still_logs_the_training_metrics(tmp_path):
    """The curve's own on_train_epoch_end logs the epoch's training metrics too, also when
    ``max_steps`` ends the epoch before its last batch."""
    import lightning as L
    from torch.utils.data import DataLoader

    pa, _ = _checkpoint(tmp_path, "a", 0)
    pb, _ = _checkpoint(tmp_path, "b", 1)
    curve = CurveClassifier(pa, pb, curve="bezier", num_bends=1, num_classes=4, input_shape=[1, 4, 4],
                            grid_points=0)
    data = [{"x": torch.randn(8, 1, 4, 4), "y": torch.randint(0, 4, (8,)), "gap": torch.zeros(8)} for _ in range(4)]
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(curve, train_dataloaders=DataLoader(data, batch_size=None))
    assert {"train/loss", "train/acc", "train/margin_mean", "train/bend_distance"} <= set(trainer.callback_metrics)
