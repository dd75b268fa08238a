"""Does margin boosting beat a deep ensemble? Boosted vs deep vs snapshot vs single, at equal compute.

For every run seed, on one data set and one backbone:

* ``boosted_<rule>``: the boosting orchestrator with a gap rule (``mean``, ``clipped``,
  ``normalized``, ``target``), T members of E epochs each;
* ``deep``: the same with ``NoGapRule`` (independent members: the deep ensemble);
* ``snapshot``: ``NoGapRule``, one cosine cycle of E epochs per member, member t warm-started from
  member t − 1 (``lightning_app.warm_start``);
* ``single``: one model trained for T·E epochs (cosine over all of them), for T = 2..5; T = 1 is
  the deep ensemble's first member (the same seed and configuration, hence the same model).

An ensemble run gives every T ≤ rounds: its first T members. Every member is scored on the test
set and on a held-out part of the training data (never trained on) used to fit a temperature.
The members' logits are saved, so the report is computed from them without training again.

Phases (``--phase``): ``train`` (skips runs already complete), ``report`` (writes the table
between the markers of ``docs/results.md`` and the figure), ``all`` (both).

    python experiments/boosting_vs_deep.py                    # the CPU study of docs/results.md
    python experiments/boosting_vs_deep.py --phase report     # tables and figure from saved logits
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
from torchmetrics.functional.classification import multiclass_calibration_error  # noqa: E402

from datamodules import (  # noqa: E402
    CIFAR10DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    GapDataModule,
    MNISTDataModule,
    Split,
)
from lightning_app import (  # noqa: E402
    BoostingOrchestrator,
    ClippedGapRule,
    MeanGapRule,
    NoGapRule,
    NormalizedGapRule,
    TargetGapRule,
    warm_start,
)
from lightning_app.run_dir import round_dir  # noqa: E402
from models import MarginClassifier  # noqa: E402

BEGIN, END = "<!-- boosting-vs-deep:begin -->", "<!-- boosting-vs-deep:end -->"
RULES = {
    "mean": lambda a: MeanGapRule(),
    "clipped": lambda a: ClippedGapRule(0.0, a.g_max),
    "normalized": lambda a: NormalizedGapRule(),
    "target": lambda a: TargetGapRule(a.tau),
}
DATA = {"fashion": FashionMNISTDataModule, "mnist": MNISTDataModule, "cifar10": CIFAR10DataModule,
        "digits": DigitsDataModule}
N_BINS = 15


# -- data: a fixed training subset and a held-out calibration set -------------------------------

class HeldOutSubset(GapDataModule):
    """A base data module's training set split (stratified, fixed seed) into a training subset
    and a held-out set for temperature scaling; validation and test sets are the base's.

    Args:
        base: the data module whose ``load()`` gives ``(train, val, test)``.
        train_size: objects to train on (``None``: all not held out).
        holdout_size: objects held out of training (for fitting temperatures).
        split_seed: seed of the split (the same for every method and run seed).
    """

    def __init__(self, base: GapDataModule, train_size: int | None, holdout_size: int, split_seed: int = 0,
                 **loader_kwargs) -> None:
        super().__init__(**loader_kwargs)
        self.base, self.train_size, self.holdout_size, self.split_seed = base, train_size, holdout_size, split_seed
        self.num_classes, self.input_shape = base.num_classes, base.input_shape
        self.pad, self.flip = base.pad, base.flip
        self.holdout: Split | None = None

    def prepare_data(self) -> None:
        self.base.prepare_data()

    def load(self) -> tuple[Split, Split, Split]:
        train, val, test = self.base.load()
        self.mean, self.std = self.base.mean, self.base.std  # some modules set them in load()
        y = train.y.numpy()
        rng = np.random.default_rng(self.split_seed)
        order = np.concatenate([rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)])
        # interleave the classes so that any prefix is stratified
        rank = np.empty(len(order))
        for c in np.unique(y):
            members = order[y[order] == c]
            rank[members] = np.arange(len(members)) / len(members)
        order = np.argsort(rank, kind="stable")
        hold = np.sort(order[: self.holdout_size])
        rest = order[self.holdout_size:]
        tr = np.sort(rest[: self.train_size] if self.train_size is not None else rest)
        self.holdout = Split(train.x[hold].contiguous(), train.y[hold].contiguous())
        return Split(train.x[tr].contiguous(), train.y[tr].contiguous()), val, test

    def holdout_dataloader(self):
        self._ensure_loaded()
        return self._loader(self._dataset(self.holdout, train=False), self.eval_batch_size, shuffle=False)


# -- training -------------------------------------------------------------------------------------

def make_datamodule(args) -> HeldOutSubset:
    kwargs = {} if args.data == "digits" else {"download": args.download}
    if args.data_dir is not None:
        kwargs["data_dir"] = args.data_dir
    base = DATA[args.data](**kwargs)
    return HeldOutSubset(base, args.train_size, args.holdout, batch_size=args.batch_size,
                         eval_batch_size=1000, device_resident=args.device_resident)


def model_factory(args, dm: HeldOutSubset, epochs: int):
    def make(t: int, seed: int) -> MarginClassifier:
        return MarginClassifier(
            num_classes=dm.num_classes, input_shape=dm.input_shape, backbone=args.backbone,
            backbone_kwargs={"width": args.width}, head_init="orthogonal", freeze_head=True,
            optimizer=lambda p: torch.optim.SGD(p, lr=args.lr, momentum=0.9, weight_decay=5e-4,
                                                nesterov=True),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs))
    return make


def trainer_factory(args, epochs: int):
    def make(t: int, rdir: Path) -> L.Trainer:
        return L.Trainer(max_epochs=epochs, accelerator=args.accelerator, devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(rdir),
                         precision=args.precision)
    return make


@torch.no_grad()
def logits_of(model: torch.nn.Module, loader, device: torch.device) -> tuple[Tensor, Tensor]:
    """Eval-mode fp32 logits and labels over an ordered loader."""
    model.eval().to(device)
    out, ys = [], []
    for batch in loader:
        out.append(model(batch["x"].to(device)).float().cpu())
        ys.append(batch["y"])
    return torch.cat(out), torch.cat(ys)


def run_method(args, dm: HeldOutSubset, method: str, seed: int, run_dir: Path) -> dict:
    """Train one run (if not done) and save its members' test and held-out logits."""
    done = run_dir / "logits.pt"
    if done.exists():
        return torch.load(done, weights_only=True)
    started = time.perf_counter()
    epochs, rounds, rule, factory = args.epochs, args.rounds, NoGapRule(), None
    if method.startswith("boosted_"):
        rule = RULES[method.removeprefix("boosted_")](args)
    elif method.startswith("single_"):
        epochs, rounds = args.epochs * int(method.removeprefix("single_")), 1
    factory = model_factory(args, dm, epochs)
    if method == "snapshot":
        factory = warm_start(factory, run_dir)
    orch = BoostingOrchestrator(rounds, rule, run_dir, seed=seed, resume=True)
    summary = orch.run(factory, trainer_factory(args, epochs), dm)
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    test, hold, members = [], [], []
    for member in orch.state["members"]:
        model = MarginClassifier.load_from_checkpoint(run_dir / member["checkpoint"], map_location="cpu")
        t_logits, y_test = logits_of(model, dm.test_dataloader(), device)
        h_logits, y_hold = logits_of(model, dm.holdout_dataloader(), device)
        test.append(t_logits)
        hold.append(h_logits)
        members.append(member["seed"])
    gaps = [torch.load(round_dir(run_dir, t) / "margins.pt", weights_only=True)["gaps"]
            for t in range(1, rounds + 1)]
    result = {"test": torch.stack(test), "y_test": y_test, "holdout": torch.stack(hold), "y_holdout": y_hold,
              "member_seeds": torch.tensor(members, dtype=torch.int64),
              "fit_seconds": torch.tensor([h["fit_seconds"] for h in summary["history"]]),
              "gaps": torch.stack(gaps), "wall_seconds": torch.tensor(time.perf_counter() - started)}
    torch.save(result, done)
    return result


