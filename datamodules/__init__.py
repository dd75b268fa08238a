"""LightningDataModules whose training samples carry their index and gap."""

from .augment import crop_flip, normalize, sample_crop_flip
from .base import GapDataModule, IndexedDataset, validate_gaps
from .device_resident import DeviceResidentLoader, ShardedPermutation
from .fashion import FashionMNISTDataModule, read_idx
from .offline import DigitsDataModule, Toy2DDataModule
from .split import Split
from .subset import SubsetDataModule, noisy_subset, noisy_subset_indices
from .vision import CIFAR10DataModule, CIFAR100DataModule, MNISTDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DeviceResidentLoader",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "GapDataModule",
    "IndexedDataset",
    "MNISTDataModule",
    "ShardedPermutation",
    "Split",
    "SubsetDataModule",
    "Toy2DDataModule",
    "crop_flip",
    "noisy_subset",
    "noisy_subset_indices",
    "normalize",
    "read_idx",
    "sample_crop_flip",
    "validate_gaps",
]
