"""SAM / ASAM / Riemannian SAM: perturbation math, training-loop behaviour, configs."""
import copy
import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_app import build_cli, resolve_config
from models import (
    MarginClassifier,
    SAMClassifier,
    discounted_cross_entropy,
    scale_invariant_structure,
)
from models.sam import (
    retract_to_sphere,
    riemannian_epsilon,
    sam_epsilon,
    tangent_projection,
)

DIM, K, BS = 4, 3, 8


def make_batches(n: int = 3, bs: int = BS, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(bs, DIM, generator=g), "y": torch.randint(0, K, (bs,), generator=g),
             "idx": torch.arange(i * bs, (i + 1) * bs), "gap": 0.5 * torch.rand(bs, generator=g)} for i in range(n)]


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


def model_kwargs(**kw) -> dict:
    base = dict(num_classes=K, input_shape=(DIM,), backbone="mlp", backbone_kwargs={"width": 8, "depth": 1},
                head_seed=0, optimizer=sgd)
    return {**base, **kw}


def build(cls=SAMClassifier, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return cls(**model_kwargs(**kw))


def fit(model, batches, epochs: int = 1, ckpt_path=None, **trainer_kw):
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, **trainer_kw)
    trainer.fit(model, DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
    return trainer


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs: max |diff| {(sa[k].double() - sb[k].double()).abs().max()}"


def reference_sam(model: MarginClassifier, batches, windows, rho, accumulate=1, sam_every=1, adaptive=False,
                  eta=0.01, perturb=None, wd_in_eps=False, riemannian_names=None, lr=0.1, momentum=0.9, wd=5e-4):
    """Plain-PyTorch SAM on the window's gradient, BN statistics from the first pass only."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    chosen = [(n, p) for n, p in named if perturb is None or perturb in n]
    opt = torch.optim.SGD([p for _, p in named], lr=lr, momentum=momentum, weight_decay=wd)
    model.train()
    it = iter(batches)
    for step in range(windows):
        window = [next(it) for _ in range(accumulate)]
        opt.zero_grad()
        for b in window:
            (discounted_cross_entropy(model(b["x"]), b["y"], b["gap"]) / accumulate).backward()
        if step % sam_every == 0:
            ps = [p for _, p in chosen]
            gs = [p.grad.clone() for p in ps]
            decay = wd if wd_in_eps else 0.0
            if riemannian_names is not None:
                eps = riemannian_epsilon(ps, gs, rho, [n in riemannian_names for n, _ in chosen], weight_decay=decay)
            else:
                eps = sam_epsilon(ps, gs, rho, adaptive=adaptive, eta=eta, weight_decay=decay)
            old = [p.detach().clone() for p in ps]
            buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
            with torch.no_grad():
                for p, e in zip(ps, eps):
                    p.add_(e)
            opt.zero_grad()
            for b in window:
                (discounted_cross_entropy(model(b["x"]), b["y"], b["gap"]) / accumulate).backward()
            with torch.no_grad():
                for p, o in zip(ps, old):
                    p.copy_(o)
            model.load_state_dict({**model.state_dict(), **buffers})
        opt.step()


class DropoutNet(nn.Module):
    """A backbone with dropout (no BN) for the dropout-mask test."""

    def __init__(self, input_shape, width: int = 16):
        super().__init__()
        self.fc = nn.Linear(math.prod(input_shape), width)
        self.drop = nn.Dropout(0.5)
        self.out_features = width

    def forward(self, x):
        return torch.relu(self.drop(self.fc(x.flatten(1))))  # dropout first: its input is nonzero


_QUICK = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
          "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
          "--trainer.enable_model_summary=false", "--data.init_args.batch_size=16"]


def _two_shard_reference(model, shards, rho, synced):
    """SAM under data parallelism, simulated in one process: DDP averages gradients over shards."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    model.train()

    def shard_grads(b):
        opt.zero_grad()
        discounted_cross_entropy(model(b["x"]), b["y"], b["gap"]).backward()
        return [p.grad.clone() for p in params]

    firsts = [shard_grads(b) for b in shards]
    mean_first = [sum(gs) / len(gs) for gs in zip(*firsts)]
    eps = [sam_epsilon(params, mean_first if synced else g, rho) for g in firsts]
    seconds = []
    old = [p.detach().clone() for p in params]
    for b, e in zip(shards, eps):
        with torch.no_grad():
            for p, o, ei in zip(params, old, e):
                p.copy_(o + ei)
        seconds.append(shard_grads(b))
    with torch.no_grad():
        for p, o, *gs in zip(params, old, *seconds):
            p.copy_(o - 0.1 * sum(gs) / len(gs))


def test_sam_epsilon_hand_built():
    w = [torch.tensor([1.0, -2.0]), torch.tensor([0.5])]
    g = [torch.tensor([3.0, 0.0]), torch.tensor([4.0])]  # ‖g‖ = 5
    eps = sam_epsilon(w, g, rho=0.5)
    torch.testing.assert_close(eps[0], torch.tensor([0.3, 0.0]))
    torch.testing.assert_close(eps[1], torch.tensor([0.4]))
    # ASAM: T = |w| + η = [1.1, 2.1], [0.6]; T g = [3.3, 0], [2.4]; ε = ρ T² g / ‖T g‖
    eps = sam_epsilon(w, g, rho=0.5, adaptive=True, eta=0.1)
    norm = math.sqrt(3.3 ** 2 + 2.4 ** 2)
    torch.testing.assert_close(eps[0], torch.tensor([0.5 * 1.21 * 3.0 / norm, 0.0]))
    torch.testing.assert_close(eps[1], torch.tensor([0.5 * 0.36 * 4.0 / norm]))
    # weight decay enters as g + λw: [3.2, -0.4], [4.1]
    eps = sam_epsilon(w, g, rho=1.0, weight_decay=0.2)
    gw = torch.tensor([3.2, -0.4, 4.1])
    torch.testing.assert_close(torch.cat(eps), gw / gw.norm())
    # a zero gradient (or rho = 0) gives exactly zero, not NaN
    assert all(torch.equal(e, torch.zeros_like(e)) for e in sam_epsilon(w, [torch.zeros(2), torch.zeros(1)], 0.1))
    assert all(torch.equal(e, torch.zeros_like(e)) for e in sam_epsilon(w, g, 0.0, adaptive=True))


def test_riemannian_epsilon_on_sphere_and_tangent():
    gen = torch.Generator().manual_seed(1)
    w = [torch.randn(5, 3, generator=gen), torch.randn(4, generator=gen)]
    g = [torch.randn(5, 3, generator=gen), torch.randn(4, generator=gen)]
    rho = 0.3
    eps = riemannian_epsilon(w, g, rho, scale_invariant=[True, False])
    # the hand computation: g⊥ = g - <g,w>/‖w‖² w, N = sqrt(‖g⊥‖² + ‖g_other‖²)
    gp = g[0] - (g[0] * w[0]).sum() / (w[0] * w[0]).sum() * w[0]
    assert abs(float((gp * w[0]).sum())) < 1e-5  # tangent
    n = math.sqrt(float((gp * gp).sum() + (g[1] * g[1]).sum()))
    v = rho * gp / n
    torch.testing.assert_close(tangent_projection(w[0], g[0]), gp)
    torch.testing.assert_close(w[0] + eps[0], w[0].norm() * (w[0] + v) / (w[0] + v).norm())
    torch.testing.assert_close((w[0] + eps[0]).norm(), w[0].norm())  # stays on the sphere
    torch.testing.assert_close(eps[1], rho * g[1] / n)  # the other tensor: the SAM step
    # the rotation angle is atan(‖v‖/‖w‖) and the move is within span{w, g⊥}
    cos = float((w[0] * (w[0] + eps[0])).sum() / w[0].norm() ** 2)
    assert math.isclose(math.acos(min(1.0, cos)), math.atan(float(v.norm() / w[0].norm())), rel_tol=1e-4)
    # hand-built: w = e1, g = (5, 1): the tangent direction is e2, a unit step rotates by 45°
    out = riemannian_epsilon([torch.tensor([1.0, 0.0])], [torch.tensor([5.0, 1.0])], 1.0, [True])[0]
    torch.testing.assert_close(torch.tensor([1.0, 0.0]) + out, torch.tensor([1.0, 1.0]) / math.sqrt(2))
    torch.testing.assert_close(retract_to_sphere(torch.tensor([0.0, 2.0]), torch.tensor([2.0, 0.0])),
                               torch.tensor([math.sqrt(2), math.sqrt(2)]))


def test_detected_scale_invariant_weights_have_orthogonal_gradients():
    torch.manual_seed(0)
    model = MarginClassifier(num_classes=4, input_shape=(1, 8, 8), backbone="small_cnn", backbone_kwargs={"width": 4})
    names = list(scale_invariant_structure(model, torch.zeros(2, 1, 8, 8)))  # what Riemannian SAM uses
    assert names == ["backbone.0.weight", "backbone.3.weight", "backbone.6.weight"]
    model.train()
    batch = {"x": torch.randn(16, 1, 8, 8), "y": torch.randint(0, 4, (16,)), "gap": torch.rand(16)}
    loss, _ = model.loss_and_logits(batch)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, [params[n] for n in names] + [params["backbone.1.weight"]])
    for n, gr in zip(names, grads):
        cos = (gr * params[n]).sum() / (gr.norm() * params[n].norm())
        assert abs(float(cos.detach())) < 1e-4, n  # the defining property: <∇L, w> = 0
    assert abs(float((grads[-1] * params["backbone.1.weight"]).sum().detach())) > 1e-6  # a BN weight is not


