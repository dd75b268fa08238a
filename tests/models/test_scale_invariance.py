"""Scale-invariance detection against the defining property L(c·w) = L(w), computed exactly."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from marginboost import ConfigError
from models import (
    MarginClassifier,
    SAMClassifier,
    build_backbone,
    scale_invariant_parameters,
    scale_invariant_structure,
    select_scale_invariant,
)
from models.scale_invariance import _hook_structure
from tests.helpers import image_batches


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


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, bias=True), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Conv2d(3, 4, 1, bias=False), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16, 3))


def test_detection_on_small_nets():
    net = _conv_net()
    # conv->BN yes; conv->ReLU->BN yes (ReLU is positively homogeneous); the last linear has no BN
    assert scale_invariant_structure(net) == {"0.weight": ["1"], "3.weight": ["5"]}
    batch = image_batches(1)[0]
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



class _PreAct(nn.Module):
    """A pre-activation residual block: BN -> ReLU -> conv, twice, added to the stem's output."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 1, bias=False)   # feeds bn1 and the add: not invariant
        self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)  # straight into bn2: invariant
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)  # into the add: not invariant
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        x0 = self.stem(x)
        h = self.conv1(F.relu(self.bn1(x0)))
        h = self.conv2(F.relu(self.bn2(h)))
        return self.head((x0 + h).mean((2, 3)))


def _nets():
    torch.manual_seed(0)
    return {
        "conv_bn_with_bias": nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 3)),
        "conv_relu_bn_no_bias": nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(3),
                                              nn.Flatten(), nn.Linear(12, 3)),
        "conv_relu_bn_with_bias": nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.BatchNorm2d(3),
                                                nn.Flatten(), nn.Linear(12, 3)),
        "conv_flatten_bn_with_bias": nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.BatchNorm1d(12),
                                                   nn.Linear(12, 3)),
        "residual": _Residual(),
        "preact": _PreAct(),
    }


def _invariant_by_definition(net, batch, c=3.7):
    """Names of the weights w with L(c·w) == L(w) (BN on batch statistics, float64; BN's eps set
    to 1e-12, since it is the one term that does not scale)."""
    net = copy.deepcopy(net).double().train()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = 1e-12
    x, y = batch["x"].double(), batch["y"]
    out = []
    for name, p in net.named_parameters():
        if not name.endswith("weight") or p.ndim < 2:
            continue
        with torch.no_grad():
            base = F.cross_entropy(net(x), y)
            p.mul_(c)
            scaled = F.cross_entropy(net(x), y)
            p.div_(c)
        if abs(float(scaled - base)) <= 1e-10 * max(1.0, abs(float(base))):
            out.append(name)
    return sorted(out)


@pytest.mark.parametrize("name", list(_nets()))
def test_detection_equals_the_defining_property(name):
    net = _nets()[name]
    batch = image_batches(1, size=32)[0]
    truth = _invariant_by_definition(net, batch)
    assert truth or name in ("residual", "conv_relu_bn_with_bias")  # the property can hold
    assert sorted(scale_invariant_structure(net)) == truth
    assert sorted(scale_invariant_parameters(net, "ce", batch)) == truth
    if isinstance(net, nn.Sequential):  # module-to-module flow: the hook fallback sees it all
        assert sorted(_hook_structure(net, batch["x"])) == truth


def test_riemannian_sam_and_the_width_use_the_same_definition():
    torch.manual_seed(0)
    kwargs = dict(num_classes=3, input_shape=(2, 6, 6), backbone="tests.models.test_scale_invariance._ReluBN",
                  head_seed=0)
    sam = SAMClassifier(riemannian=True, **kwargs)
    plain = MarginClassifier(**kwargs)
    expected = ["backbone.conv_a.weight"]  # conv(no bias) -> ReLU -> BN; conv_b has a bias before its ReLU
    assert sam.scale_invariant_names == expected
    assert sorted(scale_invariant_parameters(plain, None, {"x": torch.randn(8, 2, 6, 6),
                                                           "y": torch.randint(0, 3, (8,))})) == expected


class _ReluBN(nn.Module):
    def __init__(self, input_shape=(2, 6, 6)):
        super().__init__()
        self.conv_a = nn.Conv2d(input_shape[0], 4, 3, bias=False)
        self.conv_b = nn.Conv2d(4, 4, 3)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.out_features = 4

    def forward(self, x):
        h = self.bn_a(F.relu(self.conv_a(x)))
        h = self.bn_b(F.relu(self.conv_b(h)))
        return h.mean((2, 3))


def test_override_by_regex_with_the_bns_to_rescale():
    net = _nets()["conv_relu_bn_no_bias"]
    assert select_scale_invariant(net, [r"^0\."], "scale_invariant") == {"0.weight": ["2"]}
    # a named weight that reaches no BN is taken as given, with nothing to rescale alongside
    assert select_scale_invariant(net, ["4.weight"], "scale_invariant") == {"4.weight": []}
    with pytest.raises(ConfigError, match=r"scale_invariant: 'nothing'; allowed: regular expressions"):
        select_scale_invariant(net, ["nothing"], "scale_invariant")
