"""Heads: initialisations by their defining properties; each loss against its formula by hand,
gradients at extreme logits, gaps, config errors."""

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from datamodules import DigitsDataModule
from marginboost.errors import ConfigError
from models import (
    ArcFaceHead,
    CosFaceHead,
    L2SoftmaxHead,
    LinearHead,
    MarginClassifier,
    MarginHead,
    build_head,
    discounted_cross_entropy,
    head_weight,
)

REPO = Path(__file__).resolve().parents[2]
GAP_HEADS = ("margin", "l2_softmax", "cosface", "arcface")


def _by_hand_ce(true_logit, logits, y):
    """``−log e^{t} / (e^{t} + Σ_{j≠y} e^{f_j})`` per object, from Python floats (no torch CE)."""
    out = []
    for t, row, k in zip(true_logit.tolist(), logits.tolist(), y.tolist()):
        others = [math.exp(v) for j, v in enumerate(row) if j != k]
        out.append(-(t - math.log(math.exp(t) + sum(others))))
    return torch.tensor(out, dtype=torch.float64)


def _cosines(z, w):
    return torch.stack([torch.stack([zi.dot(wj) / (zi.norm() * wj.norm()) for wj in w]) for zi in z])


def test_head_inits():
    g = torch.Generator().manual_seed(3)
    w = head_weight(10, 32, "orthogonal", generator=g).double()
    torch.testing.assert_close(w @ w.T, torch.eye(10, dtype=torch.float64), atol=1e-6, rtol=0)
    etf = head_weight(10, 32, "simplex_etf", generator=g).double()
    gram = etf @ etf.T
    torch.testing.assert_close(gram.diagonal(), torch.ones(10, dtype=torch.float64), atol=1e-6, rtol=0)
    off = gram[~torch.eye(10, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1 / 9), atol=1e-6, rtol=0)
    k = head_weight(10, 5000, "kaiming", generator=g)
    assert abs(k.var().item() - 2 / 5000) < 2e-5
    a = head_weight(4, 8, generator=torch.Generator().manual_seed(1))
    b = head_weight(4, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="head_init"):
        head_weight(3, 4, "xavier")
    with pytest.raises(ValueError, match="simplex_etf"):
        head_weight(10, 5, "simplex_etf")


def test_cosface_with_m0_s1_is_softmax_over_cosines():
    z, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    head = CosFaceHead(5, 4, s=1.0, m=0.0, seed=1).double()
    cos = _cosines(z, head.raw_weight.detach())
    torch.testing.assert_close(head(z), cos)
    expected = -torch.log_softmax(cos, dim=1)[torch.arange(6), y].mean()
    torch.testing.assert_close(head.loss(head(z), y), expected)


def test_cosface_loss_is_the_formula_with_per_object_margin():
    s, m = 8.0, 0.3
    z, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([2, 0, 1, 2, 1])
    gap = torch.tensor([0.0, 1.0, 0.0, 2.5, 0.5], dtype=torch.float64)
    head = CosFaceHead(6, 3, s=s, m=m, seed=0).double()
    cos = _cosines(z, head.raw_weight.detach())
    true = s * (cos[torch.arange(5), y] - m) - gap  # per-object margin m + g_i / s
    expected = _by_hand_ce(true, s * cos, y).mean()
    torch.testing.assert_close(head.loss(head(z), y, gap), expected)