def methods_of(args) -> list[str]:
    methods = [f"boosted_{r}" for r in args.rules] + ["deep", "snapshot"]
    methods += [f"single_{t}" for t in args.single_rounds if t > 1]
    return methods


def train(args) -> None:
    torch.set_num_threads(args.threads)
    dm = make_datamodule(args)
    dm.prepare_data()
    dm.setup("fit")
    timing_path = Path(args.out) / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    for seed in args.seeds:  # seeds outermost: a run cut short still has whole seeds
        for method in [m for m in methods_of(args) if not args.only or m in args.only]:
            started = time.perf_counter()
            run_method(args, dm, method, seed, Path(args.out) / method / f"seed_{seed}")
            timing.setdefault(f"{method}/seed_{seed}", round(time.perf_counter() - started, 1))
            timing_path.parent.mkdir(parents=True, exist_ok=True)
            timing_path.write_text(json.dumps(timing, indent=1))
            print(f"[{time.strftime('%H:%M:%S')}] {method} seed {seed}: {timing[f'{method}/seed_{seed}']} s",
                  flush=True)


# -- metrics --------------------------------------------------------------------------------------

def fit_temperature(logits: Tensor, y: Tensor) -> float:
    """The temperature τ > 0 minimising the NLL of ``softmax(logits / τ)`` (golden section on log τ)."""
    from scipy.optimize import minimize_scalar

    logits, y = logits.double(), y

    def nll(log_tau: float) -> float:
        return F.cross_entropy(logits / math.exp(log_tau), y).item()

    return math.exp(minimize_scalar(nll, bounds=(math.log(1e-2), math.log(1e2)), method="bounded").x)


