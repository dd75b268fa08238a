import pickle

import lightning as L
import numpy as np
import pytest
import torch

from datamodules import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    MNISTDataModule,
    Toy2DDataModule,
)
from models import MarginClassifier


def test_digits_batches_carry_index_and_gap():
    dm = DigitsDataModule(batch_size=16)
    assert dm.num_train == 1438 and dm.num_classes == 10
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x", "y", "idx", "gap"}
    assert batch["x"].shape == (16, 1, 8, 8) and batch["x"].dtype == torch.float32
    assert torch.equal(batch["gap"], torch.zeros(16))
    assert torch.equal(batch["y"], dm.train_targets[batch["idx"]])


def test_train_eval_loader_is_ordered_unaugmented_and_complete():
    dm = DigitsDataModule(eval_batch_size=100)
    dm.set_gaps(torch.arange(dm.num_train, dtype=torch.float32))
    batches = list(dm.train_eval_dataloader())
    idx = torch.cat([b["idx"] for b in batches])
    assert torch.equal(idx, torch.arange(dm.num_train))
    assert torch.equal(torch.cat([b["gap"] for b in batches]), torch.arange(dm.num_train, dtype=torch.float32))
    again = torch.cat([b["x"] for b in dm.train_eval_dataloader()])
    assert torch.equal(torch.cat([b["x"] for b in batches]), again)  # no random augmentation
    x0 = dm._ensure_loaded()[0].x[:3].float() / 255
    torch.testing.assert_close(again[:3], (x0 - dm.mean) / dm.std)


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(10), r"shape \[num_train\]=\[1438\]"),
    (torch.full((1438,), float("nan")), "finite"),
    (torch.zeros(1438, dtype=torch.bool), "real numbers"),
    (torch.zeros(1438, 2), "shape"),
])
def test_set_gaps_validation(bad, match):
    dm = DigitsDataModule()
    with pytest.raises((ValueError, TypeError), match=match):
        dm.set_gaps(bad)
    assert torch.equal(dm.gaps, torch.zeros(1438))  # a rejected call changes nothing


def test_set_gaps_accepts_ints_and_returns_copies():
    dm = Toy2DDataModule(num_train=8, num_val=4)
    dm.set_gaps(list(range(8)))
    g = dm.gaps
    g += 100
    assert torch.equal(dm.gaps, torch.arange(8, dtype=torch.float32))


class _RecordGaps(L.Callback):
    """Records (idx, gap) of every training batch; sets new gaps after the first epoch."""

    def __init__(self, dm, new_gaps):
        self.dm, self.new_gaps, self.seen = dm, new_gaps, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.setdefault(trainer.current_epoch, []).append((batch["idx"].clone(), batch["gap"].clone()))

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            self.dm.set_gaps(self.new_gaps)


def _fit(dm, callback, epochs):
    model = MarginClassifier(num_classes=2, input_shape=(2,), backbone="mlp", backbone_kwargs={"width": 8})
    L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu", limit_val_batches=0,
              callbacks=[callback]).fit(model, dm)


@pytest.mark.parametrize("workers", [0, 2])
def test_gaps_reach_batches_between_epochs_and_fits(workers):
    dm = Toy2DDataModule(num_train=96, num_val=8, batch_size=32, num_workers=workers,
                         persistent_workers=workers > 0)
    first = torch.linspace(-1, 1, 96)
    second = torch.arange(96, dtype=torch.float32) * 10
    dm.set_gaps(first)
    rec = _RecordGaps(dm, second)
    _fit(dm, rec, epochs=2)
    for epoch, expected in ((0, first), (1, second)):
        idx = torch.cat([i for i, _ in rec.seen[epoch]])
        gap = torch.cat([g for _, g in rec.seen[epoch]])
        assert sorted(idx.tolist()) == list(range(96))
        assert torch.equal(gap, expected[idx])
    third = -torch.arange(96, dtype=torch.float32)
    dm.set_gaps(third)  # between fits: the next fit sees it
    rec2 = _RecordGaps(dm, third)
    _fit(dm, rec2, epochs=1)
    idx = torch.cat([i for i, _ in rec2.seen[0]])
    assert torch.equal(torch.cat([g for _, g in rec2.seen[0]]), third[idx])


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
    with pytest.raises(FileNotFoundError, match=r"data\.data_dir.*data\.download=true"):
        cls(data_dir=str(tmp_path / "nowhere"), download=False)


def test_download_is_delegated_to_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    calls = []
    monkeypatch.setattr(tvd, "CIFAR10", lambda root, train, download: calls.append((root, train, download)))
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=True)
    dm.prepare_data()
    assert calls == [(str(tmp_path), True, True)]


@pytest.mark.parametrize("kwargs,match", [({"batch_size": 0}, "data.batch_size"),
                                          ({"num_workers": 0, "persistent_workers": True}, "persistent_workers"),
                                          ({"val_fraction": 1.5}, "data.val_fraction")])
def test_bad_datamodule_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_toy_kinds_and_errors():
    for kind in ("moons", "circles", "spirals"):
        dm = Toy2DDataModule(kind=kind, num_train=50, num_val=10)
        assert dm.num_train == 50 and set(dm.train_targets.unique().tolist()) == {0, 1}
    with pytest.raises(ValueError, match="data.kind"):
        Toy2DDataModule(kind="blobs")