@pytest.mark.parametrize("extra", [{}, {"adaptive": True}, {"riemannian": True}, {"perturb_weight_decay": True}])
def test_rho_zero_reproduces_base_optimizer_with_step_scheduler(extra):
    sched = {"lr_scheduler": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
             "scheduler_interval": "step"}
    data = make_batches(3)
    base = build(MarginClassifier, **sched)
    fit(base, data, epochs=2)
    sam = build(SAMClassifier, rho=0.0, **sched, **extra)
    trainer = fit(sam, data, epochs=2)
    assert_same_state(base, sam)  # parameters and BN buffers, bit for bit
    assert trainer.global_step == 6
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)


def test_gradient_accumulation_and_epoch_scheduler_act_on_base_optimizer():
    sched = {"lr_scheduler": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}
    data = make_batches(3)  # windows of 2 then 1 (the epoch closes the window), as in Lightning
    base = build(MarginClassifier, **sched)
    base_trainer = fit(base, data, epochs=2, accumulate_grad_batches=2)
    sam = build(SAMClassifier, rho=0.0, accumulate_grad_batches=2, **sched)
    trainer = fit(sam, data, epochs=2)
    assert_same_state(base, sam)
    assert trainer.global_step == base_trainer.global_step == 4
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)
    with pytest.raises(Exception, match="accumulate_grad_batches"):  # the Trainer flag is refused
        fit(build(SAMClassifier), data, accumulate_grad_batches=2)


