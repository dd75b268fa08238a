"""Framework training step vs a hand-written PyTorch loop: same model, data, optimizer, precision.

Both sides train a fresh copy of the same ``MarginClassifier`` (same initial weights) with SGD on
synthetic CIFAR-shaped uint8 data held on the device and augmented there
(``DeviceResidentLoader``), so the only difference is the training loop: ``Trainer.fit`` (logger,
progress bar, checkpointing and model summary off; the module's epoch-level metrics on, as users
run it) against ``zero_grad / forward / loss / backward / step``. Steady-state throughput is timed
after ``--warmup`` steps (compilation, cuDNN autotuning and allocator warm-up excluded); the
setup cost of ``Trainer.fit`` is printed separately. A third side, ``Trainer.fit`` of a bare
``LightningModule`` around the same network (loss and optimizer only), splits the gap into
Lightning's own loop and what marginboost's module adds. The order of the sides rotates over
``--repeats`` runs; the median of the paired ratios is the figure (best of each also printed).

    python bench/bench_framework_vs_raw.py                       # CPU, small sizes
    python bench/bench_framework_vs_raw.py --device cuda --backbone resnet18 --batch-size 512 \
        --steps 200 --precision bf16-mixed --channels-last

Target: framework / raw >= 0.97 (median of paired runs). On a CPU device with one thread the
steps are timed in this process's CPU time (``--clock``), which other jobs on a shared machine do
not inflate.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from datamodules import DeviceResidentLoader, Split  # noqa: E402
from datamodules.vision import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from models import MarginClassifier, discounted_cross_entropy  # noqa: E402
from models.classifier import default_optimizer  # noqa: E402

PRECISIONS = ("32-true", "bf16-mixed")


def add_common_args(parser: argparse.ArgumentParser, steps: int) -> None:
    """The options every benchmark in this folder shares."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    parser.add_argument("--backbone", default="small_cnn", help="registered backbone name (e.g. resnet18)")
    parser.add_argument("--width", type=int, default=None,
                        help="backbone width (default: the backbone's; small_cnn on CPU: 16)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=steps, help="timed training steps (batches)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="default: bf16-mixed on CUDA, 32-true on CPU")
    parser.add_argument("--channels-last", action="store_true", help="MarginClassifier(channels_last=True)")
    parser.add_argument("--compile", action="store_true", help="MarginClassifier(compile_backbone=True)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 on CPU, steadier on a shared machine; torch's on CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                        help="timer of the steps: wall clock, or this process's CPU time (auto: CPU time "
                             "on a CPU device with one thread, where other jobs on a shared machine would "
                             "otherwise count; wall clock on CUDA)")


def resolve(args: argparse.Namespace) -> torch.device:
    """Fill in device-dependent defaults; set threads, cuDNN autotuning and seeds."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.width is None and device.type == "cpu" and args.backbone == "small_cnn":
        args.width = 16  # CI-sized on a few CPU cores
    if args.precision is None:
        args.precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is None and device.type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "clock", "wall") == "auto":
        args.clock = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    # Trainer(benchmark=True) sets the same flag; the raw loop gets it here.
    torch.backends.cudnn.benchmark = device.type == "cuda"
    L.seed_everything(args.seed, verbose=False)
    return device


def print_environment(device: torch.device, args: argparse.Namespace) -> None:
    """Device, versions and settings, so a figure is never quoted without its machine."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible"
    print(f"device   : {device} ({name}); torch threads {torch.get_num_threads()}")
    print(f"versions : python {platform.python_version()}, torch {torch.__version__}, lightning {L.__version__}")
    print(f"settings : {vars(args)}")