def nll_ece(probs_or_logits: Tensor, y: Tensor, are_logits: bool) -> tuple[float, float]:
    if are_logits:
        nll = F.cross_entropy(probs_or_logits.double(), y).item()
        probs = probs_or_logits.double().softmax(-1)
    else:
        probs = probs_or_logits.double()
        nll = F.nll_loss(probs.clamp_min(1e-300).log(), y).item()
    ece = multiclass_calibration_error(probs.float(), y, probs.shape[1], n_bins=N_BINS).item()
    return nll, ece


def ensemble_scores(test: Tensor, y: Tensor, hold: Tensor, y_hold: Tensor, combine: str) -> dict[str, float]:
    """Metrics of the ensemble of the ``T`` members in ``test [T, N, K]`` (``hold``: held-out logits).

    ``combine`` is the ensemble's own prediction: ``sum`` (boosting: the sum of logits) or
    ``softmax`` (deep and snapshot ensembles: the mean of the softmaxes).
    """
    t = test.shape[0]
    s_logits, mean_logits = test.sum(0), test.mean(0)
    p_mean = test.double().softmax(-1).mean(0)
    out = {}
    out["nll_sum"], out["ece_sum"] = nll_ece(s_logits, y, True)
    out["nll_meanlogit"], out["ece_meanlogit"] = nll_ece(mean_logits, y, True)
    out["nll_softmax"], out["ece_softmax"] = nll_ece(p_mean, y, False)
    tau = fit_temperature(hold.mean(0), y_hold)  # the same τ·T for the sum: one calibrated model
    out["tau"] = tau
    out["nll_ts"], out["ece_ts"] = nll_ece(mean_logits / tau, y, True)
    pred = s_logits.argmax(-1) if combine == "sum" else p_mean.argmax(-1)
    out["acc"] = (pred == y).double().mean().item()
    out["nll"], out["ece"] = (out["nll_sum"], out["ece_sum"]) if combine == "sum" else (
        out["nll_softmax"], out["ece_softmax"])
    preds = test.argmax(-1)
    pairs = [(a, b) for a in range(t) for b in range(a + 1, t)]
    out["disagreement"] = (float(np.mean([(preds[a] != preds[b]).double().mean().item() for a, b in pairs]))
                           if pairs else 0.0)
    out["member_acc"] = (preds[-1] == y).double().mean().item()
    return out


# -- report ---------------------------------------------------------------------------------------

def _ms(values: list[float], digits: int = 4) -> str:
    a = np.asarray(values, dtype=float)
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.{digits}f}"


