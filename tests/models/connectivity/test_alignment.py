"""Alignment: planted permutations recovered, aligned B computes B's function, residuals refused."""

import sys

import pytest
import torch
from torch import nn

from marginboost.errors import ConfigError
from models import (
    MarginClassifier,
    align,
    align_activations,
    align_ot,
    align_weights,
    hidden_layers,
    permute_hidden_units,
)


def _trained_stats(net: nn.Module, shape) -> nn.Module:
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(32, *shape) * 2 + 0.5)
    return net.eval()


def _bn_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Dropout(0.2),
                        nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))
    return _trained_stats(net, (12,))


def _conv_flatten(seed: int) -> nn.Module:
    """conv → BN → flatten into a linear layer: each channel owns a block of 9 inputs."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(5 * 9, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():  # no dead ReLUs: dead units are interchangeable, so nothing to recover
        net[5].bias.add_(1.0)
    return _trained_stats(net, (2, 6, 6))


def _inputs(net):
    return torch.randn(25, 2, 6, 6) if isinstance(net[0], nn.Conv2d) else torch.randn(25, 12)


METHODS = {
    "weights": lambda a, b, data: align_weights(a, b),
    "activations": lambda a, b, data: align_activations(a, b, data),
    "ot": lambda a, b, data: align_ot(a, b),
}


@pytest.mark.parametrize("make", [_bn_mlp, _conv_flatten])
@pytest.mark.parametrize("method", list(METHODS))
def test_planted_permutation_is_recovered(make, method):
    a = make(0)
    layers = hidden_layers(a)
    gen = torch.Generator().manual_seed(3)
    perms = [torch.randperm(layer.size, generator=gen) for layer in layers]
    b = permute_hidden_units(a, perms)
    x = _inputs(a)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=1e-5)  # planting keeps the function
    data = [_inputs(a) for _ in range(3)]
    aligned, maps = METHODS[method](a, b, data)
    for m, p in zip(maps, perms):
        assert torch.equal(m, torch.argsort(p))  # undoes the planted permutation
    for (name, va), vb in zip(a.state_dict().items(), aligned.state_dict().values()):
        torch.testing.assert_close(vb, va, rtol=0, atol=1e-6, msg=name)  # BN buffers included


@pytest.mark.parametrize("make", [_bn_mlp, _conv_flatten])
@pytest.mark.parametrize("method", list(METHODS))
def test_aligned_b_is_functionally_identical_to_b(make, method):
    a, b = make(0), make(1)
    data = [_inputs(a) for _ in range(3)]
    before = {k: v.clone() for k, v in b.state_dict().items()}
    aligned, maps = METHODS[method](a, b, data)
    assert any(not torch.equal(m, torch.arange(len(m))) for m in maps)  # it did permute something
    x = _inputs(a)
    torch.testing.assert_close(aligned(x), b(x), rtol=0, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in b.state_dict().items())  # B untouched


def test_weight_matching_improves_the_objective_monotonically():
    a, b = _bn_mlp(0), _bn_mlp(1)
    _, perms, history = align_weights(a, b, return_objective=True)
    identity = sum((pa * pb).sum() for pa, pb in zip(a.parameters(), b.parameters())).item()
    assert history[0] >= identity
    assert all(h2 >= h1 - 1e-9 for h1, h2 in zip(history, history[1:]))


def test_margin_classifier_with_bn_backbone_and_head():
    torch.manual_seed(0)
    a = _trained_stats(MarginClassifier(num_classes=4, input_shape=(1, 6, 6), backbone="mlp",
                                        backbone_kwargs={"width": 9, "depth": 2}), (1, 6, 6))
    b = _trained_stats(MarginClassifier(num_classes=4, input_shape=(1, 6, 6), backbone="mlp",
                                        backbone_kwargs={"width": 9, "depth": 2}), (1, 6, 6))
    layers = hidden_layers(a)
    assert [layer.norms for layer in layers] == [["backbone.2"], ["backbone.5", "head.bn"]]
    x = torch.randn(10, 1, 6, 6)
    for method in ("weights", "ot"):
        torch.testing.assert_close(align(a, b, method)(x), b(x), rtol=0, atol=1e-5)


def test_sinkhorn_soft_maps_and_unequal_widths():
    a = _bn_mlp(0)
    perms = [torch.randperm(layer.size) for layer in hidden_layers(a)]
    b = permute_hidden_units(a, perms)
    soft, maps = align_ot(a, b, method="sinkhorn", reg=1e-3)
    assert maps[0].dtype == torch.float64 and maps[0].shape == (10, 10)
    torch.testing.assert_close(maps[0].sum(0), torch.ones(10, dtype=torch.float64), rtol=0, atol=1e-6)
    x = torch.randn(20, 12)
    torch.testing.assert_close(soft(x), a(x), rtol=0, atol=1e-3)  # near-permutation: ≈ the same net
    torch.manual_seed(1)  # a wider B (no BN) is mapped onto A's widths
    a2 = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 4))
    b2 = nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 4))
    fused, maps2 = align_ot(a2, b2, method="sinkhorn", reg=0.05)
    assert maps2[0].shape == (9, 6) and fused[0].weight.shape == (6, 12) and fused[2].weight.shape == (4, 6)


def test_residual_blocks_and_bad_input_are_refused(monkeypatch):
    resnet = MarginClassifier(num_classes=3, input_shape=(1, 8, 8), backbone="resnet20", backbone_kwargs={"width": 4})
    with pytest.raises(ConfigError, match="alignment.model: .*residual"):
        hidden_layers(resnet)
    a = _bn_mlp(0)
    with pytest.raises(ConfigError, match="alignment.method: 'sort'"):
        align(a, a, "sort")
    with pytest.raises(ConfigError, match="alignment.model_b"):
        align_weights(a, nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4)))
    with pytest.raises(ConfigError, match="alignment.maps"):
        permute_hidden_units(a, [torch.zeros(10, dtype=torch.long), torch.arange(8)])
    monkeypatch.setitem(sys.modules, "ot", None)  # POT not installed
    with pytest.raises(ImportError, match=r"marginboost\[studies\]"):
        align_ot(a, a)
