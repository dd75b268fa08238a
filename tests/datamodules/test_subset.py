"""SubsetDataModule: a seeded training subset with an exact share of wrong labels."""
import pytest
import torch

from datamodules import DigitsDataModule, Split, SubsetDataModule, noisy_subset
from marginboost.errors import ConfigError


def test_noisy_subset_has_exactly_the_asked_share_of_wrong_labels():
    split = Split(torch.arange(100).float()[:, None], torch.arange(100) % 10)
    out = noisy_subset(split, 10, num_train=40, label_noise=0.25, seed=3)
    kept = out.x[:, 0].long()
    assert len(out) == 40 and torch.equal(kept, kept.sort().values)  # original order
    true = split.y[kept]
    assert int((out.y != true).sum()) == 10 and out.y.min() >= 0 and out.y.max() <= 9
    again = noisy_subset(split, 10, num_train=40, label_noise=0.25, seed=3)
    assert torch.equal(again.y, out.y) and torch.equal(again.x, out.x)
    clean = noisy_subset(split, 10, num_train=None, label_noise=0.0)
    assert torch.equal(clean.y, split.y)


def test_subset_datamodule_wraps_digits_and_checks_arguments():
    dm = SubsetDataModule(DigitsDataModule(batch_size=32), num_train=300, label_noise=0.1, seed=0)
    dm.setup()
    base = DigitsDataModule()
    base.setup()
    assert dm.num_train == 300 and dm.num_classes == 10 and dm.input_shape == (1, 8, 8)
    assert torch.equal(dm.mean, base.mean) and dm.batch_size == 32
    assert len(dm._ensure_loaded()[2]) == len(base._ensure_loaded()[2])  # test set untouched
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x", "y", "idx", "gap"}
    with pytest.raises(ConfigError, match="data.label_noise: 1.0"):
        SubsetDataModule(DigitsDataModule(), label_noise=1.0)
    with pytest.raises(ConfigError, match="data.num_train: 0"):
        SubsetDataModule(DigitsDataModule(), num_train=0)