def synthetic_cifar(n: int, seed: int = 0, num_classes: int = 10) -> Split:
    """``n`` random uint8 32×32 RGB images with random labels (no download)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return Split(x, torch.randint(0, num_classes, (n,), generator=g))


def build_model(args: argparse.Namespace) -> MarginClassifier:
    """The benchmark model; every run deep-copies one instance so initial weights agree."""
    kwargs = {"width": args.width} if args.width else {}
    model = MarginClassifier(num_classes=10, input_shape=(3, 32, 32), backbone=args.backbone,
                             backbone_kwargs=kwargs, channels_last=args.channels_last,
                             compile_backbone=args.compile)
    return model


def clock(args: argparse.Namespace) -> float:
    """Seconds from the timer ``--clock`` chose (``time.process_time`` for ``cpu``)."""
    return time.process_time() if getattr(args, "clock", "wall") == "cpu" else time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_loader(split: Split, args: argparse.Namespace, device: torch.device) -> DeviceResidentLoader:
    return DeviceResidentLoader(split, torch.zeros(len(split)), args.batch_size,
                                mean=torch.tensor(CIFAR10_MEAN), std=torch.tensor(CIFAR10_STD),
                                pad=4, flip=True, augment=True, seed=args.seed, device=device).to(device)


def raw_run(model: MarginClassifier, loader: DeviceResidentLoader, args: argparse.Namespace,
            device: torch.device) -> float:
    """Images/s of a plain PyTorch loop over the timed steps."""
    model = model.to(device).train()
    optimizer = default_optimizer([p for p in model.parameters() if p.requires_grad])
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16-mixed"
                else contextlib.nullcontext())
    start, seen = 0.0, 0
    for step, batch in enumerate(loader):
        if step == args.warmup:
            sync(device)
            start = clock(args)
        with autocast:
            loss = discounted_cross_entropy(model(batch["x"]), batch["y"], batch["gap"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= args.warmup:
            seen += batch["y"].shape[0]
    sync(device)
    return seen / (clock(args) - start)


class _StepTimer(L.Callback):
    """Times the steps after ``warmup`` from inside the fit, as the raw loop is timed."""

    def __init__(self, warmup: int, last: int, device: torch.device, args: argparse.Namespace) -> None:
        self.warmup, self.last, self.device, self.args = warmup, last, device, args
        self.start, self.end, self.seen = 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            sync(self.device)
            self.start = clock(self.args)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.seen += batch["y"].shape[0]
        if batch_idx == self.last:  # one sync, as raw_run's end: no per-step sync on the device
            sync(self.device)
            self.end = clock(self.args)


def make_trainer(args: argparse.Namespace, device: torch.device, callbacks: list, **overrides) -> L.Trainer:
    """A Trainer with every per-step extra off: no logger, bar, checkpointing or summary."""
    kwargs = dict(accelerator=device.type, devices=[device.index or 0] if device.type == "cuda" else 1,
                  precision=args.precision, max_epochs=1, logger=False, enable_progress_bar=False,
                  enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                  limit_val_batches=0, benchmark=device.type == "cuda", callbacks=callbacks)
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def framework_run(model: MarginClassifier, loader: DeviceResidentLoader, args: argparse.Namespace,
                  device: torch.device) -> tuple[float, float]:
    """Images/s of ``Trainer.fit`` over the timed steps, and the fit's time outside the steps."""
    timer = _StepTimer(args.warmup, args.warmup + args.steps - 1, device, args)
    trainer = make_trainer(args, device, [timer])
    t0 = clock(args)
    trainer.fit(model, train_dataloaders=loader)
    total = clock(args) - t0
    return timer.seen / (timer.end - timer.start), total


class BareModule(L.LightningModule):
    """The same network, loss and optimizer in the smallest LightningModule: no metrics, no hooks.

    ``Trainer.fit`` of this module against the raw loop is Lightning's own per-step cost; of
    ``MarginClassifier`` against this module, what marginboost's module adds (its training metrics).
    """

    def __init__(self, model: MarginClassifier) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return discounted_cross_entropy(self.model(batch["x"]), batch["y"], batch["gap"])

    def configure_optimizers(self):
        return default_optimizer([p for p in self.parameters() if p.requires_grad])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, steps=20)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--repeats", type=int, default=3, help="alternating raw/framework runs; best kept")
    args = parser.parse_args(argv)
    device = resolve(args)
    print_environment(device, args)
    import warnings

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    split = synthetic_cifar(args.batch_size * (args.warmup + args.steps), args.seed)
    template = build_model(args)
    loader = make_loader(split, args, device)
    raw, framework, bare, overheads = [], [], [], []
    for r in range(args.repeats):
        # The order rotates from repeat to repeat: a drift in the machine's load (or a warmer
        # cache for a later run) then favours no side.
        sides = ("raw", "framework", "bare")
        for side in sides[r % 3:] + sides[:r % 3]:
            loader.set_epoch(r)
            if side == "raw":
                raw.append(raw_run(copy.deepcopy(template), loader, args, device))
            elif side == "bare":
                bare.append(framework_run(BareModule(copy.deepcopy(template)), loader, args, device)[0])
            else:
                ips, total = framework_run(copy.deepcopy(template), loader, args, device)
                framework.append(ips)
                overheads.append(total - (args.steps * args.batch_size) / ips)
        print(f"repeat {r}: raw {raw[-1]:10.1f} img/s   framework {framework[-1]:10.1f} img/s   "
              f"bare LightningModule {bare[-1]:10.1f} img/s")
    best_raw, best_fw = max(raw), max(framework)
    print(f"raw loop        : {best_raw:10.1f} images/s (best of {args.repeats}; median {statistics.median(raw):.1f})")
    print(f"Trainer.fit     : {best_fw:10.1f} images/s (best of {args.repeats}; median {statistics.median(framework):.1f})")
    print(f"fit outside the timed steps (setup, warm-up steps, teardown): {min(overheads):.2f} s "
          f"({args.clock} clock)")
    print(f"bare module     : {max(bare):10.1f} images/s (best of {args.repeats}; median {statistics.median(bare):.1f})")
    print(f"  Lightning's loop alone (bare / raw, median of paired runs): "
          f"{statistics.median(b / r for b, r in zip(bare, raw)):.3f}; marginboost's module on top "
          f"(framework / bare): {statistics.median(f / b for f, b in zip(framework, bare)):.3f}")
    median_ratio = statistics.median(f / r for f, r in zip(framework, raw))
    print(f"RATIO framework/raw = {best_fw / best_raw:.3f} (best vs best; median of paired runs "
          f"{median_ratio:.3f}; {args.clock} clock)   target >= 0.97 (median)")


if __name__ == "__main__":
    main()
