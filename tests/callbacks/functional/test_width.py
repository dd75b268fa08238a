"""gradient_norm_width against a hand computation, and its invariance to rescaled weights."""
import copy

import pytest
import torch
from torch import nn

from callbacks import (
    gradient_norm_width,
)
from tests.helpers import image_batches


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, bias=True), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Conv2d(3, 4, 1, bias=False), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16, 3))


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
    net, batches = _conv_net(), image_batches()
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
