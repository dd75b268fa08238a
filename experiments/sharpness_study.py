"""Curvature penalties vs SAM: SGD, SAM, ASAM, Riemannian SAM, gradient-norm and trace penalties.

Every method trains the same network for the same number of epochs (matched epochs, not matched
compute: SAM-type steps take two passes, the trace penalty more) from the same seeds; at the end
it measures test accuracy, the Hessian trace (Hutchinson), the top Hessian eigenvalue (Lanczos)
and the gradient-norm width, on a fixed seeded subset of the training set. One command writes
``docs/sharpness_study.md`` (tables), ``docs/sharpness_study.png`` (figure) and
``docs/sharpness_study.csv`` (one row per run)::

    OMP_NUM_THREADS=1 python experiments/sharpness_study.py                 # Fashion-MNIST, CPU
    python experiments/sharpness_study.py --data cifar10 --backbone resnet20 \\
        --epochs 100 --num-train 0 --batch-size 128 --seeds 0 1 2 --accelerator gpu   # GPU

Finished runs are kept in ``<run-dir>/runs.jsonl``; re-running the command skips them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402

from callbacks import GradientNormWidth, HessianEigenvalues, HessianTrace  # noqa: E402
from datamodules import CIFAR10DataModule, FashionMNISTDataModule, SubsetDataModule  # noqa: E402
from marginboost.per_sample import collect_logits  # noqa: E402
from models import CurvaturePenaltyClassifier, MarginClassifier, SAMClassifier  # noqa: E402

# (class, extra init args). Radii and weights are the packaged configs' values where they exist;
# the gradient-norm weight equals SAM's ρ (the first-order equivalence of Zhao et al., 2022).
METHODS: dict[str, tuple[type, dict]] = {
    "sgd": (MarginClassifier, {}),
    "sam": (SAMClassifier, {"rho": 0.05}),
    "asam": (SAMClassifier, {"rho": 0.5, "adaptive": True, "eta": 0.01}),
    "rsam": (SAMClassifier, {"rho": 0.05, "riemannian": True}),
    "gradnorm": (CurvaturePenaltyClassifier, {"grad_norm_weight": 0.05, "grad_norm_form": "finite_difference"}),
    "trace": (CurvaturePenaltyClassifier, {"trace_weight": 1e-3, "trace_probes": 1}),
}
LABELS = {"sgd": "SGD", "sam": "SAM", "asam": "ASAM", "rsam": "Riemannian SAM",
          "gradnorm": "grad-norm penalty", "trace": "trace penalty"}
METRICS = ("test_acc", "train_acc", "trace", "trace_unit", "eig1", "width")


def make_data(args: argparse.Namespace) -> SubsetDataModule:
    if args.data == "fashion":
        base = FashionMNISTDataModule(batch_size=args.batch_size, eval_batch_size=1000, augment=args.augment,
                                      device_resident=True)
    else:
        base = CIFAR10DataModule(data_dir=args.data_dir, batch_size=args.batch_size, eval_batch_size=1000,
                                 augment=args.augment, device_resident=True)
    return SubsetDataModule(base, num_train=args.num_train or None, seed=0)


def train_one(method: str, seed: int, dm: SubsetDataModule, args: argparse.Namespace) -> dict:
    cls, extra = METHODS[method]
    L.seed_everything(seed, workers=True, verbose=False)
    kwargs = dict(num_classes=dm.num_classes, input_shape=dm.input_shape, backbone=args.backbone,
                  backbone_kwargs=json.loads(args.backbone_kwargs), head_seed=seed,
                  optimizer=lambda p: torch.optim.SGD(p, lr=args.lr, momentum=0.9, weight_decay=5e-4),
                  lr_scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=args.epochs))
    model = cls(**extra, **kwargs)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator=args.accelerator, devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, deterministic=args.accelerator == "cpu")
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    fit_s = time.perf_counter() - start
    model.eval()
    device = next(model.parameters()).device
    logits, y = _test_logits(model, dm, device)
    test_acc = float((logits.argmax(1) == y).double().mean())
    tr_logits, tr_y = collect_logits(model, dm.train_eval_dataloader(), dm.num_train, device)
    train_acc = float((tr_logits.argmax(1) == tr_y).double().mean())
    common = dict(every_n_epochs=None, at_fit_end=False, num_batches=args.measure_batches,
                  batch_size=args.measure_batch_size, seed=0, criterion="ce", progress=False)
    trace = HessianTrace(probes=args.probes, per_layer=False, **common).measure_now(None, model, datamodule=dm)
    trace_unit = HessianTrace(probes=args.probes, per_layer=False, normalize=True, **common).measure_now(
        None, model, datamodule=dm)
    eig = HessianEigenvalues(k=1, max_iter=args.lanczos_iter, **common).measure_now(None, model, datamodule=dm)
    width = GradientNormWidth(**{**common, "batch_size": args.batch_size}).measure_now(None, model, datamodule=dm)
    return {"method": method, "seed": seed, "test_acc": test_acc, "train_acc": train_acc,
            "trace": float(trace["trace"].value), "trace_stderr": float(trace["trace"].stderr),
            "trace_unit": float(trace_unit["trace"].value), "eig1": float(eig["eig1"].value),
            "width": float(width["width"].value), "fit_s": fit_s, "measure_s": time.perf_counter() - start - fit_s}


def _test_logits(model, dm, device):
    xs, ys = [], []
    with torch.no_grad():
        for batch in dm.test_dataloader():
            xs.append(model(batch["x"].to(device)).float().cpu())
            ys.append(batch["y"])
    return torch.cat(xs), torch.cat(ys)


def summarise(rows: list[dict], methods: list[str]) -> dict[str, dict[str, tuple[float, float]]]:
    out = {}
    for m in methods:
        runs = [r for r in rows if r["method"] == m]
        out[m] = {k: (float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs], ddof=1))
                      if len(runs) > 1 else float("nan")) for k in (*METRICS, "fit_s")}
        out[m]["n"] = (len(runs), 0.0)
    return out


def comparison_lines(stats: dict, reference: str, methods: list[str]) -> list[str]:
    """Each method's test-accuracy and trace difference to ``reference``, against the seed spread."""
    lines = [f"| method | Δ test acc vs {LABELS[reference]} | exceeds spread? | Δ trace vs {LABELS[reference]} "
             "| exceeds spread? |", "|---|---|---|---|---|"]
    for m in methods:
        if m == reference:
            continue
        cells = []
        for key, scale, fmt in (("test_acc", 100.0, "{:+.2f} pp"), ("trace", 1.0, "{:+.3g}")):
            (ma, sa), (mb, sb) = stats[m][key], stats[reference][key]
            delta = ma - mb
            exceeds = abs(delta) > sa + sb
            cells += [fmt.format(delta * scale) + f" (spread {(sa + sb) * scale:.3g})", "yes" if exceeds else "no"]
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    return lines


