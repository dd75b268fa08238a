"""The discounted loss against its relatives: plain CE, L2-softmax, CosFace and ArcFace heads.

One command re-runs the whole comparison and writes its section of ``docs/results.md`` (between
``<!-- heads:begin -->`` and ``<!-- heads:end -->``), the figure ``docs/heads_margins.png`` and the
per-run records ``docs/heads_runs.json``::

    python experiments/heads.py                      # digits + Fashion-MNIST, seeds 0 1 2
    python experiments/heads.py --datasets digits    # the offline default only

Every method is a ``MarginClassifier`` with the same backbone, optimizer, schedule and data; only
the head (``model.head``) and the gap differ:

* plain CE: ``head: linear`` — a trainable ``W z + b`` on the raw features, no BN in the head,
  no gap (ordinary cross-entropy);
* discounted: ``head: margin`` — ``W ∘ BN(affine=False)`` with ``W`` frozen, every object's gap
  set to ``--gap``;
* L2-softmax, CosFace, ArcFace: ``head: l2_softmax|cosface|arcface`` with the ``head_kwargs`` in
  :data:`METHODS`, no per-object gap (their own margin only).

Measured at the end of training: test accuracy, NLL and ECE (15 bins); the training margins
``f_y − max_{j≠y} f_j`` (eval mode, un-augmented) divided by the head's logit scale
``mean_j‖w_j‖ · RMS_i‖h_i‖`` (``Head.logit_scale``; ``s`` for the cosine heads); the Hessian trace
(Hutchinson, BN in eval mode) and the gradient-norm width (BN-fed weights and the cosine heads'
``W`` rescaled to unit norm) of each method's own training criterion on a fixed set of training
objects.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch.utils.data import DataLoader, Subset

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from callbacks import (  # noqa: E402
    collect_margins,
    gradient_norm_width,
    hessian_trace,
    scale_invariant_parameters,
)
from datamodules import DigitsDataModule, GapDataModule, Split  # noqa: E402
from lightning_app.ensemble import ensemble_metrics  # noqa: E402
from marginboost import collect_logits  # noqa: E402
from models import MarginClassifier  # noqa: E402

BEGIN, END = "<!-- heads:begin -->", "<!-- heads:end -->"

# name -> MarginClassifier head arguments; "gap" is replaced by --gap for the discounted loss.
METHODS: dict[str, dict[str, Any]] = {
    "plain CE": {"head": "linear"},
    "discounted": {"head": "margin", "gap": True},
    "L2-softmax": {"head": "l2_softmax", "head_kwargs": {"alpha": 16.0}},
    "CosFace": {"head": "cosface", "head_kwargs": {"s": 30.0, "m": 0.35}},
    "ArcFace": {"head": "arcface", "head_kwargs": {"s": 30.0, "m": 0.5}},
}


def fashion_datamodule(num_train: int, batch_size: int) -> GapDataModule:
    """Fashion-MNIST with a class-balanced training subset of ``num_train`` objects (fixed seed)."""
    from datamodules import FashionMNISTDataModule

    class FashionSubset(FashionMNISTDataModule):
        def load(self) -> tuple[Split, Split, Split]:
            train, val, test = super().load()
            gen = torch.Generator().manual_seed(0)
            per_class = num_train // self.num_classes
            keep = torch.cat([torch.nonzero(train.y == k).flatten()[
                torch.randperm(int((train.y == k).sum()), generator=gen)[:per_class]]
                for k in range(self.num_classes)]).sort().values
            return Split(train.x[keep].contiguous(), train.y[keep].contiguous()), val, test

    return FashionSubset(batch_size=batch_size, eval_batch_size=1000)


def head_criterion(model: MarginClassifier) -> Callable:
    """The model's own training criterion ``(logits, batch) -> loss`` (head loss with the gaps)."""
    return lambda logits, batch: model.head.loss(logits, batch["y"], batch.get("gap", 0.0))