def collect(args) -> tuple[dict, list[int]]:
    """``scores[(method, T)][metric] = [value per seed]`` over the seeds complete for every method."""
    out = Path(args.out)
    seeds = [s for s in args.seeds if all((out / m / f"seed_{s}" / "logits.pt").exists() for m in methods_of(args))]
    scores: dict = {}
    extra: dict = {"gaps": {}, "wall": 0.0, "fit": 0.0}
    for seed in seeds:
        runs = {m: torch.load(out / m / f"seed_{seed}" / "logits.pt", weights_only=True) for m in methods_of(args)}
        for r in runs.values():
            extra["wall"] += float(r["wall_seconds"])
            extra["fit"] += float(r["fit_seconds"].sum())
        for method in [m for m in methods_of(args) if not m.startswith("single_")]:
            r = runs[method]
            combine = "sum" if method.startswith("boosted_") else "softmax"
            for t in range(1, args.rounds + 1):
                s = ensemble_scores(r["test"][:t], r["y_test"], r["holdout"][:t], r["y_holdout"], combine)
                for k, v in s.items():
                    scores.setdefault((method, t), {}).setdefault(k, []).append(v)
            if method.startswith("boosted_"):
                g = r["gaps"]  # [rounds, N]: gaps after each round
                g_max = args.g_max if method == "boosted_clipped" else None
                for t in range(1, args.rounds):
                    e = extra["gaps"].setdefault((method, t), {"mean": [], "at_max": [], "zero": []})
                    e["mean"].append(g[t - 1].mean().item())
                    e["zero"].append((g[t - 1] <= 0).double().mean().item())
                    if g_max is not None:
                        e["at_max"].append((g[t - 1] >= g_max - 1e-6).double().mean().item())
        for t in sorted({1, *args.single_rounds}):
            r = runs["deep"] if t == 1 else runs[f"single_{t}"]
            s = ensemble_scores(r["test"][:1], r["y_test"], r["holdout"][:1], r["y_holdout"], "softmax")
            for k, v in s.items():
                scores.setdefault(("single", t), {}).setdefault(k, []).append(v)
    return scores, seeds, extra


def verdict(a: list[float], b: list[float]) -> str:
    """``a`` vs ``b`` (per-seed values): the difference of means and whether it exceeds the spread.

    "exceeds" means |Δ| > std(a) + std(b): the ±1-std bars do not overlap.
    """
    a, b = np.asarray(a), np.asarray(b)
    d = a.mean() - b.mean()
    spread = a.std(ddof=1) + b.std(ddof=1)
    return f"{d:+.4f} ({'exceeds' if abs(d) > spread else 'within'} spread {spread:.4f})"


