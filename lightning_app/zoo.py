"""A model zoo: many networks from one config, one results row per member and checkpoint.

The config declares a grid or a random search over hyperparameters (width, depth, learning rate,
batch size, weight decay, augmentation, dropout, label-noise fraction, epochs). Member ``i`` is an
independent job: its hyperparameters and its seed are functions of ``i`` and the config alone, so
any launcher can run any slice of the zoo. ``--zoo.shard i/n`` runs the members ``m`` with
``m % n == i`` (a SLURM array passes ``--zoo.shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``).

Every member appends its rows (one per checkpoint fraction, e.g. 25/50/75/100% of training) to its
shard's CSV file, ``<out_dir>/results_shard<i>of<n>.csv``, in one atomic replace; the files are
merged on read (:func:`read_results`). A member whose rows exist in any shard file is not trained
again, so a killed zoo resumes where it stopped::

    python -m lightning_app.zoo --config zoo_digits.yaml                 # all members, one process
    python -m lightning_app.zoo --config zoo_digits.yaml --zoo.shard 1/4 # the second of four shards

Each row holds the member index, seed and hyperparameters (``hp_*``), the checkpoint
(``fraction``, ``epoch``), train and test accuracy and loss (eval mode, un-augmented; the training
labels are the ones trained on, label noise included), ``gap = train_acc - test_acc``, and the
features: the output margin summary (``margin_*``), Jiang et al.'s normalized margin signatures at
the first and last hidden layer, the head's input and the output (``nm_<layer>_*``, see
:mod:`callbacks.functional.normalized_margins`), the Hessian trace and the gradient-norm width.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from callbacks import (
    GradientNormWidth,
    HessianTrace,
    NormalizedMargins,
    margin_distribution_features,
)
from datamodules import DigitsDataModule, FashionMNISTDataModule, GapDataModule, SubsetDataModule
from marginboost.errors import ConfigError, check_bool, check_choice, check_int, check_number
from marginboost.per_sample import collect_logits
from models import MarginClassifier

from .console import quiet_console

# Zoo configs are not `lightning fit` configs: they live apart from those (configs/zoo/).
CONFIG_DIR = Path(__file__).parent / "configs" / "zoo"
HYPERPARAMETERS = ("backbone", "width", "depth", "lr", "batch_size", "weight_decay", "augment", "dropout",
                   "label_noise", "epochs")
DEFAULTS: dict[str, Any] = {"backbone": "mlp", "width": 64, "depth": 2, "lr": 0.05, "batch_size": 64,
                            "weight_decay": 5e-4, "augment": False, "dropout": 0.0, "label_noise": 0.0,
                            "epochs": 10}
DATASETS: dict[str, Callable[..., GapDataModule]] = {"digits": DigitsDataModule, "fashion": FashionMNISTDataModule}
SEARCHES = ("grid", "random")
LAYER_ROLES = ("first", "last", "feat", "out")  # first/last hidden ReLU, the head's input, the logits
FEATURE_KEYS = ("q1", "median", "q3", "iqr", "lower_fence", "upper_fence", "mean", "std", "skewness", "kurtosis")
SHARD_PREFIX = "results_shard"


# -- the config ---------------------------------------------------------------------------------

@dataclass
class ZooConfig:
    """The ``zoo:`` section.

    Attributes:
        out_dir: where the shard CSV files go.
        search: ``grid`` (every combination of the ``space`` lists, times ``seeds``) or ``random``
            (``members`` draws; a list is a uniform choice, ``{log_uniform: [a, b]}`` and
            ``{uniform: [a, b]}`` are continuous).
        space: hyperparameter -> values (see ``HYPERPARAMETERS``); the rest take ``fixed``, then
            ``DEFAULTS``.
        fixed: hyperparameters shared by all members.
        members: zoo size of a random search.
        seeds: per grid point, the training seeds (offsets added to ``seed``); random search: one.
        seed: base seed (member ``i`` of a random search trains with ``seed + i``).
        checkpoints: fractions of training in (0, 1] at which a row is written.
        data: ``{name: digits|fashion, num_train: null|int, data_seed: 0, eval_batch_size: 512}``.
        features: ``{trace_probes, trace_batches, width_batches, measure_batch_size}``.
    """

    out_dir: str = "runs/zoo"
    search: str = "grid"
    space: dict[str, Any] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    members: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    seed: int = 0
    checkpoints: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    data: dict[str, Any] = field(default_factory=lambda: {"name": "digits"})
    features: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("zoo.search", self.search, SEARCHES)
        for name in (*self.space, *self.fixed):
            check_choice("zoo.space", name, HYPERPARAMETERS)
        if self.search == "random":
            self.members = check_int("zoo.members", self.members, low=1)
        elif not self.space:
            raise ConfigError("zoo.space", self.space, "a mapping hyperparameter -> list of values")
        for name, values in self.space.items():
            if self.search == "grid" and not (isinstance(values, list) and values):
                raise ConfigError(f"zoo.space.{name}", values, "a non-empty list (grid search)")
            if isinstance(values, dict) and (set(values) - {"log_uniform", "uniform"} or len(values) != 1):
                raise ConfigError(f"zoo.space.{name}", values, "a list, {log_uniform: [a, b]} or {uniform: [a, b]}")
        if not self.checkpoints:
            raise ConfigError("zoo.checkpoints", self.checkpoints, "a non-empty list of fractions in (0, 1]")
        for f in self.checkpoints:
            check_number("zoo.checkpoints", f, low=0.0, high=1.0, low_open=True)
        self.checkpoints = sorted(float(f) for f in self.checkpoints)
        check_choice("zoo.data.name", self.data.get("name", "digits"), tuple(DATASETS))

    @property
    def num_members(self) -> int:
        if self.search == "random":
            return int(self.members)
        return math.prod(len(v) for v in self.space.values()) * len(self.seeds)


def load_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> ZooConfig:
    """Read the ``zoo:`` section of a YAML file (a local path, else a packaged config name)."""
    p = Path(path)
    if not p.exists() and (CONFIG_DIR / p.name).exists():
        p = CONFIG_DIR / p.name
    if not p.exists():
        raise ConfigError("--config", str(path), f"a YAML file, or a packaged config: "
                          f"{sorted(x.name for x in CONFIG_DIR.glob('zoo*.yaml'))}")
    raw = yaml.safe_load(p.read_text()) or {}
    section = dict(raw.get("zoo", {}))
    unknown = set(section) - set(ZooConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError("zoo", sorted(unknown)[0], f"one of {sorted(ZooConfig.__dataclass_fields__)}")
    section.update(overrides or {})
    return ZooConfig(**section)


# -- members ------------------------------------------------------------------------------------

def _draw(values: Any, rng: np.random.Generator) -> Any:
    if isinstance(values, dict):
        (kind, (a, b)), = values.items()
        if kind == "log_uniform":
            return float(math.exp(rng.uniform(math.log(a), math.log(b))))
        return float(rng.uniform(a, b))
    choice = values[int(rng.integers(len(values)))] if isinstance(values, list) else values
    return choice.item() if isinstance(choice, np.generic) else choice


def member_spec(cfg: ZooConfig, index: int) -> dict[str, Any]:
    """Hyperparameters and seed of member ``index``: a function of the config and the index only.

    Grid: the combinations in row-major order of ``space`` (first key slowest), each repeated for
    every seed in ``seeds``. Random: draws from ``numpy.random.default_rng([seed, index])``.

    Example:
        >>> cfg = ZooConfig(space={"width": [16, 32], "lr": [0.1, 0.01]}, seeds=[0, 1])
        >>> [(s["width"], s["lr"], s["seed"]) for s in map(lambda i: member_spec(cfg, i), range(3))]
        [(16, 0.1, 0), (16, 0.1, 1), (16, 0.01, 0)]
    """
    check_int("member", index, low=0, high=cfg.num_members - 1)
    spec = {**DEFAULTS, **cfg.fixed}
    if cfg.search == "grid":
        combo, repeat = divmod(index, len(cfg.seeds))
        keys = list(cfg.space)
        values = next(itertools.islice(itertools.product(*(cfg.space[k] for k in keys)), combo, None))
        spec.update(zip(keys, values))
        spec["seed"] = cfg.seed + cfg.seeds[repeat]
    else:
        rng = np.random.default_rng([cfg.seed, index])
        for key in HYPERPARAMETERS:  # fixed order: adding a key to the space does not reshuffle others
            if key in cfg.space:
                spec[key] = _draw(cfg.space[key], rng)
        spec["seed"] = cfg.seed + index
    for key in ("width", "depth", "batch_size", "epochs"):
        spec[key] = int(spec[key])
    spec["augment"] = check_bool("zoo.augment", bool(spec["augment"]) if isinstance(spec["augment"], np.bool_)
                                 else spec["augment"])
    return spec


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    try:
        i, n = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ConfigError("zoo.shard", text, "i/n with integers 0 <= i < n (e.g. 0/4)") from None
    if not 0 <= i < n:
        raise ConfigError("zoo.shard", text, "i/n with integers 0 <= i < n (e.g. 0/4)")
    return i, n


def shard_members(cfg: ZooConfig, shard: tuple[int, int]) -> list[int]:
    i, n = shard
    return [m for m in range(cfg.num_members) if m % n == i]


# -- training and features ----------------------------------------------------------------------

def checkpoint_epochs(epochs: int, fractions: Sequence[float]) -> dict[int, float]:
    """Epoch count after which each fraction's row is taken (at least 1, distinct fractions may share)."""
    return {f: max(1, int(round(f * epochs))) for f in fractions}


