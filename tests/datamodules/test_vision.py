"""CIFAR-10/100 and MNIST read from files written in the real on-disk formats."""
import pickle

import numpy as np
import pytest
import torch

from datamodules import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    MNISTDataModule,
)
from marginboost import ConfigError


def _write_cifar(root, folder, files, label_key, n_per_file, num_classes, rng):
    (root / folder).mkdir(parents=True)
    written = {}
    for name in files:
        data = rng.integers(0, 256, (n_per_file, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, num_classes, n_per_file).tolist()
        with open(root / folder / name, "wb") as fh:
            pickle.dump({b"data": data, label_key: labels, b"batch_label": name.encode()}, fh)
        written[name] = (data, labels)
    return written


def test_cifar10_reads_real_pickle_format(tmp_path):
    rng = np.random.default_rng(0)
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = _write_cifar(tmp_path, "cifar-10-batches-py", files, b"labels", 4, 10, rng)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=False, batch_size=5, augment=False)
    assert dm.num_train == 20 and dm.input_shape == (3, 32, 32)
    train, val, _ = dm._ensure_loaded()
    assert torch.equal(train.x[4], torch.from_numpy(written["data_batch_2"][0][0].reshape(3, 32, 32)))
    assert train.y.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert val.y.tolist() == written["test_batch"][1]
    batch = next(iter(dm.train_eval_dataloader()))
    expected = (train.x[0].float() / 255 - dm.mean.view(3, 1, 1)) / dm.std.view(3, 1, 1)
    torch.testing.assert_close(batch["x"][0], expected)


def test_cifar100_fine_labels(tmp_path):
    written = _write_cifar(tmp_path, "cifar-100-python", ["train", "test"], b"fine_labels", 6, 100,
                           np.random.default_rng(1))
    dm = CIFAR100DataModule(data_dir=str(tmp_path), download=False)
    assert dm.num_classes == 100 and dm.train_targets.tolist() == written["train"][1]


def test_mnist_reads_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(2)

    def write(name, arr):
        magic = {1: 0x0801, 3: 0x0803}[arr.ndim]
        header = np.array([magic, *arr.shape], dtype=">i4").tobytes()
        (raw / name).write_bytes(header + arr.astype(np.uint8).tobytes())

    imgs, labels = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)
    write("train-images-idx3-ubyte", imgs)
    write("train-labels-idx1-ubyte", labels)
    write("t10k-images-idx3-ubyte", imgs[:3])
    write("t10k-labels-idx1-ubyte", labels[:3])
    dm = MNISTDataModule(data_dir=str(tmp_path), download=False)
    train, test, _ = dm._ensure_loaded()
    assert torch.equal(train.x[:, 0], torch.from_numpy(imgs.astype(np.uint8)))
    assert train.y.tolist() == labels.tolist() and len(test) == 3


@pytest.mark.parametrize("cls", [CIFAR10DataModule, CIFAR100DataModule, MNISTDataModule])
def test_missing_data_dir_without_download(tmp_path, cls):
    with pytest.raises(ConfigError, match=r"data\.data_dir.*data\.download=true"):
        cls(data_dir=str(tmp_path / "nowhere"), download=False)


def test_download_is_delegated_to_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    calls = []
    monkeypatch.setattr(tvd, "CIFAR10", lambda root, train, download: calls.append((root, train, download)))
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=True)
    dm.prepare_data()
    assert calls == [(str(tmp_path), True, True)]