def figure(rows: list[dict], stats: dict, methods: list[str], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    means = [stats[m]["test_acc"][0] * 100 for m in methods]
    stds = [float(np.nan_to_num(stats[m]["test_acc"][1])) * 100 for m in methods]
    ax1.bar(range(len(methods)), means, yerr=stds, capsize=4, color="tab:blue")
    ax1.set_xticks(range(len(methods)), [LABELS[m] for m in methods], rotation=30, ha="right")
    ax1.set_ylim(min(means) - 3 * max(stds + [0.5]), max(means) + 3 * max(stds + [0.5]))
    ax1.set_ylabel("test accuracy (%)  mean ± std over seeds")
    for i, m in enumerate(methods):
        runs = [r for r in rows if r["method"] == m]
        ax2.scatter([r["trace"] for r in runs], [r["test_acc"] * 100 for r in runs], label=LABELS[m], color=f"C{i}")
    ax2.set_xscale("log")
    ax2.set_xlabel("Hessian trace at the end (Hutchinson)")
    ax2.set_ylabel("test accuracy (%)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(rows: list[dict], args: argparse.Namespace, methods: list[str], wall: float, out: Path) -> None:
    stats = summarise(rows, methods)
    png = out.with_suffix(".png")
    figure(rows, stats, methods, png)
    with open(out.with_suffix(".csv"), "w") as f:
        keys = ["method", "seed", *METRICS, "trace_stderr", "fit_s", "measure_s"]
        f.write(",".join(keys) + "\n")
        for r in sorted(rows, key=lambda r: (methods.index(r["method"]), r["seed"])):
            f.write(",".join(str(r[k]) for k in keys) + "\n")
    cmd = " ".join(["python experiments/sharpness_study.py", *sys.argv[1:]])
    seeds = sorted({r["seed"] for r in rows})
    data = (f"Fashion-MNIST (Debian package), a seeded subset of {args.num_train} training images, the full "
            "10 000-image test set" if args.data == "fashion" and args.num_train else f"{args.data}, full training set")
    lines = [
        "# Curvature penalties vs SAM",
        "",
        "Written by `experiments/sharpness_study.py` (do not edit by hand).",
        "",
        "The seed's claim: Hessian-trace and gradient-norm regularizers reduce the curvature around the "
        "optimum a lot, yet generalize worse than SAM; Riemannian SAM slightly beats SAM on test accuracy.",
        "",
        f"- Command: `OMP_NUM_THREADS=1 {cmd}`",
        f"- Machine: {platform.machine()} CPU, {os.cpu_count()} cores shared with other jobs, torch "
        f"{torch.__version__}, {torch.get_num_threads()} thread(s); accelerator `{args.accelerator}`",
        f"- Time: {sum(r['fit_s'] + r['measure_s'] for r in rows) / 60:.1f} min of training and measuring in "
        f"total (sum over the runs, which run one after another in one process; "
        f"{sum(r['fit_s'] for r in rows) / 60:.1f} min of it training); this invocation trained "
        f"{len(rows) - len(args.reused)} runs in {wall / 60:.1f} min wall (finished runs are reused)",
        f"- Data: {data}; augmentation {'on' if args.augment else 'off'}",
        f"- Network: `{args.backbone}` {args.backbone_kwargs} + frozen orthogonal `W ∘ BN` head; SGD lr {args.lr}, "
        f"momentum 0.9, weight decay 5e-4, cosine schedule, batch {args.batch_size}, **{args.epochs} epochs for "
        "every method** (matched epochs; SAM-type methods do two passes per step)",
        f"- Seeds: {seeds} (model init, head and data order); mean ± std (ddof 1) over seeds",
        "- Methods: " + "; ".join(f"{LABELS[m]} `{METHODS[m][0].__name__}({METHODS[m][1]})`" for m in methods),
        f"- Measured at the end on a fixed subset of {args.measure_batches} training batches of "
        f"{args.measure_batch_size} (plain CE, BN in eval mode): trace by Hutchinson ({args.probes} probes) at the "
        "trained weights (`trace`) and with the scale-invariant weights rescaled to unit norm (`trace_unit`); top "
        f"eigenvalue by Lanczos (≤ {args.lanczos_iter} products); gradient-norm width (BN in train mode, "
        f"batches of {args.batch_size}, unit-norm rescaling).",
        "",
        "| method | n | test acc (%) | train acc (%) | trace | trace (unit norm) | top eigenvalue | width | fit s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        s = stats[m]

        def pm(key, scale=1.0, fmt="{:.3g}", s=s):
            mean, std = s[key]
            return f"{fmt.format(mean * scale)} ± {fmt.format(std * scale)}"
        lines.append(f"| {LABELS[m]} | {s['n'][0]} | {pm('test_acc', 100, '{:.2f}')} | {pm('train_acc', 100, '{:.2f}')} "
                     f"| {pm('trace')} | {pm('trace_unit')} | {pm('eig1')} | {pm('width')} | {s['fit_s'][0]:.0f} |")
    lines += ["", "A difference *exceeds the seed spread* when |Δ mean| > std(a) + std(b) (the ±1 std intervals "
              "do not overlap).", ""]
    if "sgd" in methods:
        lines += comparison_lines(stats, "sgd", methods) + [""]
    if "sam" in methods:
        lines += comparison_lines(stats, "sam", methods) + [""]
    lines += [f"![test accuracy and trace]({png.name})", "", "## Against the claim", ""]
    lines += verdict(stats, methods)
    lines += ["", "Per-run numbers: [sharpness_study.csv](sharpness_study.csv).", "",
              "## CIFAR-10 (commands for a GPU; not run here)", "",
              "```bash",
              "python experiments/sharpness_study.py --data cifar10 --data-dir data --backbone resnet20 \\",
              "    --backbone-kwargs '{\"width\": 16}' --num-train 0 --epochs 100 --batch-size 128 --lr 0.1 \\",
              "    --augment --seeds 0 1 2 --accelerator gpu --measure-batches 10 --measure-batch-size 500 \\",
              "    --run-dir runs/sharpness_cifar --out docs/sharpness_study_cifar.md",
              "```", ""]
    out.write_text("\n".join(lines))


def verdict(stats: dict, methods: list[str]) -> list[str]:
    out = []

    def cmp(a, b, key):
        (ma, sa), (mb, sb) = stats[a][key], stats[b][key]
        return ma - mb, abs(ma - mb) > sa + sb

    if {"sam", "trace", "gradnorm", "sgd"} <= set(methods):
        for pen in ("trace", "gradnorm"):
            d_tr, big_tr = cmp(pen, "sgd", "trace")
            d_acc, big_acc = cmp(pen, "sam", "test_acc")
            d_unit, big_unit = cmp(pen, "sgd", "trace_unit")
            d_eig, big_eig = cmp(pen, "sgd", "eig1")
            out.append(f"- {LABELS[pen]}: trace {'lower' if d_tr < 0 else 'higher'} than SGD by {abs(d_tr):.3g} "
                       f"({'beyond' if big_tr else 'within'} the seed spread), top eigenvalue "
                       f"{'lower' if d_eig < 0 else 'higher'} by {abs(d_eig):.3g} ({'beyond' if big_eig else 'within'} "
                       f"the spread); at unit-norm scale-invariant weights the trace is "
                       f"{'lower' if d_unit < 0 else 'higher'} than SGD's by {abs(d_unit):.3g} "
                       f"({'beyond' if big_unit else 'within'} the spread). Test accuracy "
                       f"{'below' if d_acc < 0 else 'above'} SAM by {abs(d_acc) * 100:.2f} pp "
                       f"({'beyond' if big_acc else 'within'} the seed spread).")
        out.append("- With BN after every hidden layer the network is invariant to the scale of those weights, "
                   "and the Hessian with respect to a weight scaled by c scales by 1/c²: a penalty can lower the "
                   "raw trace by growing the weights without changing the function. The unit-norm column removes "
                   "that freedom; compare it with the raw trace before reading a lower trace as a flatter function.")
    if {"rsam", "sam"} <= set(methods):
        d, big = cmp("rsam", "sam", "test_acc")
        out.append(f"- Riemannian SAM vs SAM: {d * 100:+.2f} pp test accuracy "
                   f"({'beyond' if big else 'within'} the seed spread).")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=("fashion", "cifar10"), default="fashion")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--num-train", type=int, default=10000, help="training subset size (0: all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--augment", action="store_true")
    p.add_argument("--backbone", default="mlp")
    p.add_argument("--backbone-kwargs", default='{"width": 128, "depth": 2}')
    p.add_argument("--probes", type=int, default=32)
    p.add_argument("--lanczos-iter", type=int, default=30)
    p.add_argument("--measure-batches", type=int, default=4)
    p.add_argument("--measure-batch-size", type=int, default=500)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--run-dir", default="runs/sharpness_study")
    p.add_argument("--out", default="docs/sharpness_study.md")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "runs.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    done = {(r["method"], r["seed"]) for r in rows}
    dm = make_data(args)
    start = time.perf_counter()
    for seed in args.seeds:
        for method in args.methods:
            if (method, seed) in done:
                continue
            row = train_one(method, seed, dm, args)
            print(json.dumps(row), flush=True)
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
    rows = [r for r in rows if r["method"] in args.methods and r["seed"] in args.seeds]
    args.reused = [r for r in rows if (r["method"], r["seed"]) in done]
    write_report(rows, args, args.methods, time.perf_counter() - start, Path(args.out))


if __name__ == "__main__":
    main()
