"""Fashion-MNIST: the four original IDX files, read offline from the Debian package when installed.

The Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``) installs
the gzipped IDX files in :data:`DEBIAN_DIR`; without it the files are looked for in torchvision's
layout under ``data_dir`` (``<data_dir>/FashionMNIST/raw/``) and downloaded with torchvision when
``download`` is true.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from marginboost.errors import ConfigError, check_bool

from .base import GapDataModule
from .split import Split

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an unsigned-byte IDX file (plain or gzipped) into a ``uint8`` array.

    The format (LeCun's MNIST page): a big-endian int32 magic ``0x0000 08 NN`` (``08``: unsigned
    byte data, ``NN``: number of dimensions), then ``NN`` big-endian int32 sizes, then the data in
    C order. Labels are ``[N]`` (magic ``0x801``), images ``[N, H, W]`` (magic ``0x803``).

    >>> import tempfile, os
    >>> f = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte")
    >>> _ = open(f, "wb").write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 0, 9]))
    >>> read_idx(f).tolist()
    [7, 0, 9]
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex() or 'missing'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(raw[4:header], dtype=">i4"))
    expected = int(np.prod(shape)) if shape else 0
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes), "
                         f"the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def find_idx_files(folder: str | Path) -> dict[str, Path] | None:
    """The four Fashion-MNIST files in ``folder`` (each plain or ``.gz``), or ``None`` if any is missing."""
    found = {}
    for name in FASHION_MNIST_FILES:
        for candidate in (Path(folder) / name, Path(folder) / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
        else:
            return None
    return found


class FashionMNISTDataModule(GapDataModule):
    """Fashion-MNIST (60k/10k, 28×28 grey, 10 classes); augmentation: random crop with padding 2.

    Where the files come from, first match wins:

    1. ``data_dir`` when it is set: the files directly in it (e.g. the Debian folder) or in
       torchvision's layout ``<data_dir>/FashionMNIST/raw/``; with ``download=true`` torchvision
       downloads them there, otherwise a missing folder is a :class:`~marginboost.errors.ConfigError`.
    2. ``data_dir: null`` (default): the Debian package's folder :data:`DEBIAN_DIR` when installed,
       else ``data/`` in torchvision's layout (downloaded there with ``download=true``).

    Files may be plain or gzipped IDX. No horizontal flip (garments are mostly left-right
    symmetric, but the standard recipe does not flip). The validation and test sets are the
    official test set. The training images are normalised with the usual Fashion-MNIST statistics
    (mean 0.2860, std 0.3530).

    Example:
        >>> dm = FashionMNISTDataModule(batch_size=128)   # doctest: +SKIP
        >>> dm.num_train, dm.input_shape                   # doctest: +SKIP
        (60000, (1, 28, 28))
    """

    num_classes = 10
    input_shape = (1, 28, 28)
    pad, flip = 2, False
    mean, std = torch.tensor(FASHION_MNIST_MEAN), torch.tensor(FASHION_MNIST_STD)
    debian_dir = DEBIAN_DIR  # a class attribute so tests and other installs can point elsewhere
    default_dir = "data"

    def __init__(self, data_dir: str | None = None, download: bool = True, batch_size: int = 128,
                 eval_batch_size: int = 1000, num_workers: int = 0, persistent_workers: bool = False,
                 pin_memory: bool = False, augment: bool = True, device_resident: bool = False) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, persistent_workers, pin_memory, augment,
                         device_resident)
        if data_dir is not None and not isinstance(data_dir, str | Path):
            raise ConfigError("data.data_dir", data_dir, "a folder path, or null for the Debian package")
        self.download = check_bool("data.download", download)
        if data_dir is None and find_idx_files(self.debian_dir) is not None:
            self.data_dir = Path(self.debian_dir)
        else:
            self.data_dir = Path(data_dir if data_dir is not None else self.default_dir).expanduser()
        if not download and self.files() is None:
            raise ConfigError(
                "data.data_dir", str(self.data_dir) if data_dir is not None else None,
                f"a folder holding the four Fashion-MNIST IDX files (plain or .gz) directly or under "
                f"FashionMNIST/raw/; or install them with `apt-get install dataset-fashion-mnist` "
                f"({self.debian_dir}); or set data.download=true")

    def files(self) -> dict[str, Path] | None:
        """The four files to read, or ``None`` when they are not (yet) there."""
        return find_idx_files(self.data_dir) or find_idx_files(self.data_dir / "FashionMNIST" / "raw")

    def prepare_data(self) -> None:
        # Called on one process per node by Lightning, before setup() on every process.
        if self.download and self.files() is None:
            import torchvision.datasets

            torchvision.datasets.FashionMNIST(str(self.data_dir), train=True, download=True)

    def load(self) -> tuple[Split, Split, Split]:
        files = self.files()
        if files is None:
            raise ConfigError("data.data_dir", str(self.data_dir),
                              "a folder holding the Fashion-MNIST files; run prepare_data() with "
                              "data.download=true first")
        arrays = {name: read_idx(path) for name, path in files.items()}
        splits = []
        for prefix in ("train", "t10k"):
            x, y = arrays[f"{prefix}-images-idx3-ubyte"], arrays[f"{prefix}-labels-idx1-ubyte"]
            if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
                raise ValueError(f"Fashion-MNIST {prefix} files: images {x.shape} and labels {y.shape} "
                                 "do not match ([N, H, W] and [N])")
            splits.append(Split(torch.from_numpy(x[:, None]).contiguous(), torch.from_numpy(y.astype(np.int64))))
        return splits[0], splits[1], splits[1]