def _layer_names(model: MarginClassifier) -> dict[str, str]:
    relus = [n for n, m in model.backbone.named_modules() if isinstance(m, torch.nn.ReLU)]
    if not relus:
        raise ValueError("zoo: the backbone has no ReLU module to take hidden-layer margins at")
    return {"first": f"backbone.{relus[0]}", "last": f"backbone.{relus[-1]}", "feat": "head.bn", "out": "output"}


def _accuracy_loss(model: MarginClassifier, loader, num_total: int) -> tuple[float, float]:
    logits, y = collect_logits(model, loader, num_total)
    loss = torch.nn.functional.cross_entropy(logits.double(), y)
    return float((logits.argmax(1) == y).double().mean()), float(loss)


def member_features(model: MarginClassifier, dm: GapDataModule, features: Mapping[str, Any]) -> dict[str, float]:
    """Accuracies, losses, the gap and the margin / sharpness features of ``model`` now.

    Every measurement leaves the model as it found it (the callbacks restore parameters, buffers,
    grads, modes and RNG), so taking features at a checkpoint does not change the training run.
    """
    train, _, test = dm._ensure_loaded()
    tr_acc, tr_loss = _accuracy_loss(model, dm.train_eval_dataloader(), len(train))
    te_acc, te_loss = _accuracy_loss(model, dm.test_dataloader(), len(test))  # batches carry idx
    row: dict[str, float] = {"train_acc": tr_acc, "test_acc": te_acc, "train_loss": tr_loss, "test_loss": te_loss,
                             "gap": tr_acc - te_acc}
    common = dict(every_n_epochs=None, at_fit_end=False, seed=0, progress=False)
    roles = _layer_names(model)
    nm = NormalizedMargins(layers=list(dict.fromkeys(roles.values())), **common)
    nm.measure_now(None, model, datamodule=dm)
    raw_out = nm.latest.distances["output"] * math.sqrt(2.0)  # f_y - max_j f_j
    for key, value in margin_distribution_features(raw_out).items():
        if key in FEATURE_KEYS:
            row[f"margin_{key}"] = value
    for role, layer in roles.items():
        for key, value in margin_distribution_features(nm.latest.normalized[layer]).items():
            if key in FEATURE_KEYS:
                row[f"nm_{role}_{key}"] = value
    size = int(features.get("measure_batch_size", 256))
    trace = HessianTrace(probes=int(features.get("trace_probes", 8)), per_layer=False,
                         num_batches=int(features.get("trace_batches", 2)), batch_size=size, criterion="ce", **common)
    row["trace"] = float(trace.measure_now(None, model, datamodule=dm)["trace"].value)
    width = GradientNormWidth(num_batches=int(features.get("width_batches", 4)), criterion="ce", **common)
    row["width"] = float(width.measure_now(None, model, datamodule=dm)["width"].value)
    return row


