"""Hypernetworks G(λ): equal to a direct model loaded with G(λ), the λ distribution, the module."""

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from marginboost.errors import ConfigError
from models import (
    BinnedAccuracy,
    HyperNetClassifier,
    LinearHyperNet,
    LowRankHyperNet,
    lambda_coordinate,
    sample_log_lambda,
)


def _batches(n=40, d=6, k=3, seed=0, batch_size=16):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)
    data = [{"x": x[i], "y": y[i], "idx": torch.tensor(i)} for i in range(n)]
    return DataLoader(data, batch_size=batch_size)


def _model(mode, **kwargs):
    kwargs = {"num_classes": 3, "input_shape": (6,), "backbone_kwargs": {"width": 5, "depth": 1},
              "mode": mode, "data_size": 40, "init_log_var": -2.0, "hidden": 4, **kwargs}
    return HyperNetClassifier(**kwargs)


def test_lowrank_generator_is_the_formula():
    base = {"w": torch.randn(3, 2), "b": torch.randn(3)}
    G = LowRankHyperNet(base, hidden=4, log_lambda_range=(-1.0, 2.0), init_scale=1.0)
    lam = 10 ** 0.7
    u = 2 * (0.7 + 1) / 3 - 1
    mean, log_var = G(lam)
    for name in ("w", "b"):
        gen = G.mean[name]
        h = torch.relu(gen.f.weight[:, 0] * u + gen.f.bias)
        expected = gen.base + (torch.outer(h @ gen.u_rows, h @ gen.u_cols) if name == "w" else h @ gen.u_rows)
        assert torch.allclose(mean[name], expected, atol=1e-6)
    assert torch.equal(G.log_var["w"].base, torch.full((3, 2), -6.0))
    assert not torch.allclose(G(0.1)[0]["w"], G(100.0)[0]["w"])  # λ matters
    lin = LinearHyperNet(base, log_lambda_range=(-1.0, 2.0))
    with torch.no_grad():
        lin.mean["w"].slope.fill_(0.5)
    assert torch.allclose(lin(lam)[0]["w"], base["w"] + 0.5 * u)


def test_lambda_coordinate_maps_the_range_to_minus_one_one():
    assert torch.allclose(lambda_coordinate(torch.tensor([0.1, 100.0, 10 ** 0.5]), -1.0, 2.0),
                          torch.tensor([-1.0, 1.0, 0.0]), atol=1e-6)


@pytest.mark.parametrize("mode", ["lowrank", "linear"])
def test_hypernet_at_a_lambda_equals_a_direct_model_loaded_with_its_output(mode):
    torch.manual_seed(0)
    hyper = _model(mode)
    if mode == "linear":  # the slopes start at zero; make the output depend on λ
        with torch.no_grad():
            for p in hyper.generator.parameters():
                p.add_(0.1 * torch.randn_like(p))
    lam = 3.0
    direct = hyper.direct_at(lam)
    assert direct.mode == "direct" and direct.lam == lam
    mean_h, log_var_h = hyper.variational_parameters(lam)
    mean_d, log_var_d = direct.variational_parameters()
    for n in mean_h:
        assert torch.equal(mean_h[n], mean_d[n]) and torch.equal(log_var_h[n], log_var_d[n])
    assert not torch.allclose(hyper.variational_parameters(0.2)[0]["1.weight"], mean_h["1.weight"])
    x = torch.randn(8, 6)
    assert torch.equal(hyper.eval()(x, lam), direct.eval()(x))
    y = torch.randint(0, 3, (8,))
    loss_h = hyper.objective(x, y, lam, generator=torch.Generator().manual_seed(1))
    loss_d = direct.objective(x, y, lam, generator=torch.Generator().manual_seed(1))
    for a, b in zip(loss_h, loss_d):
        assert torch.equal(a, b)
    loader = _batches()
    scores_h, scores_d = hyper.evaluate(loader, lam, mc_samples=2), direct.evaluate(loader, mc_samples=2)
    assert scores_h == scores_d
    assert scores_h["evidence"] == pytest.approx(-scores_h["expected_nll"] - lam * scores_h["kl"])
    assert hyper.pruning_sweep(loader, lam, [0.0, 0.5]) == direct.pruning_sweep(loader, lam, [0.0, 0.5])


def test_evaluate_leaves_the_model_and_rng_as_found():
    hyper = _model("lowrank").train()
    before = {k: v.clone() for k, v in hyper.state_dict().items()}
    rng = torch.get_rng_state()
    hyper.evaluate(_batches(), 1.0, mc_samples=3)
    assert hyper.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in hyper.state_dict().items())