def measurement_batches(dm: GapDataModule, num: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """``num`` training objects (fixed seed, un-augmented, with their gaps) in batches."""
    dataset = dm.train_eval_dataloader().dataset
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:num]
    return list(DataLoader(Subset(dataset, keep.tolist()), batch_size=batch_size))


@torch.no_grad()
def train_features(model: MarginClassifier, dm: GapDataModule) -> torch.Tensor:
    model.eval()
    return torch.cat([model.backbone(b["x"]) for b in dm.train_eval_dataloader()])


def run_one(dm: GapDataModule, method: str, seed: int, epochs: int, gap: float, probes: int,
            num_measure: int) -> dict[str, Any]:
    spec = METHODS[method]
    L.seed_everything(seed, workers=True, verbose=False)
    model = MarginClassifier(
        num_classes=dm.num_classes, input_shape=dm.input_shape, backbone="small_cnn",
        backbone_kwargs={"width": 16}, head=spec["head"], head_kwargs=spec.get("head_kwargs"),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs))
    g = gap if spec.get("gap") else 0.0
    dm.set_gaps(torch.full((dm.num_train,), g))
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    started = time.perf_counter()
    trainer.fit(model, dm)
    fit_s = time.perf_counter() - started
    model.eval()
    test_logits, test_y = collect_logits(model, dm.test_dataloader(), len(dm.test_dataloader().dataset))
    metrics = ensemble_metrics([test_logits], test_y)
    train_margins = collect_margins(model, dm.train_eval_dataloader(), dm.num_train)
    scale = float(model.head.logit_scale(train_features(model, dm)))
    criterion = head_criterion(model)
    batches = measurement_batches(dm, num_measure, 128)
    trace = hessian_trace(model, criterion, batches, probes=probes, seed=seed, per_layer=False)
    invariant = list(scale_invariant_parameters(model, criterion, batches[0]))
    if hasattr(model.head, "raw_weight"):  # normalised in forward: L(cW) = L(W)
        invariant.append("head.raw_weight")
    width = gradient_norm_width(model, criterion, batches, scale_invariant=invariant)
    return {"method": method, "head": spec["head"], "head_kwargs": spec.get("head_kwargs") or {}, "gap": g,
            "seed": seed, "epochs": epochs, "fit_s": fit_s, "test_acc": metrics["boosted_acc"],
            "test_nll": metrics["boosted_nll"], "test_ece": metrics["boosted_ece"],
            "hessian_trace": trace.value, "hessian_trace_stderr": trace.stderr, "width": width.value,
            "logit_scale": scale, "train_acc": float((train_margins > 0).float().mean()),
            "normalised_margins": (train_margins / scale).tolist()}


# -- report ------------------------------------------------------------------------------------

def _mean_std(values: list[float], digits: int = 3) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def _quantile(values: list[float], q: float) -> float:
    return float(torch.tensor(values).quantile(q))