def write_figure(args, scores: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    ts = list(range(1, args.rounds + 1))
    methods = [m for m in methods_of(args) if not m.startswith("single_")] + ["single"]
    for i, method in enumerate(methods):
        ts = [t for t in range(1, args.rounds + 1) if (method, t) in scores]
        for ax, key in zip(axes, ("acc", "nll")):
            mean = [np.mean(scores[(method, t)][key]) for t in ts]
            std = [np.std(scores[(method, t)][key], ddof=1) for t in ts]
            ax.errorbar(np.asarray(ts) + 0.04 * (i - len(methods) / 2), mean, yerr=std, marker="o",
                        capsize=3, label=method, lw=1.2, ls="--" if method in ("single", "snapshot") else "-")
    axes[0].set_ylabel("test accuracy")
    axes[1].set_ylabel("test NLL (the method's own prediction)")
    for ax in axes:
        ax.set_xlabel("members T (single: T·E epochs)")
        ax.set_xticks(range(1, args.rounds + 1))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{args.data}: mean ± std over seeds; E = {args.epochs} epochs per member")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def report(args, command: str) -> str:
    scores, seeds, extra = collect(args)
    if len(seeds) < 2:
        raise SystemExit(f"report: need at least 2 seeds complete for every method, found {seeds}")
    figure = Path(args.figure)
    write_figure(args, scores, figure)
    methods = [m for m in methods_of(args) if not m.startswith("single_")] + ["single"]
    lines = [BEGIN, "", f"## Boosting vs deep ensemble on {args.data} (written by `experiments/boosting_vs_deep.py`)", ""]
    lines += [
        "What ran (every number below comes from this command; "
        f"{len(seeds)} run seeds: {seeds}):", "", "```bash", command, "```", "",
        f"- Data: {args.data}, a fixed stratified training subset of "
        f"{args.train_size if args.train_size else 'all'} objects, {args.holdout} further training objects held "
        "out for temperature scaling (split seed 0, the same for every run); test = the official test set.",
        f"- Model: `{args.backbone}` width {args.width}, frozen orthogonal `W ∘ BN` head, SGD lr {args.lr} "
        "(Nesterov, momentum 0.9, weight decay 5e-4), batch "
        f"{args.batch_size}, cosine schedule over each member's {args.epochs} epochs; augmentation: random crop "
        f"(pad {DATA[args.data].pad}){', flip' if DATA[args.data].flip else ', no flip'}.",
        f"- Methods at equal compute (T members × E = {args.epochs} epochs): boosted with gap rules "
        f"{', '.join(args.rules)} (clipped: [0, {args.g_max}], target: τ = {args.tau}); deep ensemble "
        "(`NoGapRule`, mean softmax); snapshot ensemble (one cosine cycle per member, each warm-started from "
        "the previous one, mean softmax); single model trained T·E epochs for T in "
        f"{sorted({1, *args.single_rounds})} (T = 1 is the deep ensemble's first member). Member seeds: `member_seed(run_seed, t)`; round 1 of every ensemble is the same model.",
        f"- Machine: {platform.machine()} CPU, {os.cpu_count()} cores shared with other jobs, 1 torch thread; "
        f"torch {torch.__version__}, lightning {L.__version__}. Sum of the runs' wall times: "
        f"{extra['wall'] / 60:.1f} min ({extra['fit'] / 60:.1f} min inside `Trainer.fit`); runs may be "
        "split over concurrent processes (`--only`), so the elapsed time can be shorter.",
        "", f"![accuracy and NLL vs T]({os.path.relpath(figure, Path(args.docs).parent)})", "",
        "### Test accuracy, NLL, ECE, disagreement (mean ± std over seeds)", "",
        "Boosted ensembles predict with the sum of member logits (NLL/ECE of the softmax of that sum); deep and "
        "snapshot ensembles with the mean softmax. Disagreement: mean pairwise fraction of test objects on "
        "which two members differ.", "",
        "| method | T | accuracy | NLL | ECE | disagreement | newest member acc |", "|---|---|---|---|---|---|---|"]
    for method in methods:
        for t in [t for t in range(1, args.rounds + 1) if (method, t) in scores]:
            s = scores[(method, t)]
            lines.append(f"| {method} | {t} | {_ms(s['acc'])} | {_ms(s['nll'], 3)} | {_ms(s['ece'], 3)} | "
                         f"{_ms(s['disagreement'], 3) if method != 'single' else '—'} | {_ms(s['member_acc'])} |")
    T = args.rounds
    lines += ["", f"### Calibration at T = {T}: the same members, combined four ways", "",
              "Summed logits, mean logits (sum / T), mean softmax, and mean logits after a temperature fitted on "
              "the held-out training objects (the temperature absorbs the factor T, so summed and mean logits "
              "give the same calibrated model). Argmax of summed and mean logits is the same; calibration is not.",
              "", "| method | NLL sum | NLL mean logits | NLL mean softmax | NLL temp.-scaled | ECE sum | "
              "ECE mean logits | ECE mean softmax | ECE temp.-scaled | τ |", "|---|---|---|---|---|---|---|---|---|---|"]
    for method in [m for m in methods if (m, T) in scores]:
        s = scores[(method, T)]
        lines.append(f"| {method} | {_ms(s['nll_sum'], 3)} | {_ms(s['nll_meanlogit'], 3)} | "
                     f"{_ms(s['nll_softmax'], 3)} | {_ms(s['nll_ts'], 3)} | {_ms(s['ece_sum'], 3)} | "
                     f"{_ms(s['ece_meanlogit'], 3)} | {_ms(s['ece_softmax'], 3)} | {_ms(s['ece_ts'], 3)} | "
                     f"{_ms(s['tau'], 2)} |")
    # the answer, plainly
    boosted = [m for m in methods if m.startswith("boosted_")]
    lines += ["", "### Does the difference exceed the seed spread?", "",
              "Δ = mean(boosted) − mean(baseline) over seeds; *exceeds* means |Δ| > std(boosted) + std(baseline) "
              "(the ±1-std bars do not overlap). Accuracy: higher is better; NLL (each method's own prediction, and "
              "after temperature scaling): lower is better.", "",
              "| T | method | Δ acc vs deep | Δ acc vs snapshot | Δ acc vs single | Δ NLL vs deep | "
              "Δ temp.-scaled NLL vs deep |", "|---|---|---|---|---|---|---|"]
    for t in range(2, T + 1):
        for m in boosted:
            s, d, sn = scores[(m, t)], scores[("deep", t)], scores[("snapshot", t)]
            vs_single = verdict(s["acc"], scores[("single", t)]["acc"]) if ("single", t) in scores else "—"
            lines.append(f"| {t} | {m} | {verdict(s['acc'], d['acc'])} | {verdict(s['acc'], sn['acc'])} | "
                         f"{vs_single} | {verdict(s['nll'], d['nll'])} | "
                         f"{verdict(s['nll_ts'], d['nll_ts'])} |")
    best = max(boosted, key=lambda m: np.mean(scores[(m, T)]["acc"]))
    rivals = {b: np.mean(scores[(b, T)]["acc"]) for b in ("deep", "snapshot", "single") if (b, T) in scores}
    top = max(rivals, key=rivals.get)
    b_acc = np.mean(scores[(best, T)]["acc"])
    spread = np.std(scores[(best, T)]["acc"], ddof=1) + np.std(scores[(top, T)]["acc"], ddof=1)
    if b_acc > rivals[top] and b_acc - rivals[top] > spread:
        answer = "boosting wins"
    elif b_acc > rivals[top]:
        answer = "boosting is ahead, but within the seed spread (no evidence of a difference)"
    elif rivals[top] - b_acc > spread:
        answer = f"boosting loses to the {top} baseline"
    else:
        answer = f"boosting is behind the {top} baseline, within the seed spread"
    lines += ["", f"**Answer at T = {T}:** the best boosted ensemble ({best}, accuracy "
              f"{_ms(scores[(best, T)]['acc'])}) against the best baseline ({top}, "
              f"{_ms(scores[(top, T)]['acc'])}): {answer}."]
    lines += ["", "### Where the gaps go", "",
              "Gaps fed to member t + 1 after round t (mean over seeds): mean gap, fraction at the upper clip "
              f"(clipped rule, g_max = {args.g_max}), fraction at or below 0.", "",
              "| method | after round | mean gap | at g_max | ≤ 0 |", "|---|---|---|---|---|"]
    for (m, t), e in sorted(extra["gaps"].items()):
        at_max = f"{np.mean(e['at_max']):.3f}" if e["at_max"] else "—"
        lines.append(f"| {m} | {t} | {np.mean(e['mean']):.3f} | {at_max} | {np.mean(e['zero']):.3f} |")
    lines += ["", "Member accuracy by round (the newest member alone, mean over seeds):", "",
              "| method | " + " | ".join(f"member {t}" for t in range(1, T + 1)) + " |",
              "|---|" + "---|" * T]
    for m in [m for m in methods if m != "single"]:
        lines.append(f"| {m} | " + " | ".join(f"{np.mean(scores[(m, t)]['member_acc']):.4f}"
                                              for t in range(1, T + 1)) + " |")
    lines += ["", END]
    return "\n".join(lines)


def write_between_markers(path: Path, section: str) -> None:
    """Replace the text between the markers (inclusive) in ``path``, or append it; others' sections stay."""
    text = path.read_text() if path.exists() else "# Results\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phase", choices=("train", "report", "all"), default="all")
    p.add_argument("--data", choices=tuple(DATA), default="fashion")
    p.add_argument("--data-dir", default=None, help="data module's data_dir (default: its own)")
    p.add_argument("--download", action="store_true", help="allow torchvision downloads")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=5, help="members T of every ensemble")
    p.add_argument("--epochs", type=int, default=3, help="epochs E per member")
    p.add_argument("--rules", nargs="+", choices=tuple(RULES), default=list(RULES))
    p.add_argument("--single-rounds", type=int, nargs="+", default=[2, 3, 4, 5],
                   help="T values for which a single model of T·E epochs is trained (T = 1: deep's member 1)")
    p.add_argument("--only", nargs="+", default=None,
                   help="train only these methods (e.g. to split one seed over processes)")
    p.add_argument("--g-max", type=float, default=4.0, help="upper clip of the clipped rule")
    p.add_argument("--tau", type=float, default=1.0, help="target margin of the target rule")
    p.add_argument("--train-size", type=int, default=10000, help="training subset (0: all not held out)")
    p.add_argument("--holdout", type=int, default=5000, help="training objects held out for temperatures")
    p.add_argument("--backbone", default="small_cnn")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--device-resident", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/boosting_vs_deep")
    p.add_argument("--docs", default=str(REPO / "docs" / "results.md"))
    p.add_argument("--figure", default=str(REPO / "docs" / "figures" / "boosting_vs_deep_fashion.png"))
    args = p.parse_args(argv)
    args.train_size = args.train_size or None
    return args


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.phase in ("train", "all"):
        train(args)
    if args.phase in ("report", "all"):
        shown = [a for i, a in enumerate(argv)
                 if not a.startswith("--phase") and not (i and argv[i - 1] == "--phase")]
        command = " ".join(["python experiments/boosting_vs_deep.py", *shown])
        write_between_markers(Path(args.docs), report(args, command))
        print(f"wrote {args.docs} and {args.figure}")


if __name__ == "__main__":
    main()
