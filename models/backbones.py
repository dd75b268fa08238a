"""Feature extractors ("backbones") and the registry that names them.

A backbone maps an input batch to features ``[N, D]`` and exposes ``out_features = D``.
Register a new one with :func:`register_backbone`, or pass the import path of an
``nn.Module`` class (``"my_pkg.nets.MyNet"``) wherever a backbone name is accepted.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn

from marginboost.errors import ConfigError, check_number

BackboneBuilder = Callable[..., nn.Module]
_REGISTRY: dict[str, BackboneBuilder] = {}


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator: ``@register_backbone("mynet")`` on ``def build(input_shape, **kwargs)``."""

    def wrap(builder: BackboneBuilder) -> BackboneBuilder:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return wrap


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def build_backbone(name: str, input_shape: Sequence[int], **kwargs) -> nn.Module:
    """Build a registered backbone by name, or an ``nn.Module`` class given by import path.

    A class given by path is called as ``cls(input_shape=..., **kwargs)`` if it accepts
    ``input_shape``, else ``cls(**kwargs)``. ``out_features`` is inferred by a dry forward
    pass when the module does not define it.
    """
    if name in _REGISTRY:
        _check_kwargs(name, _REGISTRY[name], kwargs)
        net = _REGISTRY[name](tuple(input_shape), **kwargs)
    elif "." in name:
        module_name, _, cls_name = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError) as err:
            raise ConfigError("model.backbone", name, f"a registered backbone {available_backbones()} or the "
                              f"import path of an nn.Module class (import failed: {err})") from err
        try:
            net = cls(input_shape=tuple(input_shape), **kwargs)
        except TypeError:
            net = cls(**kwargs)
    else:
        raise ConfigError("model.backbone", name, f"a registered backbone {available_backbones()} or the "
                          "import path of an nn.Module class")
    if not hasattr(net, "out_features"):
        was_training = net.training
        net.eval()
        with torch.no_grad():
            out = net(torch.zeros(2, *input_shape))
        net.train(was_training)
        if out.ndim != 2:
            raise ConfigError("model.backbone", name, f"a module returning features [N, D] (it returned "
                              f"{tuple(out.shape)})")
        net.out_features = out.shape[1]
    return net


def _check_kwargs(name: str, builder: BackboneBuilder, kwargs: dict) -> None:
    """``backbone_kwargs`` the builder does not take: one error line, not a TypeError traceback."""
    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = list(params)[1:]  # the first parameter is the input shape, passed positionally
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError("model.backbone_kwargs", dict(kwargs),
                          f"arguments of backbone {name!r}: {allowed} (not {unknown})")


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; a 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images: 3x3 stem, no max-pool, global average pool to features."""

    def __init__(self, in_channels: int, blocks: Sequence[int], widths: Sequence[int]) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers, cin = [], widths[0]
        for stage, (n, w) in enumerate(zip(blocks, widths)):
            for b in range(n):
                layers.append(BasicBlock(cin, w, 2 if (stage > 0 and b == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layers(self.stem(x))).flatten(1)


def _channels(input_shape: Sequence[int], name: str) -> int:
    if len(input_shape) != 3:
        raise ConfigError("model.backbone", name, f"a backbone for inputs of shape {tuple(input_shape)}: "
                          "mlp or relu_mlp (this one needs images [C, H, W])")
    return input_shape[0]


@register_backbone("resnet18")
def resnet18(input_shape: Sequence[int], width: int = 64) -> nn.Module:
    """CIFAR-style ResNet-18: [2, 2, 2, 2] basic blocks, widths w, 2w, 4w, 8w."""
    return CifarResNet(_channels(input_shape, "resnet18"), [2, 2, 2, 2], [width, 2 * width, 4 * width, 8 * width])


@register_backbone("resnet20")
def resnet20(input_shape: Sequence[int], width: int = 16) -> nn.Module:
    """CIFAR ResNet-20 (He et al.): [3, 3, 3] basic blocks, widths w, 2w, 4w."""
    return CifarResNet(_channels(input_shape, "resnet20"), [3, 3, 3], [width, 2 * width, 4 * width])


@register_backbone("small_cnn")
def small_cnn(input_shape: Sequence[int], width: int = 32) -> nn.Module:
    """Three conv-BN-ReLU blocks (w, 2w, 4w channels), the middle one strided, global pool."""
    c = _channels(input_shape, "small_cnn")

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    net = nn.Sequential(
        *block(c, width, 1), *block(width, 2 * width, 2), *block(2 * width, 4 * width, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    net.out_features = 4 * width
    return net


@register_backbone("mlp")
def mlp(input_shape: Sequence[int], width: int = 256, depth: int = 2, dropout: float = 0.0) -> nn.Module:
    """Flatten, then ``depth`` Linear-BN-ReLU layers of ``width`` units (each followed by
    ``Dropout(dropout)`` when ``dropout > 0``)."""
    check_number("model.backbone_kwargs.dropout", dropout, low=0.0, high=0.99)
    layers: list[nn.Module] = [nn.Flatten()]
    cin = 1
    for s in input_shape:
        cin *= s
    for _ in range(depth):
        layers += [nn.Linear(cin, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
        if dropout > 0:  # only then: dropout-free nets keep their module indices and state_dict keys
            layers.append(nn.Dropout(dropout))
        cin = width
    net = nn.Sequential(*layers)
    net.out_features = cin
    return net


@register_backbone("relu_mlp")
def relu_mlp(input_shape: Sequence[int], width: int = 100, depth: int = 1) -> nn.Module:
    """Flatten, then ``depth`` Linear(with bias)-ReLU layers of ``width`` units; no BatchNorm.

    With a linear output layer on top this is the classic ``784→100→10`` MLP. It has no buffers,
    so every one of its weights can be made variational (see ``models.VariationalNet``).
    """
    layers: list[nn.Module] = [nn.Flatten()]
    cin = 1
    for s in input_shape:
        cin *= s
    for _ in range(depth):
        layers += [nn.Linear(cin, width), nn.ReLU()]
        cin = width
    net = nn.Sequential(*layers)
    net.out_features = cin
    return net
