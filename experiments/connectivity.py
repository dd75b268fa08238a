"""Mode-connectivity study: max accuracy loss along paths between independently trained MLPs.

One command trains the endpoint MLPs ``784 → h → 10`` (ReLU) on Fashion-MNIST for every hidden width
and prior, connects every pair of endpoints (different seeds) with six methods — linear and arc,
each plain, after weight matching and after optimal transport — evaluates each path on a grid of
t, and writes ``docs/connectivity.md`` (tables in the seed's layout beside the seed's table),
``docs/connectivity.json`` (every record) and ``docs/connectivity.png`` (max accuracy loss vs width).

    python experiments/connectivity.py                       # the documented run
    python experiments/connectivity.py --widths 10 50 --seeds 2 --epochs 1 --out /tmp/c  # smoke

Endpoints of one (width, prior) are independent jobs (seed = their only input); the script trains
them in sequence. Max accuracy loss is ``max_t ½(acc(0)+acc(1)) − acc(t)`` on the test set, in
percentage points (mean ± std over endpoint pairs).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules import FashionMNISTDataModule  # noqa: E402
from models.connectivity import (  # noqa: E402
    align_activations,
    align_ot,
    align_weights,
    evaluate_path,
    make_path,
    parameters_of,
    path_metrics,
    t_grid,
)

METHODS = {  # table row -> (path kind, alignment)
    "Linear": ("linear", "none"),
    "Arc": ("arc", "none"),
    "Linear + Weight Adjustment": ("linear", "weights"),
    "Arc + Weight Adjustment": ("arc", "weights"),
    "Linear + OT": ("linear", "ot"),
    "Arc + OT": ("arc", "ot"),
    "Linear + Activation matching": ("linear", "activations"),  # not in the seed's table; opt-in
}
DEFAULT_METHODS = list(METHODS)[:6]  # the seed's six; add "Linear + Activation matching" by name
PRIORS = ("none", "dropout", "gauss")
PRIOR_TITLES = {"none": "without prior", "dropout": "dropout 0.5", "gauss": "Gaussian prior (weight decay)"}

SEED_WIDTHS = [10, 50, 100, 500, 1000, 2000]
SEED_TABLE = {  # the seed study's table (MNIST, without prior), from the issue
    "Linear": [45.74, 24.35, 10.83, 4.84, 3.83, 4.17],
    "Arc": [35.94, 21.58, 9.53, 4.21, 3.39, 2.98],
    "Linear + Weight Adjustment": [17.3, 5.91, 3.79, 2.46, 2.24, 2.11],
    "Arc + Weight Adjustment": [17.11, 5.77, 3.71, 2.43, 2.23, 2.11],
    "Linear + OT": [12.92, 4.02, 2.86, 2.38, 2.11, 2.24],
    "Arc + OT": [13.77, 4.81, 3.5, 2.59, 2.36, 2.37],
}
SEED_DROPOUT_LINEAR = [41.21, 14.17, 9.68, 3.57, 3.1, 2.75]


def load_fashion_mnist(data_dir: str | None) -> tuple[torch.Tensor, ...]:
    """Fashion-MNIST through ``datamodules.FashionMNISTDataModule`` as flat, standardised tensors.

    The whole training set (60,000) and the test set (10,000) are held in memory: MLP epochs over
    in-memory tensors are several times faster on a CPU than a DataLoader of per-sample dicts.
    """
    train, _, test = FashionMNISTDataModule(data_dir=data_dir, download=False).load()
    xtr = train.x.float().div_(255).flatten(1)
    xte = test.x.float().div_(255).flatten(1)
    mean, std = xtr.mean(), xtr.std()  # statistics of the training set only
    return (xtr - mean) / std, train.y, (xte - mean) / std, test.y


def mlp(width: int, dropout: float) -> nn.Sequential:
    """The seed's network: 784 → width → 10 with ReLU (dropout on the hidden units if > 0)."""
    layers: list[nn.Module] = [nn.Linear(784, width), nn.ReLU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(width, 10))


