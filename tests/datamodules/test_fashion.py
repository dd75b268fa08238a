import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import FashionMNISTDataModule, read_idx
from datamodules.fashion import DEBIAN_DIR, FASHION_MNIST_FILES
from marginboost.errors import ConfigError


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = np.array([0x0800 | arr.ndim, *arr.shape], dtype=">i4").tobytes()
    return header + arr.astype(np.uint8).tobytes()


def _write_fashion(folder: Path, n_train=12, n_test=5, gz=True, seed=0):
    """Small files in the real IDX format; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
    for name, arr in arrays.items():
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as fh:
                fh.write(_idx_bytes(arr))
        else:
            (folder / name).write_bytes(_idx_bytes(arr))
    return arrays


@pytest.fixture
def no_debian(tmp_path, monkeypatch):
    monkeypatch.setattr(FashionMNISTDataModule, "debian_dir", str(tmp_path / "no-debian"))


def test_finds_gzipped_files_of_the_debian_package(tmp_path, monkeypatch):
    arrays = _write_fashion(tmp_path / "debian", gz=True)
    monkeypatch.setattr(FashionMNISTDataModule, "debian_dir", str(tmp_path / "debian"))
    dm = FashionMNISTDataModule(download=False)
    train, val, test = dm._ensure_loaded()
    assert dm.data_dir == tmp_path / "debian" and dm.num_train == 12
    assert train.x.dtype == torch.uint8 and train.x.shape == (12, 1, 28, 28)
    assert torch.equal(train.x[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.uint8)))
    assert train.y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert val.y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist() and test is val


def test_torchvision_layout_matches_torchvisions_reader(tmp_path, no_debian):
    from torchvision.datasets import FashionMNIST

    _write_fashion(tmp_path / "FashionMNIST" / "raw", gz=False, seed=1)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), download=False)
    train, val, _ = dm._ensure_loaded()
    for split, is_train in ((train, True), (val, False)):
        ref = FashionMNIST(str(tmp_path), train=is_train, download=False)
        assert torch.equal(split.x[:, 0], ref.data) and torch.equal(split.y, ref.targets)


def test_explicit_data_dir_wins_over_the_debian_package(tmp_path, monkeypatch):
    _write_fashion(tmp_path / "debian", n_train=12)
    _write_fashion(tmp_path / "mine", n_train=7)
    monkeypatch.setattr(FashionMNISTDataModule, "debian_dir", str(tmp_path / "debian"))
    assert FashionMNISTDataModule(data_dir=str(tmp_path / "mine"), download=False).num_train == 7


def test_missing_configured_location_is_one_config_error_line(tmp_path, no_debian):
    with pytest.raises(ConfigError) as err:
        FashionMNISTDataModule(data_dir=str(tmp_path / "nowhere"), download=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"data.data_dir: '{tmp_path / 'nowhere'}'; allowed:")
    assert "data.download=true" in message and "dataset-fashion-mnist" in message
    with pytest.raises(ConfigError, match=r"^data\.data_dir: None; allowed"):
        FashionMNISTDataModule(download=False)  # no Debian files, nothing under data/
    with pytest.raises(ConfigError, match=r"^data\.download: 'yes'"):
        FashionMNISTDataModule(data_dir=str(tmp_path), download="yes")


def test_download_goes_to_torchvision_only_when_files_are_missing(tmp_path, monkeypatch, no_debian):
    import torchvision.datasets as tvd

    calls = []
    monkeypatch.setattr(tvd, "FashionMNIST", lambda root, train, download: calls.append((root, train, download)))
    FashionMNISTDataModule(data_dir=str(tmp_path / "dl"), download=True).prepare_data()
    assert calls == [(str(tmp_path / "dl"), True, True)]
    _write_fashion(tmp_path / "dl" / "FashionMNIST" / "raw")
    FashionMNISTDataModule(data_dir=str(tmp_path / "dl"), download=True).prepare_data()
    assert len(calls) == 1


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0]))  # float data
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(_idx_bytes(np.zeros((4, 2, 2)))[:-3])
    with pytest.raises(ValueError, match=r"shape \(4, 2, 2\)"):
        read_idx(tmp_path / "short")


def _padded_windows(img: torch.Tensor, pad: int) -> list[torch.Tensor]:
    padded = torch.nn.functional.pad(img, (pad, pad, pad, pad))
    return [padded[..., i:i + 28, j:j + 28] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]


@pytest.mark.parametrize("device_resident", [False, True])
def test_batches_carry_idx_and_gap_and_crop_without_flip(tmp_path, no_debian, device_resident):
    _write_fashion(tmp_path, n_train=12, gz=True, seed=2)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), download=False, batch_size=12,
                                device_resident=device_resident)
    gaps = torch.arange(12, dtype=torch.float32) / 10
    dm.set_gaps(gaps)
    loader = dm.device_resident_loader("cpu") if device_resident else dm.train_dataloader()
    batch = next(iter(loader))
    assert sorted(batch["idx"].tolist()) == list(range(12))
    assert torch.equal(batch["gap"], gaps[batch["idx"]]) and torch.equal(batch["y"], dm.train_targets[batch["idx"]])
    train = dm._ensure_loaded()[0]
    pixels = torch.round((batch["x"] * dm.std + dm.mean) * 255)  # undo the normalisation
    for k, i in enumerate(batch["idx"].tolist()):
        windows = _padded_windows(train.x[i].float(), pad=2)
        assert any(torch.equal(pixels[k], w) for w in windows)  # a crop of the zero-padded image
        assert not any(torch.equal(pixels[k], w.flip(-1)) for w in windows if not torch.equal(w, w.flip(-1)))
    ordered = next(iter(dm.train_eval_dataloader()))  # measurements: ordered, un-augmented
    assert ordered["idx"].tolist() == list(range(12))
    torch.testing.assert_close(ordered["x"], (train.x.float() / 255 - 0.2860) / 0.3530)


@pytest.mark.slow
@pytest.mark.skipif(not Path(DEBIAN_DIR, FASHION_MNIST_FILES[0] + ".gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_debian_files():
    dm = FashionMNISTDataModule(data_dir=None, download=False)
    train, val, _ = dm._ensure_loaded()
    assert dm.data_dir == Path(DEBIAN_DIR)
    assert train.x.shape == (60000, 1, 28, 28) and val.x.shape == (10000, 1, 28, 28)
    assert train.y.bincount().tolist() == [6000] * 10 and val.y.bincount().tolist() == [1000] * 10
    assert train.y[:3].tolist() == [9, 0, 0]  # ankle boot, T-shirt, T-shirt: the published order
    pixels = train.x.float() / 255  # the normalisation constants are the training set's statistics
    assert abs(pixels.mean().item() - 0.2860) < 5e-4 and abs(pixels.std().item() - 0.3530) < 5e-4
