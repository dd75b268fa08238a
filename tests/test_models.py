import math

import lightning as L
import pytest
import torch
from torch import nn

from datamodules import DigitsDataModule
from models import MarginClassifier, build_backbone, head_weight


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
    net = build_backbone("tests.test_models._TinyNet", (1, 4, 4), hidden=7)
    assert net.out_features == 7
    with pytest.raises(ValueError, match=r"model.backbone.*'resnet19'.*resnet18"):
        build_backbone("resnet19", (3, 32, 32))
    with pytest.raises(ValueError, match="image inputs"):
        build_backbone("resnet18", (2,))


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


def test_head_frozen_without_bn_affine_and_unchanged_by_training():
    model = MarginClassifier(num_classes=10, input_shape=(1, 8, 8), backbone="mlp", backbone_kwargs={"width": 16},
                             head_seed=0)
    assert model.head.bn.weight is None and model.head.bn.bias is None and not model.head.bn.affine
    assert not model.head.weight.requires_grad
    assert [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("head")] == []
    w0 = model.head.weight.detach().clone()
    b0 = [p.detach().clone() for p in model.backbone.parameters()]
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    assert torch.equal(model.head.weight, w0)
    assert model.head.weight.grad is None
    assert any(not torch.equal(a, b) for a, b in zip(b0, model.backbone.parameters()))


def test_unfrozen_head_trains_and_bound():
    model = MarginClassifier(num_classes=3, input_shape=(4,), backbone="mlp", freeze_head=False, head_init="kaiming")
    assert model.head.weight.requires_grad
    torch.testing.assert_close(model.theorem1_bound(), 2 / 3 * model.head.weight.detach().abs().sum())


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        MarginClassifier(num_classes=1)
    with pytest.raises(ValueError, match="scheduler_interval"):
        MarginClassifier(num_classes=3, input_shape=(2,), backbone="mlp", scheduler_interval="batch")


def test_loss_uses_batch_gap():
    model = MarginClassifier(num_classes=3, input_shape=(4,), backbone="mlp").eval()
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    gap = torch.linspace(0, 2, 5)
    loss, logits = model.loss_and_logits({"x": x, "y": y, "gap": gap})
    from models import discounted_cross_entropy

    torch.testing.assert_close(loss, discounted_cross_entropy(logits, y, gap))
    assert loss > model.loss_and_logits({"x": x, "y": y})[0]


def test_channels_last_needs_images_and_stays_traceable():
    from callbacks import scale_invariant_structure

    with pytest.raises(ValueError, match="model.channels_last"):
        MarginClassifier(num_classes=3, input_shape=(4,), backbone="mlp", channels_last=True)
    model = MarginClassifier(num_classes=3, input_shape=(1, 8, 8), backbone="small_cnn", channels_last=True)
    found = scale_invariant_structure(model)  # torch.fx trace, no example input needed
    assert found["backbone.0.weight"] == ["backbone.1"]