def train_endpoint(width: int, prior: str, seed: int, data, args) -> tuple[nn.Module, float]:
    """One endpoint: its own seed for the initialisation and the data order."""
    xtr, ytr = data[0], data[1]
    torch.manual_seed(seed)
    model = mlp(width, 0.5 if prior == "dropout" else 0.0)
    wd = args.gauss_weight_decay if prior == "gauss" else 0.0
    # Adam with coupled L2 (weight_decay adds λθ to the gradient): the MAP estimate under N(0, 1/λ).
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=wd)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(ytr), generator=gen)
        for i in range(0, len(order), args.batch_size):
            idx = order[i: i + args.batch_size]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return model, time.perf_counter() - start


def batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i: i + size], y[i: i + size]) for i in range(0, len(y), size)]


def run(args) -> dict:
    data = load_fashion_mnist(args.data_dir)
    xtr, ytr, xte, yte = data
    sub = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(12345))[: args.train_eval]
    loaders = {"train": batches(xtr[sub], ytr[sub], 2000), "test": batches(xte, yte, 2000)}
    ts = t_grid(args.grid)
    results = {"config": vars(args), "records": [], "endpoints": []}
    for prior in args.priors:
        for width in args.widths:
            models = []
            for seed in range(args.seeds):
                model, secs = train_endpoint(width, prior, args.seed0 + seed, data, args)
                models.append(model)
                end = evaluate_path(model, make_path("linear", parameters_of(model), parameters_of(model)),
                                    loaders, [0.0])[0]
                results["endpoints"].append({"prior": prior, "width": width, "seed": args.seed0 + seed,
                                             "train_seconds": secs, **{k: v for k, v in end.items() if k != "t"}})
                print(f"[{time.strftime('%H:%M:%S')}] endpoint prior={prior} width={width} seed={args.seed0 + seed}"
                      f" test_acc={end['test_acc']:.4f} ({secs:.1f}s)", flush=True)
            for ia, ib in itertools.combinations(range(args.seeds), 2):
                a, b = models[ia], models[ib]
                aligned = {"none": b}
                t0 = time.perf_counter()
                aligned["weights"] = align_weights(a, b)[0]
                t1 = time.perf_counter()
                aligned["ot"] = align_ot(a, b)[0]
                t2 = time.perf_counter()
                if any(METHODS[m][1] == "activations" for m in args.methods):
                    aligned["activations"] = align_activations(a, b, loaders["train"])[0]
                for method in args.methods:
                    kind, alignment = METHODS[method]
                    path = make_path(kind, parameters_of(a), parameters_of(aligned[alignment]))
                    recs = evaluate_path(a, path, loaders, ts)
                    tt = [r["t"] for r in recs]
                    row = {"prior": prior, "width": width, "pair": [args.seed0 + ia, args.seed0 + ib],
                           "method": method, "curve": recs,
                           "align_seconds": {"weights": t1 - t0, "ot": t2 - t1}.get(alignment, 0.0)}
                    for split in loaders:
                        m = path_metrics(tt, [r[f"{split}_loss"] for r in recs], [r[f"{split}_acc"] for r in recs])
                        row.update({f"{split}_{k}": v for k, v in m.items()})
                    results["records"].append(row)
                    print(f"[{time.strftime('%H:%M:%S')}]   pair {ia}-{ib} {method:28s} "
                          f"max_acc_loss={row['test_max_acc_loss']:6.2f} barrier={row['test_loss_barrier']:.3f}",
                          flush=True)
    return results


def summarize(results: dict, prior: str, method: str, width: int, key: str = "test_max_acc_loss") -> tuple[float, float, int]:
    vals = [r[key] for r in results["records"] if r["prior"] == prior and r["method"] == method and r["width"] == width]
    if not vals:
        return float("nan"), float("nan"), 0
    arr = np.asarray(vals)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, len(arr)


