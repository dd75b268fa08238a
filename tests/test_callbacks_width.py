"""Scale-invariance detection and the gradient-norm width against hand computations."""

import copy

import lightning as L
import pytest
import torch
from torch import nn

from callbacks import (
    GradientNormWidth,
    gradient_norm_width,
    scale_invariant_parameters,
    scale_invariant_structure,
)
from datamodules import DigitsDataModule
from models import MarginClassifier, build_backbone


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(2, 2, 3, padding=1)
        self.conv_b = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        h = torch.relu(self.conv_a(x))           # conv_a feeds the add (and BN via it): not invariant
        h = self.bn(self.conv_b(h) + h)          # a residual add before the BN breaks invariance
        return self.head(h.mean((2, 3)))


class _Dynamic(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, the hook fallback must."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        h = self.relu(self.bn(self.conv(x)))
        if h.sum() > -1e9:
            h = h * 1.0
        return self.fc(h.flatten(1))


class _LeakyDynamic(_Dynamic):
    def forward(self, x):
        h = self.conv(x)
        h = self.bn(h) + h  # h also bypasses the BN: not scale-invariant
        if h.sum() > -1e9:
            h = h * 1.0
        return self.fc(h.flatten(1))


def _batches(n_batches=3, size=16, shape=(2, 4, 4), classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(size, *shape, generator=g), "y": torch.randint(0, classes, (size,), generator=g)}
            for _ in range(n_batches)]


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, bias=True), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Conv2d(3, 4, 1, bias=False), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16, 3))


def test_detection_on_small_nets():
    net = _conv_net()
    # conv->BN yes; conv->ReLU->BN yes (ReLU is positively homogeneous); the last linear has no BN
    assert scale_invariant_structure(net) == {"0.weight": ["1"], "3.weight": ["5"]}
    batch = _batches(1)[0]
    assert scale_invariant_parameters(net, "ce", batch) == {"0.weight": ["1"], "3.weight": ["5"]}
    assert scale_invariant_structure(_Residual()) == {}
    # MarginClassifier: every backbone conv; the frozen head W is not a trainable parameter
    model = MarginClassifier(num_classes=10, input_shape=(1, 8, 8), backbone="small_cnn",
                             backbone_kwargs={"width": 2}, head_seed=0)
    assert sorted(scale_invariant_structure(model)) == ["backbone.0.weight", "backbone.3.weight", "backbone.6.weight"]
    res = build_backbone("resnet20", (3, 8, 8), width=2)
    convs = sorted(n for n, p in res.named_parameters() if p.ndim == 4)
    assert sorted(scale_invariant_structure(res)) == convs  # every conv, shortcut convs included
    mlp = MarginClassifier(num_classes=3, input_shape=(2,), backbone="mlp", backbone_kwargs={"width": 8}, head_seed=0)
    assert sorted(scale_invariant_structure(mlp)) == ["backbone.1.weight", "backbone.4.weight"]


def test_hook_fallback_and_gradient_confirmation():
    net = _Dynamic()
    x = torch.randn(8, 2, 4, 4)
    with pytest.raises(ValueError, match="cannot trace"):
        scale_invariant_structure(net)
    assert scale_invariant_structure(net, x) == {"conv.weight": ["bn"]}
    batch = {"x": x, "y": torch.randint(0, 3, (8,))}
    assert scale_invariant_parameters(net, "ce", batch) == {"conv.weight": ["bn"]}
    # hooks see conv -> bn but not the functional add beside it; the gradient check rejects it
    leaky = _LeakyDynamic()
    assert scale_invariant_structure(leaky, x) == {"conv.weight": ["bn"]}
    assert scale_invariant_parameters(leaky, "ce", batch) == {}


def _width_by_hand(net, batches, invariant, per_channel=False):
    """Unit-norm rescaling in a deep copy, plain autograd in train mode, mean of gradient norms."""
    net = copy.deepcopy(net)
    with torch.no_grad():
        for name in invariant:
            w = net.get_parameter(name)
            if per_channel:
                w /= w.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.ndim - 1)))
            else:
                w /= w.norm()
    net.train()
    norms = []
    for b in batches:
        net.zero_grad()
        nn.functional.cross_entropy(net(b["x"]), b["y"]).backward()
        norms.append(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in net.parameters() if p.grad is not None)))
    return torch.stack(norms).mean().item()


