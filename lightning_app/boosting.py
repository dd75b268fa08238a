"""The boosting orchestrator: members trained in sequence, each object's margins fed back as gaps.

```
g ← 0, M ← 0
for t in 1..T:
    θ_t ← fit a fresh member (seed = seed + t − 1) on the discounted loss with gaps g
    M ← M + m(θ_t)           # margins on the whole training set, eval mode, un-augmented
    g ← gap_rule(M, t)       # default: 2·mean(M) − M
```

The state (round, ``M``, gaps, member checkpoints, seeds, a fingerprint of the training set) is
saved after every round, so re-running the same command continues where a run stopped; a round cut
off in the middle is trained again from its seed. Under DDP the orchestrator runs on every rank,
collectives on every rank, files are written by rank 0 only.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from jsonargparse import lazy_instance
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from callbacks import SharpnessCallback, margin_summary
from marginboost import ConfigError, collect_logits, comm_device, is_distributed
from models import margins

from .ensemble import ensemble_metrics
from .gap_rules import GapRule, MeanGapRule, NoGapRule

STATE_FILE = "state.pt"
SUMMARY_FILE = "summary.json"


@dataclass
class BoostingConfig:
    """The ``boosting:`` section of a config; its presence turns ``fit`` into a boosting run.

    Attributes:
        rounds: number of members T.
        gap_rule: a ``GapRule`` (``class_path``/``init_args``); default ``MeanGapRule``.
        run_dir: one directory for the run: per-round logs and checkpoints, ``state.pt``,
            ``summary.json`` and the ensemble's TensorBoard events.
        seed: member t is seeded with ``seed + t − 1`` (initialisation and data order).
        resume: continue the run found in ``run_dir``; ``false`` refuses to touch an existing run.
    """

    rounds: int = 3
    gap_rule: GapRule = field(default_factory=lambda: lazy_instance(MeanGapRule))
    run_dir: str = "runs/boost"
    seed: int = 0
    resume: bool = True


def training_set_fingerprint(targets: Tensor) -> dict[str, Any]:
    """Size and SHA-256 of the labels: enough to tell two training sets apart on resume."""
    digest = hashlib.sha256(targets.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()
    return {"num_train": int(targets.numel()), "label_sha256": digest}


def _wait_for_training_set(datamodule, timeout_s: float = 3600.0, poll_s: float = 5.0) -> Tensor:
    """The training labels; other processes of a node wait while its local rank 0 downloads.

    There is no process group yet (Lightning makes it in the first ``fit``), hence polling.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return datamodule.train_targets
        except FileNotFoundError:
            if os.environ.get("LOCAL_RANK", "0") == "0" or time.monotonic() > deadline:
                raise
            time.sleep(poll_s)


def member_sharpness(trainer: L.Trainer) -> dict[str, float]:
    """Scalar values the member's ``SharpnessCallback`` s measured at its last step (fit end)."""
    out = {}
    for cb in trainer.callbacks:
        if isinstance(cb, SharpnessCallback):
            for entry in cb.history:
                if entry["global_step"] == trainer.global_step and isinstance(entry["value"], float):
                    out[entry["metric"]] = entry["value"]
    return out


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy every buffer (BN running statistics) from rank ``src``: ranks drift after the last step."""
    if not is_distributed():
        return
    for buf in module.buffers():
        comm = buf.data.to(comm_device())
        dist.broadcast(comm, src)
        buf.data.copy_(comm)


def assert_identical_across_ranks(t: Tensor, name: str) -> None:
    """Raise on every rank if ``t`` differs on any rank from rank 0's copy."""
    if not is_distributed():
        return
    ref = t.detach().to(comm_device(), copy=True)
    dist.broadcast(ref, 0)
    diff = (ref - t.detach().to(comm_device())).abs().max().reshape(1).double()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if diff.item() != 0:
        raise RuntimeError(f"boosting: {name} differ across ranks (max |Δ| = {diff.item():.3g})")