def table(results: dict, prior: str, key: str = "test_max_acc_loss") -> str:
    widths = results["config"]["widths"]
    lines = [f"| {PRIOR_TITLES[prior]} | " + " | ".join(str(w) for w in widths) + " |",
             "|---|" + "---|" * len(widths)]
    for method in results["config"]["methods"]:
        cells = []
        for w in widths:
            mean, std, n = summarize(results, prior, method, w, key)
            cells.append(f"{mean:.2f} ± {std:.2f}" if n else "—")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def endpoint_table(results: dict) -> str:
    widths = results["config"]["widths"]
    lines = ["| endpoint test accuracy (%) | " + " | ".join(str(w) for w in widths) + " |",
             "|---|" + "---|" * len(widths)]
    for prior in results["config"]["priors"]:
        cells = []
        for w in widths:
            accs = np.asarray([e["test_acc"] for e in results["endpoints"] if e["prior"] == prior and e["width"] == w])
            cells.append(f"{100 * accs.mean():.2f} ± {100 * accs.std(ddof=1):.2f}" if len(accs) > 1 else "—")
        lines.append(f"| {PRIOR_TITLES[prior]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_table() -> str:
    lines = ["| without prior | " + " | ".join(str(w) for w in SEED_WIDTHS) + " |",
             "|---|" + "---|" * len(SEED_WIDTHS)]
    for method, vals in SEED_TABLE.items():
        lines.append(f"| {method} | " + " | ".join(f"{v:g}" for v in vals) + " |")
    lines.append("")
    lines.append("With dropout 0.5, Linear: " + " / ".join(f"{v:g}" for v in SEED_DROPOUT_LINEAR) + ".")
    return "\n".join(lines)


def figure(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    priors = results["config"]["priors"]
    fig = Figure(figsize=(5.2 * len(priors), 4.2), layout="constrained")
    axes = fig.subplots(1, len(priors), squeeze=False)[0]
    widths = results["config"]["widths"]
    for ax, prior in zip(axes, priors):
        for method in results["config"]["methods"]:
            stats = [summarize(results, prior, method, w) for w in widths]
            ax.errorbar(widths, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3,
                        label=method, linestyle="--" if method.startswith("Arc") else "-")
        if prior == "none":
            ax.plot(SEED_WIDTHS, SEED_TABLE["Linear"], color="grey", linestyle=":", marker="x",
                    label="seed: Linear (MNIST)")
        ax.set_xscale("log")
        ax.set_xlabel("hidden width h")
        ax.set_ylabel("max accuracy loss along the path (points)")
        ax.set_title(f"Fashion-MNIST, MLP 784→h→10\n{PRIOR_TITLES[prior]}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)


def runs_of(results: dict) -> list[dict]:
    """The runs behind a results file: ``command``, ``wall_seconds``, ``machine``, ``priors``."""
    if "runs" in results:
        return results["runs"]
    return [{k: results[k] for k in ("command", "wall_seconds", "machine")}
            | {"priors": results["config"]["priors"], "widths": results["config"]["widths"]}]


def merge(parts: list[dict]) -> dict:
    """Results of several runs over other priors or widths (same seeds and settings) as one."""
    first = parts[0]["config"]
    same = ("methods", "seeds", "seed0", "epochs", "lr", "batch_size", "grid", "train_eval")
    for part in parts[1:]:
        diff = [k for k in same if part["config"][k] != first[k]]
        if diff:
            raise SystemExit(f"error: --from-json: runs differ in {diff}; allowed: runs that differ only in "
                             "--priors and --widths")
    priors = [p for p in PRIORS if any(p in part["config"]["priors"] for part in parts)]
    widths = sorted({w for part in parts for w in part["config"]["widths"]})
    config = dict(first, priors=priors, widths=widths)
    config["gauss_weight_decay"] = next((part["config"]["gauss_weight_decay"] for part in parts
                                         if "gauss" in part["config"]["priors"]), first["gauss_weight_decay"])
    return {"config": config, "records": [r for part in parts for r in part["records"]],
            "endpoints": [e for part in parts for e in part["endpoints"]],
            "runs": [run for part in parts for run in runs_of(part)]}


def findings(results: dict) -> list[str]:
    """What the tables say, computed from them (means over pairs)."""
    cfg = results["config"]
    widths, priors = cfg["widths"], cfg["priors"]
    mean = {(p, m, w): summarize(results, p, m, w)[0] for p in priors for m in cfg["methods"] for w in widths}
    out = []
    aligned = [m for m in cfg["methods"] if m not in ("Linear", "Arc")]
    for p in priors:
        if "Linear" not in cfg["methods"] or not aligned:
            break
        cells = []
        have = [w for w in widths if summarize(results, p, "Linear", w)[2]]
        for w in (have[0], have[-1]):
            best = min(aligned, key=lambda m: mean[(p, m, w)])
            cells.append(f"h = {w}: Linear {mean[(p, 'Linear', w)]:.2f} → {best} {mean[(p, best, w)]:.2f}")
        out.append(f"- Alignment, {PRIOR_TITLES[p]}: " + "; ".join(cells) + " points.")
    if {"Linear", "Arc"} <= set(cfg["methods"]):
        diffs = [(mean[(p, "Linear", w)] - mean[(p, "Arc", w)], p, w) for p in priors for w in widths
                 if summarize(results, p, "Arc", w)[2]]
        lower = sum(d > 0 for d, _, _ in diffs)
        big = max(diffs, key=lambda d: abs(d[0]))
        out.append(f"- Arc vs Linear without alignment: the arc has the lower max accuracy loss in {lower} of "
                   f"{len(diffs)} cells; the largest difference is {big[0]:+.2f} points (Linear − Arc, "
                   f"{PRIOR_TITLES[big[1]]}, h = {big[2]}). The seed's arc was lower than its line at every width.")
        out.append("- After alignment the arc's loss barrier is larger than the line's while its accuracy loss "
                   "is about the same. A likely reason (not measured separately): with θ_A ≈ θ_B and μ = 0, "
                   "ψ(½) ≈ √2·θ_A, and a two-layer ReLU net with every weight and bias scaled by √2 has "
                   "its logits scaled by about 2 (exactly 2 without the output bias) — nearly the same "
                   "predictions, over-confident probabilities.")
    for prior in [p for p in priors if p != "none"]:
        if "none" not in priors or "Linear" not in cfg["methods"]:
            break
        cells = [f"h = {w}: {mean[('none', 'Linear', w)]:.2f} vs {mean[(prior, 'Linear', w)]:.2f}" for w in widths
                 if summarize(results, prior, "Linear", w)[2] and summarize(results, "none", "Linear", w)[2]]
        title = PRIOR_TITLES[prior][0].upper() + PRIOR_TITLES[prior][1:]
        out.append(f"- {title} vs no prior, Linear (points): " + "; ".join(cells) + ".")
    if "none" in priors and "Linear" in cfg["methods"]:
        common = [w for w in widths if w in SEED_WIDTHS]
        cells = [f"h = {w}: {mean[('none', 'Linear', w)]:.2f} (seed {SEED_TABLE['Linear'][SEED_WIDTHS.index(w)]:g})"
                 for w in common]
        out.append("- Linear without prior against the seed's MNIST numbers (another data set, other training): "
                   + "; ".join(cells) + ".")
    return out


def write_markdown(results: dict, out: Path, figure_name: str) -> None:
    cfg = results["config"]
    runs = runs_of(results)
    n_pairs = cfg["seeds"] * (cfg["seeds"] - 1) // 2
    left_out = [w for w in SEED_WIDTHS if w not in cfg["widths"]]
    parts = [
        "# Mode connectivity of MLPs on Fashion-MNIST",
        "",
        "*Written by `experiments/connectivity.py`; do not edit by hand.*",
        "",
        "Are two independently trained MLPs `784 → h → 10` (ReLU) connected by a path of low loss, and "
        "from which hidden width on? Each cell is the **max accuracy loss along the path**, "
        "`max_t ½(acc(0)+acc(1)) − acc(t)` on the 10,000 test images, in percentage points, as mean ± std "
        f"over {n_pairs} pairs of endpoints (all pairs of {cfg['seeds']} seeds: "
        f"{', '.join(str(cfg['seed0'] + s) for s in range(cfg['seeds']))}) on a grid of {cfg['grid']} values of t.",
        "",
        "Methods: linear `ψ(t) = (1−t)θ_A + tθ_B`; arc `ψ(t) = μ + cos(πt/2)(θ_A−μ) + sin(πt/2)(θ_B−μ)` "
        "with μ = 0 (the mean of PyTorch's initialisation and of the Gaussian prior); "
        "\"Weight Adjustment\" = weight matching of B's hidden units to A's (`models.align_weights`: "
        "linear assignment on incoming and outgoing weights, coordinate descent); "
        "OT = exact optimal transport (EMD, POT) between hidden units on their incoming weights "
        "(`models.align_ot`); both give a permutation, so aligned B computes the same function as B. "
        "The library and its options: [mode_connectivity.md](mode_connectivity.md).",
        "",
        "## Our tables (Fashion-MNIST)",
        "",
    ]
    for prior in cfg["priors"]:
        parts += [table(results, prior), ""]
    parts += ["Loss barrier on the test set, `max_t L(t) − ((1−t)L(0) + tL(1))` (nats), same runs:", ""]
    for prior in cfg["priors"]:
        parts += [table(results, prior, "test_loss_barrier"), ""]
    parts += ["Endpoints:", "", endpoint_table(results), "",
              "## What the tables say", "", *findings(results), "",
              "## The seed's table (MNIST, from the issue)", "", seed_table(), "",
              f"![max accuracy loss vs width]({figure_name})", "",
              "## What ran", "",
              f"- Data: Fashion-MNIST from `{cfg['data_dir']}` (60,000 training, 10,000 test images, read by "
              "`datamodules.FashionMNISTDataModule` and held in memory as flat tensors), pixels "
              "standardised with the training mean and std. Training metrics in `connectivity.json` use a fixed "
              f"subset of {cfg['train_eval']} training images. MNIST (the seed's data set) cannot be downloaded "
              "on this machine and was not run.",
              f"- Endpoints: Adam (lr {cfg['lr']}), batch {cfg['batch_size']}, {cfg['epochs']} epochs, cross-entropy, "
              "seed = initialisation and data order; "
              f"priors: {', '.join(PRIOR_TITLES[p] for p in cfg['priors'])}"
              + (f" (λ = {cfg['gauss_weight_decay']} as Adam's coupled L2)" if "gauss" in cfg["priors"] else "") + ".",
              f"- Widths: {', '.join(str(w) for w in cfg['widths'])}."
              + (f" The seed also has {', '.join(str(w) for w in left_out)}; left out to keep the run within "
                 "the time of this machine." if left_out else "")
              + " A cell with — was not run (the runs below say which widths and priors each covered).",
              "- No curve was trained for the table (curve training is optional per method; "
              "`lightning fit --config connectivity_bezier.yaml` trains one).",
              ]
    for run in runs:
        parts.append(f"- Run ({', '.join(PRIOR_TITLES[p] for p in run['priors'])}; widths "
                     f"{', '.join(str(w) for w in run['widths'])}): `{run['command']}` — "
                     f"{run['wall_seconds'] / 60:.1f} min wall (training, alignment and evaluation) on {run['machine']}.")
    if len(runs) > 1:
        parts.append("- Merged into this page with `python experiments/connectivity.py --from-json <the runs' "
                     "connectivity.json files> --out docs`.")
    parts.append("")
    out.write_text("\n".join(parts))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--widths", type=int, nargs="+", default=[10, 50, 100, 500])
    p.add_argument("--priors", nargs="+", choices=PRIORS, default=["none", "dropout"])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS)
    p.add_argument("--seeds", type=int, default=3, help="endpoints per (width, prior); every pair is connected")
    p.add_argument("--seed0", type=int, default=0)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--gauss-weight-decay", type=float, default=1e-4)
    p.add_argument("--grid", type=int, default=21)
    p.add_argument("--train-eval", type=int, default=10000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs", help="directory for connectivity.md/.json/.png")
    p.add_argument("--from-json", nargs="+", default=None,
                   help="re-write table and figure from saved connectivity.json files (runs over other priors "
                        "are merged); no training")
    args = p.parse_args(argv)
    if args.from_json:
        parts = [json.loads(Path(f).read_text()) for f in args.from_json]
        results = merge(parts) if len(parts) > 1 else parts[0]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "connectivity.json").write_text(json.dumps(results, indent=1))
        figure(results, out / "connectivity.png")
        write_markdown(results, out / "connectivity.md", "connectivity.png")
        return
    if args.seeds < 2:
        p.error("--seeds: at least 2 (a path needs two endpoints)")
    if any(w < 1 for w in args.widths):
        p.error("--widths: positive integers")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python experiments/connectivity.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    results = run(args)
    wall = time.perf_counter() - start
    results["wall_seconds"] = wall
    results["command"] = command.strip()
    results["machine"] = (f"{platform.machine()} CPU ({os.cpu_count()} cores, shared), {torch.get_num_threads()} "
                          f"torch thread(s), torch {torch.__version__}, Python {platform.python_version()}")
    (out / "connectivity.json").write_text(json.dumps(results, indent=1))
    figure(results, out / "connectivity.png")
    write_markdown(results, out / "connectivity.md", "connectivity.png")
    print(f"wrote {out / 'connectivity.md'} in {wall / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
