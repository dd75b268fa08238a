"""Backbones: feature shapes, import paths, unknown names."""
import math

import pytest
import torch
from torch import nn

from models import build_backbone


class _TinyNet(nn.Module):
    def __init__(self, input_shape, hidden=5):
        super().__init__()
        self.fc = nn.Linear(math.prod(input_shape), hidden)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("name,shape,dim", [("resnet18", (3, 16, 16), 64), ("resnet20", (3, 16, 16), 32),
                                            ("small_cnn", (1, 8, 8), 64), ("mlp", (2,), 16)])
def test_backbones_give_features(name, shape, dim):
    net = build_backbone(name, shape, width=dim // {"resnet18": 8, "resnet20": 4, "small_cnn": 4, "mlp": 1}[name])
    assert net.out_features == dim
    assert net(torch.randn(3, *shape)).shape == (3, dim)


def test_backbone_by_class_path_and_unknown_name():
    net = build_backbone("tests.models.test_backbones._TinyNet", (1, 4, 4), hidden=7)
    assert net.out_features == 7
    with pytest.raises(ValueError, match=r"model.backbone.*'resnet19'.*resnet18"):
        build_backbone("resnet19", (3, 32, 32))
    with pytest.raises(ValueError, match=r"model\.backbone: .resnet18.; allowed: .*images \[C, H, W\]"):
        build_backbone("resnet18", (2,))


def test_mlp_dropout_only_adds_modules_when_positive():
    import pytest
    from torch import nn

    from marginboost.errors import ConfigError
    from models import build_backbone

    plain = build_backbone("mlp", (4,), width=8, depth=2)
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    drop = build_backbone("mlp", (4,), width=8, depth=2, dropout=0.5)
    assert [m.p for m in drop.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.5]
    with pytest.raises(ConfigError, match="model.backbone_kwargs.dropout: 1.5"):
        build_backbone("mlp", (4,), dropout=1.5)


def test_image_backbone_on_flat_inputs_and_unknown_kwargs_are_one_line_errors():
    from marginboost.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^model.backbone: 'small_cnn'; allowed: .*\(2,\): mlp or relu_mlp"):
        build_backbone("small_cnn", (2,))
    with pytest.raises(ConfigError, match=r"^model.backbone_kwargs: \{'width': 8, 'depth': 2\}; allowed: "
                                          r"arguments of backbone 'small_cnn': \['width'\] \(not \['depth'\]\)$"):
        build_backbone("small_cnn", (1, 8, 8), width=8, depth=2)
    assert build_backbone("mlp", (2,), width=8, depth=2).out_features == 8  # accepted kwargs pass