class _CheckpointRows(Callback):
    """Takes the features after the epochs that end each checkpoint fraction."""

    def __init__(self, dm: GapDataModule, epochs: dict[float, int], features: Mapping[str, Any]) -> None:
        self.dm, self.epochs, self.features = dm, epochs, features
        self.rows: dict[float, dict[str, float]] = {}
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done = trainer.current_epoch + 1
        wanted = [f for f, e in self.epochs.items() if e == done]
        if wanted:
            feats = member_features(pl_module, self.dm, self.features)
            for f in wanted:
                self.rows[f] = {"epoch": done, **feats, "wall_s": time.perf_counter() - self.start}


def make_datamodule(cfg: ZooConfig, spec: Mapping[str, Any]) -> SubsetDataModule:
    data = dict(cfg.data)
    name = data.pop("name", "digits")
    num_train = data.pop("num_train", None)
    data_seed = int(data.pop("data_seed", 0))
    base = DATASETS[name](batch_size=spec["batch_size"], augment=spec["augment"], **data)
    return SubsetDataModule(base, num_train=num_train, label_noise=float(spec["label_noise"]), seed=data_seed)


def train_member(cfg: ZooConfig, index: int) -> list[dict[str, Any]]:
    """Train member ``index`` and return its rows, one per checkpoint fraction."""
    spec = member_spec(cfg, index)
    L.seed_everything(spec["seed"], workers=True, verbose=False)
    dm = make_datamodule(cfg, spec)
    kwargs: dict[str, Any] = {"width": spec["width"]}
    if spec["backbone"] == "mlp":
        kwargs.update(depth=spec["depth"], dropout=float(spec["dropout"]))
    epochs = spec["epochs"]
    model = MarginClassifier(
        num_classes=dm.num_classes, input_shape=dm.input_shape, backbone=spec["backbone"], backbone_kwargs=kwargs,
        head_seed=spec["seed"],
        optimizer=lambda p: torch.optim.SGD(p, lr=spec["lr"], momentum=0.9, weight_decay=spec["weight_decay"]),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs))
    rows_cb = _CheckpointRows(dm, checkpoint_epochs(epochs, cfg.checkpoints), cfg.features)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, deterministic=True, callbacks=[rows_cb])
    trainer.fit(model, datamodule=dm)
    hp = {f"hp_{k}": spec[k] for k in HYPERPARAMETERS}
    return [{"member": index, "seed": spec["seed"], **hp, "fraction": f, **rows_cb.rows[f]}
            for f in sorted(rows_cb.rows)]