def _sharded(loader: DataLoader) -> DataLoader:
    """The same loader, split across ranks by a non-shuffling DistributedSampler under DDP."""
    if not is_distributed():
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size, num_workers=loader.num_workers,
                      sampler=DistributedSampler(loader.dataset, shuffle=False), pin_memory=loader.pin_memory)


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    if path.suffix == ".json":
        tmp.write_text(json.dumps(obj, indent=2))
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


class BoostingOrchestrator:
    """Trains ``rounds`` members in sequence, feeding gaps back through the DataModule.

    Use from Python with two factories, or through ``lightning fit`` with a ``boosting:`` section::

        orch = BoostingOrchestrator(rounds=3, run_dir="runs/demo")
        summary = orch.run(lambda t, seed: MarginClassifier(...),
                           lambda t, round_dir: L.Trainer(max_epochs=10, default_root_dir=round_dir),
                           DigitsDataModule())

    Args:
        rounds: number of members T (>= 1).
        gap_rule: maps cumulative margins to gaps; ``MeanGapRule()`` by default.
        run_dir: directory of the run (see :class:`BoostingConfig`).
        seed: member t uses ``seed + t − 1``.
        resume: continue a run found in ``run_dir``.
    """

    def __init__(self, rounds: int = 3, gap_rule: GapRule | None = None, run_dir: str | Path = "runs/boost",
                 seed: int = 0, resume: bool = True) -> None:
        if not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"boosting.rounds must be an integer >= 1, got {rounds!r}")
        if gap_rule is not None and not isinstance(gap_rule, GapRule):
            raise TypeError(f"boosting.gap_rule must be a GapRule, got {type(gap_rule).__name__}")
        self.rounds, self.gap_rule = rounds, gap_rule or MeanGapRule()
        self.run_dir, self.seed, self.resume = Path(run_dir), seed, resume
        self.state: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, config: BoostingConfig, **overrides) -> BoostingOrchestrator:
        kwargs = {f.name: getattr(config, f.name) for f in fields(config)}
        kwargs.update(overrides)
        return cls(**kwargs)

    # -- state ------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.run_dir / STATE_FILE

    def _fresh_state(self, fingerprint: dict[str, Any], num_train: int) -> dict[str, Any]:
        return {"version": 1, "rounds_done": 0, "seed": self.seed, "gap_rule": repr(self.gap_rule),
                "fingerprint": fingerprint, "M": torch.zeros(num_train), "gaps": torch.zeros(num_train),
                "train_logit_sum": None, "val_logits": [], "members": [], "history": []}

    def _load_or_start(self, fingerprint: dict[str, Any], num_train: int) -> dict[str, Any]:
        if not self.state_path.exists():
            return self._fresh_state(fingerprint, num_train)
        if not self.resume:
            raise FileExistsError(f"boosting.run_dir {str(self.run_dir)!r} already holds a run ({STATE_FILE}); "
                                  "set boosting.resume=true to continue it, or choose another run_dir")
        state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        if state["fingerprint"] != fingerprint:
            raise ValueError(
                f"boosting: the run in {str(self.run_dir)!r} was trained on a different training set "
                f"(saved {state['fingerprint']}, now {fingerprint}); refusing to resume. "
                "Use another boosting.run_dir for a new data set.")
        if state["gap_rule"] != repr(self.gap_rule):
            raise ValueError(f"boosting.gap_rule={self.gap_rule!r} differs from the run being resumed "
                             f"({state['gap_rule']}); use the same rule or another run_dir")
        if state["seed"] != self.seed:
            raise ValueError(f"boosting.seed={self.seed} differs from the run being resumed "
                             f"(seed={state['seed']}); use the same seed or another run_dir")
        return state

    # -- the loop ---------------------------------------------------------------------------
    def run(self, model_factory: Callable[[int, int], L.LightningModule],
            trainer_factory: Callable[[int, Path], L.Trainer], datamodule: L.LightningDataModule) -> dict[str, Any]:
        """Train the remaining rounds; returns the summary (also written to ``summary.json``).

        Args:
            model_factory: ``(round, seed) -> LightningModule``, called after seeding.
            trainer_factory: ``(round, round_dir) -> Trainer``; a fresh Trainer per round.
            datamodule: a ``GapDataModule`` (needs ``set_gaps``, ``train_eval_dataloader``).
        """
        if os.environ.get("LOCAL_RANK", "0") == "0":
            datamodule.prepare_data()  # download once per node, before the training set is read
        targets = _wait_for_training_set(datamodule)
        num_train = datamodule.num_train
        state = self.state = self._load_or_start(training_set_fingerprint(targets), num_train)
        datamodule.set_gaps(state["gaps"])
        display = _RoundDisplay(self.rounds)
        for r in range(state["rounds_done"], self.rounds):
            seed = self.seed + r
            display.start(r, seed)
            L.seed_everything(seed, workers=True, verbose=False)
            model = model_factory(r, seed)
            if r == state["rounds_done"]:
                self._check_head_takes_gaps(model)
            round_dir = self.run_dir / f"round_{r}"
            trainer = trainer_factory(r, round_dir)
            started = time.perf_counter()
            trainer.fit(model, datamodule=datamodule)
            if trainer.interrupted:
                raise KeyboardInterrupt(f"boosting round {r + 1} was interrupted; re-run the command to resume")
            fit_seconds = time.perf_counter() - started
            checkpoint = round_dir / "member.ckpt"
            trainer.save_checkpoint(checkpoint)  # every rank calls it; rank 0 writes
            train_logits, val_logits, val_y, score_seconds = self._score(model, trainer, datamodule, num_train)
            train_logits = train_logits.cpu()
            m = margins(train_logits, targets)
            state["M"] = state["M"] + m
            logit_sum = train_logits if state["train_logit_sum"] is None else state["train_logit_sum"] + train_logits
            state["train_logit_sum"] = logit_sum
            ensemble_m = margins(logit_sum, targets)
            gaps = self.gap_rule(state["M"], r + 1)
            assert_identical_across_ranks(gaps, "gaps")
            datamodule.set_gaps(gaps)
            state["gaps"] = gaps.clone()
            state["val_logits"].append(val_logits.cpu())
            metrics = ensemble_metrics(state["val_logits"], val_y.cpu())
            record = {"round": r + 1, "seed": seed, "checkpoint": str(checkpoint), "fit_seconds": fit_seconds,
                      "score_seconds": score_seconds, **metrics,
                      "member_train_margin": margin_summary(m),
                      "ensemble_train_margin": margin_summary(ensemble_m),
                      "gap": margin_summary(gaps), "sharpness": member_sharpness(trainer)}
            state["members"].append({"round": r + 1, "seed": seed, "checkpoint": str(checkpoint)})
            state["history"].append(record)
            state["rounds_done"] = r + 1
            self._write(state, m, ensemble_m)
            display.end(state["history"])
        return self.summary(state)

    def _check_head_takes_gaps(self, model: L.LightningModule) -> None:
        """Before any training: a head that refuses gaps (``linear``) only boosts with ``NoGapRule``."""
        head = getattr(model, "head", None)
        if getattr(head, "accepts_gap", True) or isinstance(self.gap_rule, NoGapRule):
            return
        raise ConfigError("boosting.gap_rule", f"{self.gap_rule!r} with model.head {head.name!r}",
                          "NoGapRule for this head (it has no fixed logit scale), or a head that takes "
                          "gaps: margin, l2_softmax, cosface, arcface", describe=True)

    def _score(self, model: L.LightningModule, trainer: L.Trainer, datamodule, num_train: int):
        """Training-set and validation logits of the finished member, on the training device."""
        started = time.perf_counter()
        device = trainer.strategy.root_device
        model.to(device)
        broadcast_buffers(model)
        train_logits, _ = collect_logits(model, datamodule.train_eval_dataloader(), num_train, device)
        val_loader = _sharded(datamodule.val_dataloader())
        val_logits, val_y = collect_logits(model, val_loader, len(val_loader.dataset), device)
        model.cpu()
        return train_logits, val_logits, val_y, time.perf_counter() - started

    def summary(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"rounds": self.rounds, "rounds_done": state["rounds_done"], "seed": self.seed,
                "gap_rule": state["gap_rule"], "fingerprint": state["fingerprint"],
                "run_dir": str(self.run_dir), "history": state["history"]}

    @rank_zero_only
    def _write(self, state: dict[str, Any], member_margins: Tensor, ensemble_margins: Tensor) -> None:
        round_dir = self.run_dir / f"round_{state['rounds_done'] - 1}"
        round_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"M": state["M"], "gaps": state["gaps"], "member_margins": member_margins},
                   round_dir / "margins.pt")
        _save_atomic(state, self.state_path)
        _save_atomic(self.summary(state), self.run_dir / SUMMARY_FILE)
        _log_round(self.run_dir / "ensemble", state, member_margins, ensemble_margins)