def test_arcface_loss_is_the_formula_with_angular_margin_and_fallback():
    s, m = 4.0, 0.5
    head = ArcFaceHead(3, 3, s=s, m=m, seed=0).double()
    w = F.normalize(head.raw_weight.detach(), dim=1)
    # objects at chosen angles θ_y to their class's weight row, the last two beyond π − m (fallback)
    thetas = torch.tensor([0.1, 0.9, 1.6, 2.5, 2.9], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    other = torch.stack([w[(k + 1) % 3] for k in y.tolist()])
    perp = F.normalize(other - (other * w[y]).sum(1, keepdim=True) * w[y], dim=1)
    z = torch.cos(thetas)[:, None] * w[y] + torch.sin(thetas)[:, None] * perp
    gap = torch.tensor([0.0, 0.7, 0.0, 0.3, 0.0], dtype=torch.float64)
    logits = head(z)
    torch.testing.assert_close(logits[torch.arange(5), y] / s, torch.cos(thetas))
    psi = [math.cos(t + m) if t + m <= math.pi else math.cos(t) - m * math.sin(m) for t in thetas.tolist()]
    true = s * torch.tensor(psi, dtype=torch.float64) - gap
    torch.testing.assert_close(head.loss(logits, y, gap), _by_hand_ce(true, logits.detach(), y).mean())


@pytest.mark.parametrize("learn_alpha", [False, True])
def test_l2_softmax_features_have_norm_alpha_and_loss_is_ce(learn_alpha):
    alpha = 5.0
    head = L2SoftmaxHead(7, 4, alpha=alpha, learn_alpha=learn_alpha, seed=2).double()
    with torch.no_grad():
        head.linear.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    z = torch.randn(9, 7, dtype=torch.float64) * torch.logspace(-3, 3, 9, dtype=torch.float64)[:, None]
    torch.testing.assert_close(head.embed(z).norm(dim=1), torch.full((9,), alpha, dtype=torch.float64))
    y = torch.randint(0, 4, (9,))
    w, b = head.linear.weight.detach(), head.linear.bias.detach()
    logits = torch.stack([torch.stack([alpha * zi.dot(wj) / zi.norm() + bj for wj, bj in zip(w, b)]) for zi in z])
    torch.testing.assert_close(head(z), logits)
    gap = torch.linspace(0, 1, 9, dtype=torch.float64)
    true = logits[torch.arange(9), y] - gap
    torch.testing.assert_close(head.loss(head(z), y, gap), _by_hand_ce(true, logits, y).mean())
    names = {n for n, _ in head.named_parameters()}
    assert ("alpha" in names) == learn_alpha
    if learn_alpha:
        head.loss(head(z), y).backward()
        assert head.alpha.grad is not None and head.alpha.grad != 0


@pytest.mark.parametrize("name", ["margin", "linear", "l2_softmax", "cosface", "arcface"])
def test_gradients_finite_at_extreme_logits(name):
    kwargs = {"cosface": {"s": 64.0}, "arcface": {"s": 64.0}, "l2_softmax": {"alpha": 1e4}}.get(name, {})
    head = build_head(name, 8, 4, seed=0, frozen=False, **kwargs)
    w = head.weight.detach()
    # features exactly on a class row (cos θ = 1), exactly opposite (cos θ = −1), huge, tiny, zero
    z = torch.cat([1e6 * w[:2], -1e6 * w[2:4], 1e-20 * w[:1], torch.zeros(1, 8), 1e4 * torch.randn(2, 8)])
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    z.requires_grad_(True)
    head.train()
    loss = head.loss(head(z), y)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [z.grad] + [p.grad for p in head.parameters() if p.grad is not None]
    assert len(grads) > 1 and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", GAP_HEADS)
def test_per_object_gap_reaches_only_its_objects(name):
    head = build_head(name, 6, 3, seed=0).double().eval()
    z, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    logits = head(z).detach().requires_grad_(True)
    gap = torch.tensor([0.0, 0.0, 1.5, 0.0, 0.0], dtype=torch.float64)
    g0, = torch.autograd.grad(head.loss(logits, y), logits)
    g1, = torch.autograd.grad(head.loss(logits, y, gap), logits)
    torch.testing.assert_close(g1[[0, 1, 3, 4]], g0[[0, 1, 3, 4]], rtol=0, atol=0)
    # the gapped object's true-class probability falls, so its pull on the true logit grows
    assert g1[2, y[2]] < g0[2, y[2]] - 1e-6


def test_per_object_gap_reaches_right_objects_through_the_datamodule():
    """Gaps set on the DataModule arrive with their objects in a shuffled batch (CosFace head)."""
    s, m = 10.0, 0.2
    dm = DigitsDataModule(batch_size=32, augment=False)
    dm.setup("fit")
    gaps = torch.zeros(dm.num_train)
    gaps[::7] = torch.linspace(0.5, 3.0, len(gaps[::7]))
    dm.set_gaps(gaps)
    model = MarginClassifier(num_classes=10, input_shape=(1, 8, 8), backbone="mlp", backbone_kwargs={"width": 16},
                             head="cosface", head_kwargs={"s": s, "m": m}).eval()
    torch.manual_seed(1)
    batch = next(iter(dm.train_dataloader()))
    torch.testing.assert_close(batch["gap"], gaps[batch["idx"]])
    assert (batch["gap"] > 0).any() and (batch["gap"] == 0).any()
    loss, logits = model.loss_and_logits(batch)
    cos = (logits / s).double()
    true = s * (cos[torch.arange(len(batch["y"])), batch["y"]] - m) - batch["gap"].double()
    torch.testing.assert_close(loss.double(), _by_hand_ce(true, s * cos, batch["y"]).mean(), rtol=1e-5, atol=1e-5)


def test_default_head_unchanged():
    model = MarginClassifier(num_classes=10, input_shape=(1, 8, 8), backbone="mlp", backbone_kwargs={"width": 16},
                             head_seed=0)
    assert type(model.head) is MarginHead and not model.head.weight.requires_grad
    assert sorted(k for k in model.state_dict() if k.startswith("head.")) == [
        "head.bn.num_batches_tracked", "head.bn.running_mean", "head.bn.running_var", "head.linear.weight"]
    z = torch.randn(8, 16)
    model.head.train()
    torch.testing.assert_close(model.head(z), F.batch_norm(z, None, None, training=True) @ model.head.weight.T)
    gap = torch.rand(8)
    logits, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    assert torch.equal(model.head.loss(logits, y, gap), discounted_cross_entropy(logits, y, gap))


def test_cosine_logit_scale_is_s_and_linear_head_is_plain_ce():
    head = build_head("cosface", 16, 10, s=12.0)
    torch.testing.assert_close(head.logit_scale(torch.randn(32, 16)).float(), torch.tensor(12.0))
    lin = build_head("linear", 16, 10)
    assert lin.weight.requires_grad and lin.bias.requires_grad
    z, y = torch.randn(4, 16), torch.tensor([1, 2, 3, 4])
    torch.testing.assert_close(lin.loss(lin(z), y), F.cross_entropy(z @ lin.weight.T + lin.bias, y))


def test_bad_head_config_raises_config_error():
    def make(**kw):
        return MarginClassifier(num_classes=3, input_shape=(4,), backbone="mlp", **kw)

    with pytest.raises(ConfigError, match=r"^model.head: 'softmax'; allowed: 'margin', 'linear', 'l2_softmax'"):
        make(head="softmax")
    with pytest.raises(ConfigError, match=r"^model.head_kwargs: 'alpha'; allowed: for head 'cosface': s, m"):
        make(head="cosface", head_kwargs={"alpha": 3.0})
    with pytest.raises(ConfigError, match=r"^model.head_kwargs.s: -1.0"):
        make(head="arcface", head_kwargs={"s": -1.0})
    with pytest.raises(ConfigError, match=r"^model.head_kwargs.m: 2.0; allowed: a finite number in \[0.0, 1.57"):
        make(head="arcface", head_kwargs={"m": 2.0})
    with pytest.raises(ConfigError, match=r"^model.head_scale: 2.0"):
        make(head="cosface", head_scale=2.0)
    with pytest.raises(ConfigError, match=r"^model.head_kwargs: 's'; allowed: for head 'margin': none"):
        make(head_kwargs={"s": 1.0})
    with pytest.raises(ConfigError, match="learn_alpha: 'yes'"):
        make(head="l2_softmax", head_kwargs={"learn_alpha": "yes"})


@pytest.mark.parametrize("cls_name", ["MarginClassifier", "SAMClassifier"])
def test_linear_head_refuses_gaps_before_training(cls_name):
    head = LinearHead(4, 3)
    with pytest.raises(ConfigError, match=r"^model.head: 'linear' with non-zero gaps; allowed:"):
        head.loss(torch.randn(2, 3), torch.tensor([0, 1]), 0.5)
    head.check_gaps(torch.zeros(5))  # all-zero gaps are fine
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    dm.set_gaps(torch.full((dm.num_train,), 0.5))
    import models

    model = getattr(models, cls_name)(num_classes=10, input_shape=(1, 8, 8), backbone="mlp",
                                      backbone_kwargs={"width": 8}, head="linear")
    before = [p.detach().clone() for p in model.parameters()]
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    with pytest.raises(ConfigError, match="model.head: 'linear' with non-zero gaps"):
        trainer.fit(model, dm)
    assert trainer.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_boosting_refuses_linear_head_with_a_gap_rule_before_training(tmp_path):
    from lightning_app import BoostingOrchestrator, MeanGapRule

    fitted = []

    def trainer_factory(r, round_dir):
        fitted.append(r)
        raise AssertionError("no trainer should be built")

    orch = BoostingOrchestrator(rounds=2, gap_rule=MeanGapRule(), run_dir=tmp_path / "run")
    model_factory = lambda r, seed: MarginClassifier(num_classes=10, input_shape=(1, 8, 8),  # noqa: E731
                                                     backbone="mlp", head="linear")
    with pytest.raises(ConfigError, match=r"^boosting.gap_rule: MeanGapRule.* with model.head 'linear'; allowed: NoGapRule"):
        orch.run(model_factory, trainer_factory, DigitsDataModule())
    assert fitted == []


def test_cli_selects_head_from_config():
    from lightning_app import build_cli, resolve_config

    cli = build_cli(["--config", resolve_config("digits.yaml"), "--trainer.logger=false",
                     "--model.init_args.head=arcface", "--model.init_args.head_kwargs={s: 16.0, m: 0.3}"],
                    run=False)
    assert isinstance(cli.model.head, ArcFaceHead) and (cli.model.head.s, cli.model.head.m) == (16.0, 0.3)
    assert cli.model.head.raw_weight.requires_grad  # freeze_head: null -> the head's default


@pytest.mark.slow
@pytest.mark.parametrize("head", ["cosface"])
def test_boosting_runs_with_another_head_from_the_cli(tmp_path, head):
    import json

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lightning_app", "fit", "--config", "digits_boost.yaml",
           f"--model.init_args.head={head}", "--model.init_args.head_kwargs={s: 10.0, m: 0.2}",
           "--trainer.max_epochs=2", "--boosting.rounds=2", f"--boosting.run_dir={tmp_path / 'run'}",
           "--trainer.enable_progress_bar=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds_done"] == 2
    gap = summary["history"][0]["gap"]  # round 1's margins became round 2's gaps
    assert gap["max"] > 0
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    # margins on s·cos logits are bounded by 2s per member
    assert state["M"].abs().max() <= 2 * 2 * 10.0 + 1e-4
