"""Our deep ensemble against TorchEnsemble's ``VotingClassifier``: same data, backbone, member-epochs.

    pip install torchensemble        # bench-only, not a dependency of the framework
    python bench/bench_torchensemble.py                     # Fashion-MNIST when installed, else digits
    python bench/bench_torchensemble.py --members 3 --epochs 3 --device cuda

Both sides train ``--members`` members of the same ``MarginClassifier`` (the packaged deep-ensemble
config's backbone and frozen ``W ∘ BN`` head) for ``--epochs`` epochs each, with the same SGD
(lr, momentum, Nesterov, weight decay), the same per-epoch cosine schedule, batch size, no
augmentation (TorchEnsemble has none of its own), on the same normalised training set, and score
the ensemble on the test set:

* **marginboost**: ``lightning fit --config <deep-ensemble config>`` run in this process with
  overrides (``--boosting.rounds``, ``--trainer.max_epochs``, no callbacks, no augmentation), as a
  user runs it: Rich progress bar, TensorBoard logging, per-round ensemble evaluation, checkpoints,
  ``summary.json``, figures;
* **TorchEnsemble**: ``VotingClassifier(...).fit(train_loader, epochs)`` over a ``DataLoader`` of a
  ``TensorDataset`` (its documented use), then ``evaluate(test_loader)``.

Each run is a fresh process for one side, so what one side sets for its process (our command
line tunes glibc's malloc, ``marginboost.allocator``) does not reach the other; TorchEnsemble's
side keeps glibc's defaults, as its users run it, unless ``--their-malloc tuned`` gives it the same
tuning. Wall time is end to end inside that process, after the common imports (torch, Lightning,
the model): reading the data set, building, training, scoring the ensemble on the test set. Ours
scores it in the run itself: each round evaluates the ensemble on the validation split, which for
Fashion-MNIST and digits is the test split, and the bench reads the last round's ``deep_acc``
(mean of softmax, TorchEnsemble's voting) from ``summary.json``. The two sides alternate over
``--repeats`` runs; the ratio ours / theirs of the medians is printed (below 1: we are faster),
with the training time alone (``fit``) of each and the process's CPU time (which other jobs on a
shared machine do not inflate).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from datamodules import DigitsDataModule, FashionMNISTDataModule  # noqa: E402
from datamodules.augment import normalize  # noqa: E402
from datamodules.fashion import DEBIAN_DIR, find_idx_files  # noqa: E402
from models import MarginClassifier  # noqa: E402

# data set -> (packaged config, DataModule, the config's model and optimizer settings)
SETUPS = {
    "fashion": ("fashion_deep_ensemble.yaml", FashionMNISTDataModule,
                {"backbone": "small_cnn", "backbone_kwargs": {"width": 8}}, 128,
                {"lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4, "nesterov": True}),
    "digits": ("digits_boost.yaml", DigitsDataModule,
               {"backbone": "small_cnn", "backbone_kwargs": {"width": 16}}, 64,
               {"lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4, "nesterov": False}),
}


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (our worker processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def normalised(split, dm) -> tuple[torch.Tensor, torch.Tensor]:
    """The split as the DataModule feeds it without augmentation: float, [0, 1], standardised."""
    return normalize(split.x, dm.mean, dm.std), split.y


def our_argv(args, workdir: Path, run_dir: Path, members: int, callbacks: str = "[]") -> list[str]:
    """``lightning fit`` arguments of our side: the packaged config with the bench's overrides."""
    config = SETUPS[args.data][0]
    shutil.rmtree(run_dir, ignore_errors=True)
    argv = ["fit", "--config", str(Path(__file__).resolve().parents[1] / "lightning_app" / "configs" / config),
            f"--boosting.rounds={members}", f"--trainer.max_epochs={args.epochs}",
            f"--boosting.run_dir={run_dir}", f"--trainer.callbacks={callbacks}", "--data.init_args.augment=false",
            f"--trainer.accelerator={args.device}", "--trainer.devices=1", "--trainer.precision=32-true",
            f"--trainer.logger.init_args.save_dir={workdir / 'logs'}"]
    if args.data_dir is not None:
        argv += [f"--data.init_args.data_dir={args.data_dir}", "--data.init_args.download=false"]
    if args.concurrent_members is not None:
        argv.append(f"--boosting.concurrent_members={args.concurrent_members}")
    if args.data == "digits":
        argv.append("--boosting.gap_rule=lightning_app.NoGapRule")
    else:
        argv.append(f"--model.init_args.lr_scheduler.init_args.T_max={args.epochs}")
    return argv