def _log_round(log_dir: Path, state: dict[str, Any], member_margins: Tensor, ensemble_margins: Tensor) -> None:
    """Scalars (step = round), margin and gap histograms, and the ensemble-margin figure."""
    from torch.utils.tensorboard import SummaryWriter

    record, step = state["history"][-1], state["rounds_done"]
    with SummaryWriter(str(log_dir)) as writer:
        for key in ("boosted_acc", "boosted_nll", "boosted_ece", "deep_acc", "deep_nll", "deep_ece", "disagreement"):
            writer.add_scalar(f"ensemble/{key}", record[key], step)
        writer.add_scalar("member/acc", record[f"member_acc_{step - 1}"], step)
        for key, value in record["member_train_margin"].items():
            writer.add_scalar(f"member/train_margin_{key}", value, step)
        for key, value in record["ensemble_train_margin"].items():
            writer.add_scalar(f"ensemble/train_margin_{key}", value, step)
        writer.add_scalar("gaps/mean", record["gap"]["mean"], step)
        for key, value in record["sharpness"].items():
            writer.add_scalar(f"member/{key}", value, step)
        writer.add_histogram("margins/member", member_margins, step)
        writer.add_histogram("margins/ensemble", ensemble_margins, step)
        writer.add_histogram("margins/cumulative", state["M"], step)
        writer.add_histogram("gaps/values", state["gaps"], step)
        writer.add_figure("margins/ensemble_by_round", _margin_figure(state["history"], ensemble_margins), step)