def test_log_lambda_samples_cover_the_configured_range():
    g = torch.Generator().manual_seed(0)
    low, high, n = -1.0, 2.0, 30_000
    s = sample_log_lambda(n, low, high, generator=g)
    assert s.min() >= low and s.max() <= high
    assert s.min() < low + 0.01 and s.max() > high - 0.01
    counts = torch.histc(s, bins=10, min=low, max=high)
    sd = math.sqrt(n * 0.1 * 0.9)
    assert (counts - n / 10).abs().max() < 5 * sd, counts  # uniform in log λ
    # The module draws its training λ from the configured range.
    torch.manual_seed(0)
    model = _model("lowrank", log_lambda_range=(0.5, 1.5))
    draws = torch.tensor([math.log10(model.draw_lambda()) for _ in range(3000)])
    assert draws.min() >= 0.5 and draws.max() <= 1.5
    assert draws.min() < 0.52 and draws.max() > 1.48 and abs(float(draws.mean()) - 1.0) < 0.03
    assert _model("direct", lam=7.0).draw_lambda() == 7.0


def test_binned_accuracy_puts_each_batch_in_its_lambda_bin():
    metric = BinnedAccuracy(3, -1.0, 2.0)
    logits = torch.eye(3)
    metric.update(logits, torch.tensor([0, 1, 2]), -0.5)  # bin 0, 3/3 correct
    metric.update(logits, torch.tensor([0, 0, 0]), 1.9)   # bin 2, 1/3 correct
    metric.update(logits, torch.tensor([1, 1, 1]), 2.0)   # the upper edge belongs to the last bin
    acc = metric.compute()
    assert acc[0] == 1.0 and math.isnan(acc[1]) and acc[2] == pytest.approx(2 / 6)
    assert metric.edges() == [-1.0, 0.0, 1.0, 2.0]


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "kernel"}, "model.mode: 'kernel'; allowed: 'lowrank', 'linear', 'direct'"),
    ({"log_lambda_range": [2.0, -1.0]}, "model.log_lambda_range: .*allowed: \\[a, b\\] with a < b"),
    ({"lam": 0.0}, "model.lam: 0.0; allowed: a finite number > 0.0"),
    ({"hidden": 0}, "model.hidden: 0; allowed: an integer >= 1"),
    ({"eval_lambdas": [1.0, -2.0]}, "model.eval_lambdas: -2.0"),
    ({"prior_var": -0.1}, "model.prior_var: -0.1"),
])
def test_bad_settings_raise_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        _model(kwargs.pop("mode", "lowrank"), **kwargs)


def test_checkpoint_round_trip_evaluates_the_same(tmp_path):
    hyper = _model("lowrank", data_size=None)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)

    class _DM(L.LightningDataModule):
        num_train = 40

        def train_dataloader(self):
            return _batches(batch_size=8)

    trainer.fit(hyper, datamodule=_DM())
    assert hyper.data_size == 40
    trainer.save_checkpoint(tmp_path / "h.ckpt")
    loaded = HyperNetClassifier.load_from_checkpoint(tmp_path / "h.ckpt")
    assert loaded.evaluate(_batches(), 2.0) == hyper.evaluate(_batches(), 2.0)


def test_training_counts_parameter_updates_and_fine_tunes_from_g_lambda():
    torch.manual_seed(0)
    hyper = _model("lowrank")
    trainer = L.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(hyper, train_dataloaders=_batches(batch_size=8))
    trainable = sum(p.numel() for p in hyper.parameters() if p.requires_grad)
    assert trainer.global_step == 5 and hyper.parameter_updates() == 5 * trainable
    # 2P per tensor for B₀ alone: a hypernetwork has more parameters than the direct model's 2P.
    assert trainable > 2 * hyper.num_weights
    direct = hyper.direct_at(1.0)
    start = {n: m.detach().clone() for n, m in direct.variational_parameters()[0].items()}
    assert all(torch.equal(start[n], m) for n, m in hyper.variational_parameters(1.0)[0].items())
    L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(direct, train_dataloaders=_batches())
    assert any(not torch.equal(start[n], m) for n, m in direct.variational_parameters()[0].items())
    assert sum(p.numel() for p in direct.parameters()) == 2 * hyper.num_weights


@pytest.mark.slow
def test_lightning_fit_trains_a_hypernet_and_logs_the_pruning_figure(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lightning_app", "fit", "--config", "digits_hypernet.yaml",
           "--trainer.max_epochs=2", f"--trainer.logger.init_args.save_dir={tmp_path}",
           "--trainer.enable_progress_bar=false", "--model.init_args.prune_fractions=[0.0, 0.5, 0.9]"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events[0].parent)).Reload()
    assert "pruning/accuracy_vs_removed" in acc.Tags()["images"]
    tags = set(acc.Tags()["scalars"])
    for lam in ("0.1", "1", "10", "100"):
        assert {f"val/acc@{lam}", f"val/nll@{lam}", f"val/kl@{lam}", f"val/evidence@{lam}",
                f"pruning/stability_90@{lam}"} <= tags
    assert {"train/loss", "train/nll", "train/kl", "train/parameter_updates", "val/acc"} <= tags
    assert any(t.startswith("train/acc_bin0_loglam_") for t in tags)
    assert acc.Scalars("val/acc@1")[-1].value > 0.5  # two epochs learn something at λ = 1
