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

Wall time is end to end for each side: reading the data set, building, training, evaluating. The
two sides alternate over ``--repeats`` runs; the ratio ours / theirs of the medians is printed
(below 1: we are faster), with the training time alone (``fit``) of each and the process's CPU
time (which other jobs on a shared machine do not inflate).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
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


def ours(args, workdir: Path) -> tuple[float, float, float, float]:
    """Wall seconds of ``lightning fit``, its summed member fit seconds (overlapping ones when
    members train concurrently), the ensemble's test accuracy, and the CPU seconds of the run
    (worker processes included)."""
    from lightning_app import build_cli
    from lightning_app.boosted_ensemble import BoostedEnsemble

    config, dm_class, _, _, _ = SETUPS[args.data]
    run_dir = workdir / "ours"
    shutil.rmtree(run_dir, ignore_errors=True)
    argv = ["fit", "--config", str(Path(__file__).resolve().parents[1] / "lightning_app" / "configs" / config),
            f"--boosting.rounds={args.members}", f"--trainer.max_epochs={args.epochs}",
            f"--boosting.run_dir={run_dir}", "--trainer.callbacks=[]", "--data.init_args.augment=false",
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
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    cli = build_cli(argv)
    # the test-set scoring is inside the timed region, as TorchEnsemble's evaluate() is
    dm = cli.datamodule
    ensemble = BoostedEnsemble.from_run_dir(run_dir)
    x, y = normalised(dm._ensure_loaded()[2], dm)
    with torch.no_grad():
        probs = torch.stack([torch.softmax(m.eval()(x), 1) for m in ensemble.members]).mean(0)
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    summary = json.loads((run_dir / "summary.json").read_text())
    fit = sum(r["fit_seconds"] for r in summary["history"])
    return wall, fit, float((probs.argmax(1) == y).float().mean()), cpu


def theirs(args, device: torch.device) -> tuple[float, float, float, float]:
    """Wall seconds of TorchEnsemble's VotingClassifier, its fit seconds, its test accuracy, and
    the process's CPU seconds of the run."""
    from torchensemble import VotingClassifier

    start, cpu_start = time.perf_counter(), _cpu_seconds()
    _, dm_class, model_kwargs, batch_size, sgd = SETUPS[args.data]
    dm = dm_class(augment=False, data_dir=args.data_dir, download=False) if args.data == "fashion" else dm_class()
    train, _, test = dm.load()
    train_loader = DataLoader(TensorDataset(*normalised(train, dm)), batch_size=batch_size, shuffle=True)
    test_loader = DataLoader(TensorDataset(*normalised(test, dm)), batch_size=1000)
    ensemble = VotingClassifier(estimator=MarginClassifier, n_estimators=args.members, cuda=device.type == "cuda",
                                estimator_args={"num_classes": dm.num_classes, "input_shape": dm.input_shape,
                                                "head_init": "orthogonal", "freeze_head": True, **model_kwargs})
    ensemble.set_optimizer("SGD", **sgd)
    ensemble.set_scheduler("CosineAnnealingLR", T_max=args.epochs)
    fit_start = time.perf_counter()
    ensemble.fit(train_loader, epochs=args.epochs, log_interval=10**9, save_model=False)
    fit = time.perf_counter() - fit_start
    acc = ensemble.evaluate(test_loader) / 100.0
    return time.perf_counter() - start, fit, float(acc), _cpu_seconds() - cpu_start


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
    args = p.parse_args()
    if args.data is None:
        args.data = "fashion" if find_idx_files(args.data_dir or DEBIAN_DIR) is not None else "digits"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible"
    print(f"device   : {device} ({name}); torch threads {torch.get_num_threads()}")
    print(f"versions : python {platform.python_version()}, torch {torch.__version__}, lightning {L.__version__}")
    print(f"settings : {vars(args)} ({args.members} x {args.epochs} = {args.members * args.epochs} member-epochs)")
    results: dict[str, list[tuple[float, float, float, float]]] = {"ours": [], "theirs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for side in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
                L.seed_everything(r, verbose=False)
                out = ours(args, Path(tmp)) if side == "ours" else theirs(args, device)
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