@pytest.mark.parametrize("opts", [
    {"rho": 0.2},
    {"rho": 0.5, "adaptive": True, "eta": 0.05},
    {"rho": 0.2, "accumulate_grad_batches": 2, "sam_every": 2},
    {"rho": 0.2, "perturb_params": "backbone.2", "perturb_weight_decay": True},
    {"rho": 0.2, "riemannian": True},
])
def test_sam_training_matches_plain_pytorch_reference(opts):
    data = make_batches(4)
    model = build(SAMClassifier, **opts)
    ref = copy.deepcopy(model)
    fit(model, data, epochs=1)
    k = opts.get("accumulate_grad_batches", 1)
    reference_sam(ref, data, windows=4 // k, rho=opts["rho"], accumulate=k, sam_every=opts.get("sam_every", 1),
                  adaptive=opts.get("adaptive", False), eta=opts.get("eta", 0.01),
                  perturb=opts.get("perturb_params"), wd_in_eps=opts.get("perturb_weight_decay", False),
                  riemannian_names=model.scale_invariant_names if opts.get("riemannian") else None)
    for (n, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    # and SAM did move away from plain SGD (the comparison above is not vacuous)
    plain = build(SAMClassifier, **{**opts, "rho": 0.0})
    fit(plain, data, epochs=1)
    assert not torch.allclose(plain.backbone[1].weight, model.backbone[1].weight, atol=1e-6)


def test_first_pass_batchnorm_statistics_are_kept():
    batch = make_batches(1)[0]
    model = build(SAMClassifier, rho=1.0)
    start = copy.deepcopy(model)
    fit(model, [batch], epochs=1)
    ref = copy.deepcopy(start).train()
    with torch.no_grad():
        ref(batch["x"])  # one train-mode forward at the unperturbed weights
    for name in ("backbone.2", "head.bn"):
        got, want = model.get_submodule(name), ref.get_submodule(name)
        assert torch.equal(got.running_mean, want.running_mean) and torch.equal(got.running_var, want.running_var)
        assert int(got.num_batches_tracked) == 1
    # the second pass would have given other statistics: the check above can fail
    perturbed = copy.deepcopy(start).train()
    with torch.no_grad():
        perturbed.backbone[1].weight.add_(0.5)
        perturbed(batch["x"])
    assert not torch.equal(perturbed.backbone[2].running_mean, model.backbone[2].running_mean)


def test_same_dropout_mask_in_both_passes():
    model = build(SAMClassifier, rho=0.5)
    model.backbone = DropoutNet((DIM,), width=8)  # same feature width as the mlp it replaces
    masks = []
    model.backbone.drop.register_forward_hook(lambda m, inp, out: masks.append((out == 0) & (inp[0] != 0)))
    fit(model, make_batches(2), epochs=1)
    assert len(masks) == 4  # two passes per step
    for first, second in (masks[0:2], masks[2:4]):
        assert torch.equal(first, second)
        assert 0 < first.float().mean() < 1
    assert not torch.equal(masks[0], masks[2])  # the RNG does advance between steps


def test_bf16_autocast_skips_steps_with_nonfinite_gradients():
    good = make_batches(3)
    bad = dict(good[1], x=torch.full_like(good[1]["x"], float("nan")))
    skipped = build(SAMClassifier, rho=0.1)
    trainer = fit(skipped, [good[0], bad, good[2]], epochs=1, precision="bf16-mixed")
    reference = build(SAMClassifier, rho=0.1)
    fit(reference, [good[0], good[2]], epochs=1, precision="bf16-mixed")
    assert skipped._skipped == 1 and trainer.global_step == 2
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 1.0
    assert all(torch.isfinite(v).all() for v in skipped.state_dict().values() if v.is_floating_point())
    assert_same_state(skipped, reference)  # the bad step changed nothing, BN statistics included
    off = build(SAMClassifier, rho=0.1, skip_nonfinite=False)
    fit(off, [good[0], bad], epochs=1, precision="bf16-mixed")
    assert not torch.isfinite(off.backbone[1].weight).all()  # without the guard the NaN gets in


def test_checkpoint_resume_continues_identically(tmp_path):
    opts = dict(rho=0.1, sam_every=2, lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 2, 0.7),
                scheduler_interval="step")
    data = make_batches(3)  # 3 steps per epoch, SAM every 2nd: the phase crosses the epoch boundary
    straight = build(SAMClassifier, **opts)
    fit(straight, data, epochs=3)
    first = build(SAMClassifier, **opts)
    trainer = fit(first, data, epochs=1)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = build(SAMClassifier, seed=123, **opts)  # different init: everything must come from the file
    trainer = fit(resumed, data, epochs=3, ckpt_path=str(ckpt))
    assert resumed._windows == straight._windows == 9
    assert_same_state(straight, resumed)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.7 ** 4)


