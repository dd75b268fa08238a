"""``SubsetDataModule``: another data module's training set, subsampled and with label noise.

Used by the model zoo (label-noise fraction as a hyperparameter) and by studies that need a
CPU-sized slice of a large training set. Validation and test splits are passed through unchanged,
so test accuracy is always on the original labels.
"""

from __future__ import annotations

import numpy as np
import torch

from marginboost.errors import ConfigError, check_int, check_number

from .base import GapDataModule
from .split import Split


def noisy_subset(split: Split, num_classes: int, num_train: int | None = None, label_noise: float = 0.0,
                 seed: int = 0) -> Split:
    """A seeded random subset of ``num_train`` objects, ``round(label_noise · n)`` of them relabelled.

    The relabelled objects get a label drawn uniformly from the *other* ``K - 1`` classes, so
    exactly that share of the labels is wrong. The subset keeps the original order of the objects.

    Example:
        >>> s = Split(torch.zeros(10, 1), torch.arange(10) % 2)
        >>> out = noisy_subset(s, 2, num_train=6, label_noise=0.5, seed=0)
        >>> len(out), int((out.y != (torch.arange(10) % 2)[noisy_subset_indices(10, 6, 0)]).sum())
        (6, 3)
    """
    n = len(split)
    keep = noisy_subset_indices(n, num_train, seed)
    y = split.y[keep].clone()
    flips = int(round(label_noise * len(keep)))
    if flips:
        rng = np.random.default_rng(seed + 1)
        chosen = torch.from_numpy(np.sort(rng.choice(len(keep), flips, replace=False)))
        shift = torch.from_numpy(rng.integers(1, num_classes, flips))
        y[chosen] = (y[chosen] + shift) % num_classes
    return Split(split.x[keep].contiguous(), y.contiguous())


def noisy_subset_indices(n: int, num_train: int | None, seed: int) -> torch.Tensor:
    """The sorted indices of the subset :func:`noisy_subset` keeps (all ``n`` when ``num_train`` is None)."""
    if num_train is None or num_train >= n:
        return torch.arange(n)
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.sort(rng.choice(n, num_train, replace=False)))


class SubsetDataModule(GapDataModule):
    """Wraps a :class:`GapDataModule`: a seeded subset of its training set, with label noise.

    Batch sizes, augmentation and workers are the wrapped module's. ``num_classes``,
    ``input_shape``, normalisation and crop/flip settings are copied from it.

    Args:
        base: the data module to wrap (a ``class_path``/``init_args`` block in YAML).
        num_train: training objects to keep (``null``: all).
        label_noise: share in ``[0, 1)`` of the kept training labels replaced by a wrong class.
        seed: seed of the subset and of the relabelling (fixed data, independent of the training seed).

    Example (YAML)::

        data:
          class_path: datamodules.SubsetDataModule
          init_args:
            base: {class_path: datamodules.FashionMNISTDataModule, init_args: {batch_size: 128}}
            num_train: 10000
    """

    def __init__(self, base: GapDataModule, num_train: int | None = None, label_noise: float = 0.0,
                 seed: int = 0) -> None:
        if not isinstance(base, GapDataModule):
            raise ConfigError("data.base", type(base).__name__, "a datamodules.GapDataModule")
        super().__init__(base.batch_size, base.eval_batch_size, base.num_workers, base.persistent_workers,
                         base.pin_memory, base.augment, base.device_resident)
        if num_train is not None:
            check_int("data.num_train", num_train, low=1)
        check_number("data.label_noise", label_noise, low=0.0, high=1.0)
        if label_noise == 1.0:
            raise ConfigError("data.label_noise", label_noise, "a number in [0, 1)")
        self.base, self.subset_size, self.label_noise, self.seed = base, num_train, float(label_noise), seed
        self.num_classes, self.input_shape = base.num_classes, tuple(base.input_shape)
        self.pad, self.flip = base.pad, base.flip

    def prepare_data(self) -> None:
        self.base.prepare_data()

    def load(self) -> tuple[Split, Split, Split]:
        train, val, test = self.base.load()
        self.mean, self.std = self.base.mean, self.base.std  # some modules set them in load()
        return noisy_subset(train, self.num_classes, self.subset_size, self.label_noise, self.seed), val, test