# -- the results table --------------------------------------------------------------------------

def shard_path(out_dir: str | os.PathLike, shard: tuple[int, int]) -> Path:
    return Path(out_dir) / f"{SHARD_PREFIX}{shard[0]}of{shard[1]}.csv"


def _parse(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(value, value)


def read_results(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every shard file under ``out_dir`` merged: rows sorted by (member, fraction), one per pair.

    A member found in two shard files (the zoo re-run with another sharding) keeps the rows of
    the first file in name order; floats are read back exactly (written with ``repr``).
    """
    rows: dict[tuple[int, float], dict[str, Any]] = {}
    for path in sorted(Path(out_dir).glob(f"{SHARD_PREFIX}*.csv")):
        with open(path, newline="") as f:
            for raw in csv.DictReader(f):
                row = {k: _parse(v) for k, v in raw.items()}
                rows.setdefault((int(row["member"]), float(row["fraction"])), row)
    return [rows[k] for k in sorted(rows)]


def finished_members(out_dir: str | os.PathLike) -> set[int]:
    return {int(r["member"]) for r in read_results(out_dir)}


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` to the CSV at ``path`` atomically (write a copy, then ``os.replace``).

    A process killed mid-write leaves the old file intact, so a member is either wholly in the
    table or not at all.
    """
    old = path.read_text() if path.exists() else ""
    header = next(csv.reader(io.StringIO(old))) if old else list(rows[0])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    if not old:
        writer.writeheader()
    for row in rows:
        if set(row) != set(header):
            raise ValueError(f"zoo: row columns {sorted(set(row) ^ set(header))} differ from {path}'s header")
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(old + buf.getvalue())
    os.replace(tmp, path)


def run_zoo(cfg: ZooConfig, shard: tuple[int, int] = (0, 1), limit: int | None = None,
            log: Callable[[str], None] = print) -> list[int]:
    """Train the shard's members that have no rows yet (at most ``limit``); returns their indices."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = [m for m in shard_members(cfg, shard) if m not in finished_members(out)]
    if limit is not None:
        todo = todo[:limit]
    log(f"zoo: {cfg.num_members} members, shard {shard[0]}/{shard[1]}: {len(todo)} to train")
    trained = []
    for index in todo:
        start = time.perf_counter()
        rows = train_member(cfg, index)
        append_rows(shard_path(out, shard), rows)
        trained.append(index)
        last = rows[-1]
        log(f"zoo: member {index} done in {time.perf_counter() - start:.1f}s: train {last['train_acc']:.3f} "
            f"test {last['test_acc']:.3f} gap {last['gap']:.3f}")
    return trained


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_app.zoo", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a YAML file with a zoo: section, or a packaged name")
    parser.add_argument("--zoo.shard", dest="shard", default="0/1", help="i/n: run members m with m %% n == i")
    parser.add_argument("--zoo.out_dir", dest="out_dir", default=None)
    parser.add_argument("--zoo.limit", dest="limit", type=int, default=None, help="train at most this many members")
    parser.add_argument("--verbose", action="store_true", help="Lightning's device lines and tips for every member")
    args = parser.parse_args(argv)
    quiet_console(args.verbose)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    cfg = load_config(args.config, {"out_dir": args.out_dir} if args.out_dir else None)
    run_zoo(cfg, parse_shard(args.shard), args.limit)


if __name__ == "__main__":
    main()
