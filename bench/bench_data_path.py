"""Device-resident data path vs the DataLoader path: images/s of one epoch each.

Two measurements on the same synthetic CIFAR-shaped uint8 training set (crop pad 4 + flip,
CIFAR-10 normalisation), alternating the two paths ``--repeats`` times and keeping the best:

* **data only**: one pass over the training loader, every batch on the device (the DataLoader
  path copies it there, pinned and non-blocking on CUDA), synchronised at the end;
* **training epoch**: ``Trainer.fit`` for one epoch of ``MarginClassifier`` with the DataModule's
  ``device_resident`` true or false (timed from epoch start to epoch end, set-up excluded).

    python bench/bench_data_path.py                                   # CPU, small sizes
    python bench/bench_data_path.py --device cuda --backbone resnet18 --batch-size 512 \
        --steps 98 --num-workers 8 --channels-last
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import move_data_to_device

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_framework_vs_raw import (  # noqa: E402
    add_common_args,
    build_model,
    make_trainer,
    print_environment,
    resolve,
    sync,
    synthetic_cifar,
)

from datamodules import GapDataModule, Split  # noqa: E402
from datamodules.vision import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402


class SyntheticCIFARDataModule(GapDataModule):
    """CIFAR-10-shaped random uint8 images with CIFAR-10's augmentation and statistics."""

    num_classes = 10
    input_shape = (3, 32, 32)
    pad, flip = 4, True
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)

    def __init__(self, num_train: int, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n, self.seed = num_train, seed

    def load(self) -> tuple[Split, Split, Split]:
        train, val = synthetic_cifar(self.n, self.seed), synthetic_cifar(256, self.seed + 1)
        return train, val, val


def data_only(dm: SyntheticCIFARDataModule, device: torch.device) -> float:
    """Images/s of one pass over the training loader, batches delivered on ``device``."""
    loader = dm.device_resident_loader(device) if dm.device_resident else dm.train_dataloader()
    if dm.device_resident:
        loader.to(device)  # the one-off upload is set-up, as the DataLoader's worker start is not timed either
    sync(device)
    start, seen = time.perf_counter(), 0
    for batch in loader:
        batch = move_data_to_device(batch, device)
        seen += batch["y"].shape[0]
    sync(device)
    return seen / (time.perf_counter() - start)


class _EpochTimer(L.Callback):
    def __init__(self, device: torch.device) -> None:
        self.device, self.elapsed, self.seen = device, 0.0, 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        sync(self.device)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += batch["y"].shape[0]

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        sync(self.device)
        self.elapsed = time.perf_counter() - self.start


def training_epoch(dm: SyntheticCIFARDataModule, model, args: argparse.Namespace, device: torch.device) -> float:
    """Images/s of one ``Trainer.fit`` epoch on ``dm``."""
    timer = _EpochTimer(device)
    make_trainer(args, device, [timer]).fit(model, datamodule=dm)
    return timer.seen / timer.elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, steps=10)
    parser.add_argument("--num-workers", type=int, default=None,
                        help="DataLoader workers (default: 0 on CPU, min(8, cores) on CUDA)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of both paths; best kept")
    args = parser.parse_args(argv)
    device = resolve(args)
    if args.num_workers is None:
        args.num_workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    print_environment(device, args)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*validation_step.*")

    n = args.batch_size * args.steps
    loader_kwargs = dict(batch_size=args.batch_size, num_workers=args.num_workers,
                         persistent_workers=args.num_workers > 0, pin_memory=device.type == "cuda")
    modules = {path: SyntheticCIFARDataModule(n, args.seed, device_resident=path == "device-resident",
                                              **loader_kwargs)
               for path in ("device-resident", "DataLoader")}
    for dm in modules.values():
        dm.setup("fit")
    template = build_model(args)
    results: dict[str, dict[str, list[float]]] = {p: {"data": [], "train": []} for p in modules}
    for r in range(args.repeats):
        for path, dm in modules.items():
            results[path]["data"].append(data_only(dm, device))
            results[path]["train"].append(training_epoch(dm, copy.deepcopy(template), args, device))
            print(f"repeat {r} {path:15s}: data only {results[path]['data'][-1]:10.1f} img/s   "
                  f"training epoch {results[path]['train'][-1]:10.1f} img/s")
    best = {p: {k: max(v) for k, v in res.items()} for p, res in results.items()}
    for kind, label in (("data", "data only     "), ("train", "training epoch")):
        dr, dl = best["device-resident"][kind], best["DataLoader"][kind]
        print(f"{label}: device-resident {dr:10.1f} img/s, DataLoader {dl:10.1f} img/s, "
              f"RATIO {dr / dl:.2f}x (best of {args.repeats}, {n} images per epoch)")


if __name__ == "__main__":
    main()