def _margin_figure(history: list[dict[str, Any]], ensemble_margins: Tensor):
    """Histogram of the boosted ensemble's training margins (normalised by rounds) for each round so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    t = len(history)
    normalised = (ensemble_margins / t).numpy()
    ax.hist(normalised, bins=60, histtype="step", label=f"{t} member(s)")
    ax.axvline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("ensemble margin / rounds (training set)")
    ax.set_ylabel("objects")
    ax.set_title(f"boosted ensemble after round {t}: acc {history[-1]['boosted_acc']:.3f}")
    ax.legend()
    fig.tight_layout()
    return fig


class _RoundDisplay:
    """Rich output on rank 0: a rule per round and a table of the ensemble so far."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds

    @rank_zero_only
    def start(self, r: int, seed: int) -> None:
        from rich.console import Console

        Console().rule(f"[bold]boosting round {r + 1}/{self.rounds}[/bold] (seed {seed})")

    @rank_zero_only
    def end(self, history: list[dict[str, Any]]) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"ensemble after {len(history)}/{self.rounds} rounds")
        for col in ("round", "member acc", "boosted acc", "deep acc", "boosted NLL", "deep NLL",
                    "disagree", "mean gap", "fit s"):
            table.add_column(col, justify="right")
        for i, rec in enumerate(history):
            table.add_row(str(rec["round"]), f"{rec[f'member_acc_{i}']:.4f}", f"{rec['boosted_acc']:.4f}",
                          f"{rec['deep_acc']:.4f}", f"{rec['boosted_nll']:.4f}", f"{rec['deep_nll']:.4f}",
                          f"{rec['disagreement']:.4f}", f"{rec['gap']['mean']:.3f}", f"{rec['fit_seconds']:.1f}")
        Console().print(table)