@pytest.mark.parametrize("kwargs,match", [
    ({"rho": -0.1}, "model.rho"),
    ({"rho": float("nan")}, "model.rho"),
    ({"eta": -1.0}, "model.eta"),
    ({"sam_every": 0}, "model.sam_every"),
    ({"accumulate_grad_batches": 0}, "model.accumulate_grad_batches"),
    ({"adaptive": True, "riemannian": True}, r"model.riemannian: True; allowed: false when model.adaptive is true"),
    ({"perturb_params": "no_such_layer"}, "model.perturb_params.*no_such_layer"),
    ({"perturb_params": "("}, "model.perturb_params.*regular expression"),
    ({"riemannian": True, "perturb_params": r"backbone\.2\."}, "model.riemannian.*scale_invariant_params"),
])
def test_bad_options_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(SAMClassifier, **kwargs)


def test_plateau_scheduler_is_refused():
    model = build(SAMClassifier, lr_scheduler=lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt))
    with pytest.raises(ValueError, match="model.lr_scheduler.*ReduceLROnPlateau"):
        model.configure_optimizers()


@pytest.mark.parametrize("name,cls,check", [
    ("digits_sam.yaml", "SAMClassifier", {"rho": 0.05, "adaptive": False}),
    ("digits_asam.yaml", "SAMClassifier", {"adaptive": True, "eta": 0.01}),
    ("digits_trace_penalty.yaml", "CurvaturePenaltyClassifier", {"trace_probes": 1}),
])
def test_offline_configs_parse_and_train_one_epoch(name, cls, check, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", resolve_config(name), *_QUICK], run=False)
    assert type(cli.model).__name__ == cls
    for key, value in check.items():
        assert getattr(cli.model, key) == value
    before = {k: v.clone() for k, v in cli.model.state_dict().items()}
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 2
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    assert not torch.equal(before["backbone.0.weight"], cli.model.state_dict()["backbone.0.weight"])


@pytest.mark.parametrize("name,cls", [("cifar_sam.yaml", "SAMClassifier"), ("cifar_asam.yaml", "SAMClassifier"),
                                      ("cifar_trace_penalty.yaml", "CurvaturePenaltyClassifier")])
def test_cifar_configs_parse(name, cls, tmp_path):
    cli = build_cli(["--config", resolve_config(name), f"--data.init_args.data_dir={tmp_path}",
                     "--trainer.logger=false"], run=False)
    assert type(cli.model).__name__ == cls and cli.model.hparams.backbone == "resnet18"


@pytest.mark.slow
@pytest.mark.parametrize("synced", [True, False])
def test_ddp_synchronised_and_per_replica_perturbations(synced):
    import functools

    data = make_batches(2)
    model = build(SAMClassifier, rho=0.3, sync_perturbation=synced,
                  optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    ref = copy.deepcopy(model)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=2, strategy="ddp_spawn")
    trainer.fit(model, DataLoader(data, batch_size=None))  # rank r trains on batch r
    _two_shard_reference(ref, data, rho=0.3, synced=synced)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, ref.get_parameter(n), rtol=1e-5, atol=1e-6, msg=n)
    other = copy.deepcopy(build(SAMClassifier))
    _two_shard_reference(other, data, rho=0.3, synced=not synced)
    assert not torch.allclose(other.backbone[1].weight, model.backbone[1].weight, atol=1e-6)  # modes differ
