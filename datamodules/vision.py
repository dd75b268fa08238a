"""CIFAR-10, CIFAR-100 and MNIST: torchvision downloads, tensors read from the on-disk formats."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from marginboost.errors import ConfigError, check_bool

from .base import GapDataModule
from .split import Split

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


class _DownloadableDataModule(GapDataModule):
    """Shared handling of ``data_dir`` and ``download`` for the torchvision data sets."""

    def __init__(self, data_dir: str, download: bool, **loader_kwargs) -> None:
        super().__init__(**loader_kwargs)
        self.data_dir, self.download = Path(data_dir).expanduser(), download
        check_bool("data.download", download)
        if not download and not self.files_present():
            raise ConfigError("data.data_dir", str(self.data_dir),
                              f"a folder holding the {type(self).__name__.removesuffix('DataModule')} files "
                              f"{self.required_files()}, or data.download=true")

    def required_files(self) -> list[str]:
        raise NotImplementedError

    def files_present(self) -> bool:
        return all((self.data_dir / f).is_file() for f in self.required_files())

    torchvision_name: str  # the torchvision.datasets class that downloads this data set

    def torchvision_download(self) -> None:
        import torchvision.datasets

        getattr(torchvision.datasets, self.torchvision_name)(str(self.data_dir), train=True, download=True)

    def prepare_data(self) -> None:
        # Called on one process per node by Lightning, before setup() on every process.
        if self.download and not self.files_present():
            self.torchvision_download()


class _CIFARDataModule(_DownloadableDataModule):
    folder: str
    train_files: list[str]
    test_files: list[str]
    label_key: bytes
    pad, flip = 4, True
    input_shape = (3, 32, 32)

    def __init__(self, data_dir: str = "data", download: bool = True, batch_size: int = 128,
                 eval_batch_size: int = 1000, num_workers: int = 0, persistent_workers: bool = False,
                 pin_memory: bool = False, augment: bool = True, device_resident: bool = False) -> None:
        super().__init__(data_dir, download, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, persistent_workers=persistent_workers,
                         pin_memory=pin_memory, augment=augment, device_resident=device_resident)

    def required_files(self) -> list[str]:
        return [f"{self.folder}/{f}" for f in self.train_files + self.test_files]

    def _read(self, files: list[str]) -> Split:
        xs, ys = [], []
        for name in files:
            with open(self.data_dir / self.folder / name, "rb") as fh:
                entry = pickle.load(fh, encoding="bytes")
            xs.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(entry[self.label_key], dtype=np.int64))
        return Split(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))

    def load(self) -> tuple[Split, Split, Split]:
        if not self.files_present():
            raise FileNotFoundError(f"data.data_dir: {self.required_files()} missing under {str(self.data_dir)!r}; "
                                    "run prepare_data() with data.download=true first")
        train, test = self._read(self.train_files), self._read(self.test_files)
        return train, test, test


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 (50k/10k, 32×32 RGB); standard random-crop (pad 4) + horizontal-flip augmentation.

    Downloads with torchvision on first use (``download=true``); the files are read from the
    original pickle format. The validation and test sets are the official test set.
    """

    num_classes = 10
    folder = "cifar-10-batches-py"
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    test_files = ["test_batch"]
    label_key = b"labels"
    torchvision_name = "CIFAR10"
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (fine labels), otherwise as :class:`CIFAR10DataModule`."""

    num_classes = 100
    folder = "cifar-100-python"
    train_files = ["train"]
    test_files = ["test"]
    label_key = b"fine_labels"
    torchvision_name = "CIFAR100"
    mean, std = torch.tensor(CIFAR100_MEAN), torch.tensor(CIFAR100_STD)


class MNISTDataModule(_DownloadableDataModule):
    """MNIST (60k/10k, 28×28 grey) via torchvision; augmentation: random crop with padding 2."""

    num_classes = 10
    input_shape = (1, 28, 28)
    pad, flip = 2, False
    torchvision_name = "MNIST"
    mean, std = torch.tensor([0.1307]), torch.tensor([0.3081])
    raw_files = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]

    def __init__(self, data_dir: str = "data", download: bool = True, batch_size: int = 128,
                 eval_batch_size: int = 1000, num_workers: int = 0, persistent_workers: bool = False,
                 pin_memory: bool = False, augment: bool = True, device_resident: bool = False) -> None:
        super().__init__(data_dir, download, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, persistent_workers=persistent_workers,
                         pin_memory=pin_memory, augment=augment, device_resident=device_resident)

    def required_files(self) -> list[str]:
        return [f"MNIST/raw/{f}" for f in self.raw_files]

    def load(self) -> tuple[Split, Split, Split]:
        from torchvision.datasets import MNIST

        splits = []
        for train in (True, False):
            ds = MNIST(str(self.data_dir), train=train, download=False)
            splits.append(Split(ds.data[:, None].contiguous(), ds.targets.long()))
        return splits[0], splits[1], splits[1]
