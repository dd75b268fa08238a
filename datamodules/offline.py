"""Data sets that ship with an installed package: no download, for demos and tests."""

from __future__ import annotations

import numpy as np
import torch

from marginboost.errors import ConfigError, check_choice, check_int, check_number

from .base import GapDataModule
from .split import Split

TOY_KINDS = ("moons", "circles", "spirals")


def _stratified_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        n_val = int(round(val_fraction * len(members)))
        val_idx.append(members[:n_val])
        train_idx.append(members[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


class DigitsDataModule(GapDataModule):
    """scikit-learn's 8×8 handwritten digits (1797 images, 10 classes), embedded offline default.

    Pixels (0..16) are stored as uint8 on a 0..255 scale; a fixed stratified split gives the
    training and validation sets (the test set is the validation set). Augmentation: random
    1-pixel translation (no flip: a mirrored digit is another symbol).

    Args:
        val_fraction: share of each class held out for validation.
        split_seed: seed of the split (fixed, independent of the training seed).
    """

    num_classes = 10
    input_shape = (1, 8, 8)
    pad = 1
    flip = False

    def __init__(self, val_fraction: float = 0.2, split_seed: int = 0, batch_size: int = 64,
                 eval_batch_size: int = 512, num_workers: int = 0, persistent_workers: bool = False,
                 pin_memory: bool = False, augment: bool = True, device_resident: bool = False) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, persistent_workers, pin_memory, augment,
                         device_resident)
        check_number("data.val_fraction", val_fraction, low=0.0, high=1.0, low_open=True)
        if val_fraction == 1.0:
            raise ConfigError("data.val_fraction", val_fraction, "a number in (0, 1)")
        self.val_fraction, self.split_seed = val_fraction, split_seed

    def load(self) -> tuple[Split, Split, Split]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
        tr, va = _stratified_split(digits.target, self.val_fraction, self.split_seed)
        x, y = torch.from_numpy(images), torch.from_numpy(digits.target).long()
        train = Split(x[tr].contiguous(), y[tr].contiguous())
        pixels = train.x.float() / 255.0
        self.mean, self.std = pixels.mean().reshape(1), pixels.std().reshape(1)
        val = Split(x[va].contiguous(), y[va].contiguous())
        return train, val, val


def _spirals(n: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 2, n)
    t = np.sqrt(rng.uniform(0.0, 1.0, n)) * 3.0 * np.pi
    r = t / (3.0 * np.pi)
    angle = t + np.pi * y
    x = np.stack([r * np.cos(angle), r * np.sin(angle)], 1) + noise * 0.1 * rng.standard_normal((n, 2))
    return x, y


class Toy2DDataModule(GapDataModule):
    """Two-dimensional two-class sets for visual demos: ``moons``, ``circles`` or ``spirals``.

    Args:
        kind: which set.
        num_train / num_val: objects in each split (the test split is the validation split).
        noise: label-independent noise level.
        seed: seed of the generator (fixed data, independent of the training seed).
    """

    num_classes = 2
    input_shape = (2,)

    def __init__(self, kind: str = "moons", num_train: int = 512, num_val: int = 512, noise: float = 0.2,
                 seed: int = 0, batch_size: int = 64, eval_batch_size: int = 1024, num_workers: int = 0,
                 persistent_workers: bool = False, pin_memory: bool = False, device_resident: bool = False) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, persistent_workers, pin_memory, augment=False,
                         device_resident=device_resident)
        check_choice("data.kind", kind, TOY_KINDS)
        for name, value in (("num_train", num_train), ("num_val", num_val)):
            check_int(f"data.{name}", value, low=2)
        check_number("data.noise", noise, low=0.0)
        self.kind, self.n_train, self.n_val, self.noise, self.seed = kind, num_train, num_val, noise, seed

    def load(self) -> tuple[Split, Split, Split]:
        from sklearn import datasets

        n = self.n_train + self.n_val
        if self.kind == "moons":
            x, y = datasets.make_moons(n, noise=self.noise, random_state=self.seed)
        elif self.kind == "circles":
            x, y = datasets.make_circles(n, noise=self.noise * 0.5, factor=0.5, random_state=self.seed)
        else:
            x, y = _spirals(n, self.noise, np.random.default_rng(self.seed))
        x = (x - x[: self.n_train].mean(0)) / x[: self.n_train].std(0)
        x, y = torch.from_numpy(x).float(), torch.from_numpy(y).long()
        train = Split(x[: self.n_train].contiguous(), y[: self.n_train].contiguous())
        val = Split(x[self.n_train:].contiguous(), y[self.n_train:].contiguous())
        return train, val, val