def table(runs: list[dict[str, Any]]) -> str:
    rows = ["| method | head | test acc | test NLL | test ECE | Hessian trace | width | train acc "
            "| norm. margin q10 / median | logit scale | fit s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        q10 = [_quantile(r["normalised_margins"], 0.1) for r in rs]
        med = [_quantile(r["normalised_margins"], 0.5) for r in rs]
        name = f"{method} (g = {rs[0]['gap']:g})" if rs[0]["gap"] else method
        kw = ", ".join(f"{k}={v:g}" for k, v in rs[0]["head_kwargs"].items())
        rows.append(
            f"| {name} | `{rs[0]['head']}`{' ' + kw if kw else ''} | {_mean_std([r['test_acc'] for r in rs])} "
            f"| {_mean_std([r['test_nll'] for r in rs])} | {_mean_std([r['test_ece'] for r in rs])} "
            f"| {_mean_std([r['hessian_trace'] for r in rs], 1)} | {_mean_std([r['width'] for r in rs], 3)} "
            f"| {_mean_std([r['train_acc'] for r in rs])} | {statistics.mean(q10):.3f} / {statistics.mean(med):.3f} "
            f"| {_mean_std([r['logit_scale'] for r in rs], 2)} | {statistics.mean([r['fit_s'] for r in rs]):.1f} |")
    return "\n".join(rows)


def findings(runs: list[dict[str, Any]]) -> str:
    """What the numbers say about the claim "the discounted loss leaves only wide minima"."""
    def mean_of(method: str, key: str) -> float:
        return statistics.mean(r[key] for r in runs if r["method"] == method)

    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    lines = []
    for key, label in (("hessian_trace", "Hessian trace"), ("width", "gradient-norm width")):
        order = sorted(methods, key=lambda m: mean_of(m, key))
        rank = order.index("discounted") + 1 if "discounted" in order else None
        lines.append(f"- Lowest mean {label}: {order[0]}; the discounted loss ranks {rank} of {len(order)} "
                     f"({', '.join(f'{m} {mean_of(m, key):.3g}' for m in order)}).")
    best = max(methods, key=lambda m: mean_of(m, "test_acc"))
    lines.append(f"- Highest mean test accuracy: {best} ({mean_of(best, 'test_acc'):.3f}).")
    return "\n".join(lines)


def margin_figure(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Empirical CDFs of the normalised training margins, one panel per data set, seeds pooled."""
    fig = Figure(figsize=(5.2 * len(results), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, (dataset, runs) in zip(axes, results.items()):
        for method in METHODS:
            values = [v for r in runs if r["method"] == method for v in r["normalised_margins"]]
            if not values:
                continue
            x = torch.tensor(values).sort().values
            ax.plot(x.numpy(), (torch.arange(1, len(x) + 1) / len(x)).numpy(), label=method)
        ax.axvline(0.0, color="0.6", lw=0.8)
        ax.set_title(f"{dataset}: training margins / logit scale")
        ax.set_xlabel("(f_y − max_{j≠y} f_j) / (mean_j‖w_j‖ · RMS‖h‖)")
        ax.set_ylabel("fraction of training objects ≤ x")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def write_section(path: Path, body: str) -> None:
    """Replace the text between the markers in ``path`` (created, or the section appended)."""
    section = f"{BEGIN}\n{body.rstrip()}\n{END}"
    text = path.read_text() if path.exists() else "# Results\n\nSections written by the experiment scripts.\n"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "fashion"], choices=["digits", "fashion"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--digits-epochs", type=int, default=15)
    parser.add_argument("--fashion-epochs", type=int, default=5)
    parser.add_argument("--fashion-train", type=int, default=6000, help="class-balanced training subset")
    parser.add_argument("--gap", type=float, default=2.0, help="the discounted loss's fixed gap (logit units)")
    parser.add_argument("--probes", type=int, default=8, help="Hutchinson probes for the Hessian trace")
    parser.add_argument("--measure-objects", type=int, default=256, help="training objects for trace and width")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--figure", type=Path, default=REPO / "docs" / "heads_margins.png")
    parser.add_argument("--records", type=Path, default=REPO / "docs" / "heads_runs.json")
    parser.add_argument("--raw", type=Path, default=REPO / "runs" / "heads" / "results.pt",
                        help="everything measured, margins included (re-read by --report-only)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the section, figure and records from --raw without training")
    args = parser.parse_args(argv)
    command = "python experiments/heads.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.report_only:
        saved = torch.load(args.raw, weights_only=False)
        return report(saved["args"], saved["results"], saved["settings"], saved["wall"], saved["command"])
    torch.set_num_threads(1)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|does not have many workers).*")
    started = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    settings = {}
    for dataset in args.datasets:
        if dataset == "digits":
            dm, epochs = DigitsDataModule(batch_size=64), args.digits_epochs
            settings[dataset] = (f"scikit-learn digits, {epochs} epochs, batch 64, 1438 training / 359 test "
                                 "objects (digits has no separate test split: the held-out split)")
        else:
            dm, epochs = fashion_datamodule(args.fashion_train, 64), args.fashion_epochs
            settings[dataset] = (f"Fashion-MNIST, {epochs} epochs, batch 64, a class-balanced subset of "
                                 f"{args.fashion_train} training objects, the official 10 000 test objects")
        dm.setup("fit")
        runs = results[dataset] = []
        for method in args.methods:
            for seed in args.seeds:
                r = run_one(dm, method, seed, epochs, args.gap, args.probes, args.measure_objects)
                runs.append(r)
                print(f"{dataset:8s} {method:11s} seed {seed}: acc {r['test_acc']:.4f} nll {r['test_nll']:.3f} "
                      f"ece {r['test_ece']:.3f} trace {r['hessian_trace']:.1f} width {r['width']:.3f} "
                      f"fit {r['fit_s']:.1f}s", flush=True)
    wall = time.perf_counter() - started
    args.raw.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"args": args, "results": results, "settings": settings, "wall": wall, "command": command},
               args.raw)
    report(args, results, settings, wall, command)


def report(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]], settings: dict[str, str],
           wall: float, command: str) -> None:
    """The figure, the per-run records and the section of ``docs/results.md``."""
    for path in (args.results, args.figure, args.records):
        path.parent.mkdir(parents=True, exist_ok=True)
    margin_figure(results, args.figure)
    args.records.write_text(json.dumps({d: [{k: v for k, v in r.items() if k != "normalised_margins"} for r in rs]
                                        for d, rs in results.items()}, indent=1))
    body = [
        "## Heads: the discounted loss against plain CE, L2-softmax, CosFace and ArcFace",
        "",
        f"Written by `{command.strip()}` on {platform.machine()} "
        f"({torch.get_num_threads()} torch thread; a 2-core CPU shared with other jobs), "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; wall time {wall / 60:.1f} min for everything "
        "below. Backbone `small_cnn` (width 16), SGD (lr 0.05, momentum 0.9, weight decay 5e-4), cosine "
        f"schedule; seeds {', '.join(map(str, args.seeds))}; values are mean ± std over seeds. "
        f"Per-run records: `{args.records.relative_to(REPO) if args.records.is_relative_to(REPO) else args.records}`.",
        "",
        "Methods: *plain CE* is `head: linear` (trainable `W z + b` on the backbone features, no BN in the "
        f"head, no gap); *discounted* is the default `head: margin` (frozen orthogonal `W` after "
        f"`BN(affine=False)`) with every gap = {args.gap:g}; the others use their own margin and no gap. "
        "Margins are measured on the eval-mode training logits each head produces and divided by the "
        "head's logit scale `mean_j‖w_j‖ · RMS_i‖h_i‖` (`s` for CosFace/ArcFace). Hessian trace: "
        f"Hutchinson, {args.probes} probes, BN in eval mode; width: mean gradient norm over 128-object "
        "batches with BN-fed weights (and the cosine heads' `W`) at unit norm; both on the method's own "
        f"training criterion over the same {args.measure_objects} training objects. Trace and width depend "
        "on each head's logit scale (a larger `s` means a larger curvature of the same classifier), so across "
        "heads they compare the minima the methods reach *as trained*, not a scale-free sharpness.",
        "",
    ]
    for dataset, runs in results.items():
        body += [f"### {dataset}", "", settings[dataset] + ".", "", table(runs), "", findings(runs), ""]
    fig_rel = args.figure.relative_to(REPO / "docs") if args.figure.is_relative_to(REPO / "docs") else args.figure
    body += [f"![normalised training margins]({fig_rel})", "",
             "Figure: empirical CDF of the normalised training margins (seeds pooled)."]
    write_section(args.results, "\n".join(body))
    print(f"wrote {args.results}, {args.figure}, {args.records} ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
