"""Write a synthetic CIFAR-10 in the original on-disk format, for throughput runs without a download.

    python bench/synthetic_cifar_files.py data_synthetic          # 50k + 10k random images
    lightning fit --config cifar_boost.yaml --data.init_args.data_dir=data_synthetic \
        --data.init_args.download=false

The files are ``cifar-10-batches-py/data_batch_{1..5}`` and ``test_batch``: pickled dicts with
``b"data"`` (uint8 ``[10000, 3072]``) and ``b"labels"``, what ``CIFAR10DataModule`` reads. The
pixels and labels are uniform random, so accuracies mean nothing; images/s and wall times are
those of the real data set (same shapes, dtype and pipeline).
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np


def write_synthetic_cifar10(root: str | Path, per_file: int = 10000, seed: int = 0) -> Path:
    """Five training batches and one test batch of ``per_file`` images each under ``root``."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"data": rng.integers(0, 256, (per_file, 3 * 32 * 32), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_file).tolist(), b"batch_label": name.encode()}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="the data_dir to write into")
    parser.add_argument("--per-file", type=int, default=10000)
    args = parser.parse_args()
    print(f"wrote {write_synthetic_cifar10(args.root, args.per_file)}")