def ours(args, workdir: Path) -> tuple[float, float, float, float]:
    """Wall seconds of ``lightning fit``, its summed member fit seconds (overlapping ones when
    members train concurrently), the ensemble's test accuracy (mean softmax, from the run's last
    round), and the CPU seconds of the run (worker processes included)."""
    from lightning_app import build_cli

    run_dir = workdir / "ours"
    argv = our_argv(args, workdir, run_dir, args.members)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    cli = build_cli(argv)
    _, val, test = cli.datamodule._ensure_loaded()
    if val is not test:
        raise SystemExit(f"--data {args.data}: its validation split is not its test split; the bench "
                         "reads the test accuracy from the run's per-round validation")
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    summary = json.loads((run_dir / "summary.json").read_text())
    fit = sum(r["fit_seconds"] for r in summary["history"])
    return wall, fit, float(summary["history"][-1]["deep_acc"]), cpu


def their_setup(args) -> tuple[DataLoader, DataLoader, dict, dict]:
    """TorchEnsemble's side as its documented use: shuffled training and test ``DataLoader`` of
    ``TensorDataset`` s, the estimator's arguments and the SGD settings."""
    _, dm_class, model_kwargs, batch_size, sgd = SETUPS[args.data]
    dm = dm_class(augment=False, data_dir=args.data_dir, download=False) if args.data == "fashion" else dm_class()
    train, _, test = dm.load()
    train_loader = DataLoader(TensorDataset(*normalised(train, dm)), batch_size=batch_size, shuffle=True)
    test_loader = DataLoader(TensorDataset(*normalised(test, dm)), batch_size=1000)
    estimator_args = {"num_classes": dm.num_classes, "input_shape": dm.input_shape, "head_init": "orthogonal",
                      "freeze_head": True, **model_kwargs}
    return train_loader, test_loader, estimator_args, sgd


def theirs(args, device: torch.device) -> tuple[float, float, float, float]:
    """Wall seconds of TorchEnsemble's VotingClassifier, its fit seconds, its test accuracy, and
    the process's CPU seconds of the run."""
    from torchensemble import VotingClassifier

    start, cpu_start = time.perf_counter(), _cpu_seconds()
    if args.their_malloc == "tuned":
        from marginboost import tune_malloc

        tune_malloc()
    train_loader, test_loader, estimator_args, sgd = their_setup(args)
    ensemble = VotingClassifier(estimator=MarginClassifier, n_estimators=args.members, cuda=device.type == "cuda",
                                estimator_args=estimator_args)
    ensemble.set_optimizer("SGD", **sgd)
    ensemble.set_scheduler("CosineAnnealingLR", T_max=args.epochs)
    fit_start = time.perf_counter()
    ensemble.fit(train_loader, epochs=args.epochs, log_interval=10**9, save_model=False)
    fit = time.perf_counter() - fit_start
    acc = ensemble.evaluate(test_loader) / 100.0
    return time.perf_counter() - start, fit, float(acc), _cpu_seconds() - cpu_start


class TheirSteps:
    """TorchEnsemble's training loop (``_parallel_fit_per_epoch``: a ``DataLoader`` over a
    ``TensorDataset``, zero_grad, forward, cross-entropy, backward, step), run ``n`` steps at a time."""

    def __init__(self, args, device: torch.device) -> None:
        self.loader, _, estimator_args, sgd = their_setup(args)
        self.model = MarginClassifier(**estimator_args).to(device).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), **sgd)
        self.device, self.batches = device, iter(())

    def run(self, n: int) -> float:
        """Wall seconds of ``n`` steps."""
        start = time.perf_counter()
        for _ in range(n):
            try:
                x, y = next(self.batches)
            except StopIteration:
                self.batches = iter(self.loader)
                x, y = next(self.batches)
            x, y = x.to(self.device), y.to(self.device)
            self.optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(self.model(x), y)
            loss.backward()
            self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


class Interleave(L.Callback):
    """Inside our fit: every ``k`` of our steps, ``k`` of theirs, each block timed on its own."""

    theirs: TheirSteps | None = None
    k = 40
    ours_s: list[float] = []
    theirs_s: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.block_start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx % self.k:
            return
        if self.block_start is not None:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()
            Interleave.ours_s.append(time.perf_counter() - self.block_start)
            Interleave.theirs_s.append(Interleave.theirs.run(self.k))
        self.block_start = time.perf_counter()