def test_width_matches_hand_computation_and_is_scale_invariant():
    net, batches = _conv_net(), _batches()
    est = gradient_norm_width(net, "ce", batches)
    assert est.scale_invariant == ["0.weight", "3.weight"] and est.num_batches == 3 and est.batch_size == 16
    assert est.value == pytest.approx(_width_by_hand(net, batches, est.scale_invariant), rel=1e-5)
    raw = gradient_norm_width(net, "ce", batches, normalize=False).value
    assert raw == pytest.approx(_width_by_hand(net, batches, []), rel=1e-5)
    scaled = copy.deepcopy(net)
    with torch.no_grad():
        scaled[0].weight.mul_(10.0)
        scaled[3].weight.mul_(10.0)
    assert gradient_norm_width(scaled, "ce", batches).value == pytest.approx(est.value, rel=1e-5)
    raw_scaled = gradient_norm_width(scaled, "ce", batches, normalize=False).value
    assert abs(raw_scaled - raw) > 0.01 * raw  # without normalisation the width depends on the scale
    # per output channel: different factors per channel leave the per-channel width unchanged
    per_ch = gradient_norm_width(net, "ce", batches, per_channel=True).value
    assert per_ch == pytest.approx(_width_by_hand(net, batches, est.scale_invariant, per_channel=True), rel=1e-5)
    with torch.no_grad():
        scaled[0].weight.copy_(net[0].weight * torch.tensor([0.1, 3.0, 20.0]).reshape(3, 1, 1, 1))
    assert gradient_norm_width(scaled, "ce", batches, per_channel=True).value == pytest.approx(per_ch, rel=1e-5)


def test_width_callback_restores_running_stats_and_records_batch_size(tmp_path):
    dm = DigitsDataModule(batch_size=128, eval_batch_size=512)
    model = MarginClassifier(num_classes=10, input_shape=(1, 8, 8), backbone="small_cnn",
                             backbone_kwargs={"width": 2}, head_seed=0)
    before = copy.deepcopy(model.state_dict())
    cb = GradientNormWidth(num_batches=3)
    out = cb.measure_now(None, model, datamodule=dm)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    rec = cb.history[0]
    assert rec["metric"] == "width/width" and rec["batch_size"] == 128 and rec["num_samples"] == 384
    assert rec["bn_mode"] == "train" and rec["normalize"] and rec["scale_invariant"] == 3
    assert out["width"].stderr > 0 and out["scale_invariant_tensors"].value == 3.0
    # the same subset as the plain function on hand-built batches
    dm.setup()
    ds = dm.train_eval_dataloader(distributed=False).dataset
    order = torch.randperm(dm.num_train, generator=torch.Generator().manual_seed(0))[:384].split(128)
    batches = [torch.utils.data.default_collate([ds[i] for i in idx.tolist()]) for idx in order]
    assert gradient_norm_width(model, None, batches).value == pytest.approx(out["width"].value, rel=1e-6)


def test_width_override_errors_before_training(tmp_path):
    model = MarginClassifier(num_classes=10, input_shape=(1, 8, 8), backbone="small_cnn",
                             backbone_kwargs={"width": 2}, head_seed=0)
    cb = GradientNormWidth(scale_invariant=["backbone.0.weight", "head.linear.weight"])
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                        default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"GradientNormWidth.scale_invariant: \['head.linear.weight'\]"):
        trainer.fit(model, DigitsDataModule())
    assert trainer.global_step == 0
    with pytest.raises(ValueError, match="GradientNormWidth.scale_invariant must be a list"):
        GradientNormWidth(scale_invariant="backbone.0.weight")
    # an explicit list is used as given
    ok = GradientNormWidth(scale_invariant=["backbone.0.weight"], num_batches=1)
    ok.measure_now(None, model, datamodule=DigitsDataModule())
    assert ok.history[0]["scale_invariant"] == 1