def interleaved(args, device: torch.device) -> None:
    """Per-step time of the two training loops in one process, alternating blocks of ``k`` steps
    inside one member's fit: a change of machine speed hits both sides of a pair alike."""
    from lightning_app import build_cli

    Interleave.theirs, Interleave.k = TheirSteps(args, device), args.interleaved
    with tempfile.TemporaryDirectory() as tmp:
        argv = our_argv(args, Path(tmp), Path(tmp) / "ours", 1, callbacks="[{class_path: __main__.Interleave}]")
        build_cli(argv)
    ours_s, theirs_s, k = Interleave.ours_s, Interleave.theirs_s, args.interleaved
    pairs = [a / b for a, b in zip(ours_s, theirs_s)]
    print(f"interleaved blocks of {k} steps: {len(pairs)} pairs; ours {1e3 * sum(ours_s) / len(ours_s) / k:.2f} "
          f"ms a step, theirs {1e3 * sum(theirs_s) / len(theirs_s) / k:.2f} ms a step")
    print(f"RATIO step time ours/theirs = {statistics.median(pairs):.3f} (median of pairs; "
          f"quartiles {statistics.quantiles(pairs, n=4)[0]:.3f}-{statistics.quantiles(pairs, n=4)[2]:.3f})")


def run_side(side: str, repeat: int) -> tuple[float, float, float, float]:
    """One side's run in a fresh process (this script with ``--child``): its four figures. The
    child's console is this one's, as a user's run would have it; the figures come in a file."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        code = subprocess.call([sys.executable, __file__, *sys.argv[1:], "--child", side, str(repeat), str(result)])
        if code != 0:
            raise SystemExit(f"the {side} run failed (exit {code})")
        return tuple(json.loads(result.read_text()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=sorted(SETUPS), default=None,
                   help="default: fashion when its files are installed, else digits")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST's folder (default: the Debian package's)")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3, help="epochs per member")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=1, help="alternating runs of both sides; medians compared")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--concurrent-members", type=int, default=None,
                   help="our boosting.concurrent_members (default: the config's; digits: 1)")
    p.add_argument("--their-malloc", choices=("default", "tuned"), default="default",
                   help="TorchEnsemble's process: glibc's defaults (as its users run it) or our tuning")
    p.add_argument("--interleaved", type=int, default=0, metavar="K",
                   help="instead: time the two training loops in blocks of K steps, alternating inside one "
                        "member's fit of --epochs epochs in this process")
    p.add_argument("--child", nargs=3, metavar=("SIDE", "REPEAT", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.data is None:
        args.data = "fashion" if find_idx_files(args.data_dir or DEBIAN_DIR) is not None else "digits"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    if args.child is not None:
        side, r, result = args.child[0], int(args.child[1]), Path(args.child[2])
        L.seed_everything(r, verbose=False)
        with tempfile.TemporaryDirectory() as tmp:
            out = ours(args, Path(tmp)) if side == "ours" else theirs(args, device)
        result.write_text(json.dumps(out))
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible"
    print(f"device   : {device} ({name}); torch threads {torch.get_num_threads()}")
    print(f"versions : python {platform.python_version()}, torch {torch.__version__}, lightning {L.__version__}")
    print(f"settings : {vars(args)} ({args.members} x {args.epochs} = {args.members * args.epochs} member-epochs)")
    if args.interleaved:
        interleaved(args, device)
        return
    results: dict[str, list[tuple[float, float, float, float]]] = {"ours": [], "theirs": []}
    for r in range(args.repeats):
        for side in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
            out = run_side(side, r)
            results[side].append(out)
            print(f"repeat {r}: {side:7s} wall {out[0]:8.1f} s   fit {out[1]:8.1f} s   test acc {out[2]:.4f}   "
                  f"process CPU {out[3]:8.1f} s", flush=True)
    med = {side: [statistics.median(v[i] for v in runs) for i in range(4)] for side, runs in results.items()}
    print(f"marginboost   : wall {med['ours'][0]:.1f} s, fit {med['ours'][1]:.1f} s, test acc {med['ours'][2]:.4f}")
    print(f"TorchEnsemble : wall {med['theirs'][0]:.1f} s, fit {med['theirs'][1]:.1f} s, "
          f"test acc {med['theirs'][2]:.4f}")
    print(f"RATIO wall ours/theirs = {med['ours'][0] / med['theirs'][0]:.3f}   target <= 1.0")
    print(f"RATIO fit  ours/theirs = {med['ours'][1] / med['theirs'][1]:.3f}")
    print(f"RATIO process CPU time ours/theirs = {med['ours'][3] / med['theirs'][3]:.3f} "
          "(not inflated by other jobs on a shared machine)")


if __name__ == "__main__":
    main()
