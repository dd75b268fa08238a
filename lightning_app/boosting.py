"""The boosting orchestrator: members trained in sequence, each object's margins fed back as gaps.

```
g ← 0, M ← 0
for t in 1..T:
    θ_t ← fit a fresh member (seed = member_seed(seed, t)) on the discounted loss with gaps g
    M ← M + m(θ_t)           # margins on the whole training set, eval mode, un-augmented
    g ← gap_rule(M, t)       # default: 2·mean(M) − M
```

The state (rounds done, ``M``, gaps, member checkpoints, seeds, a fingerprint of the training set
and of every config field that changes results) is saved after every round; re-running the same
command continues where a run stopped. A round cut off in the middle continues from Lightning's
last checkpoint of that round (with the RNG states), so a killed-and-resumed run ends bit-identical
to an uninterrupted one on CPU. Under DDP the orchestrator runs on every rank, collectives on every
rank, files are written by rank 0 only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from jsonargparse import lazy_instance
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from callbacks import SharpnessCallback, TrainingLogits, margin_summary
from marginboost import collect_logits, comm_device, is_distributed
from marginboost.errors import ConfigError, check_bool, check_int
from models import margins

from .console import RoundDisplay
from .ensemble import ensemble_metrics
from .ensemble_logging import EnsembleLogger
from .gap_rules import GapRule, MeanGapRule, NoGapRule
from .run_dir import (
    MEMBER_FILE,
    STATE_FILE,
    SUMMARY_FILE,
    check_run_dir,
    fingerprint_differences,
    load_state,
    member_paths,
    round_dir,
    save_atomic,
)

STATE_VERSION = 2
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
# written by a worker process next to the member it trained (concurrent_members > 1)
PREFIT_FILE = "prefit.json"
WORKER_LOG = "worker.log"
# (round t, torch threads, log file) -> the worker process training member t (see member_worker.py)
MemberLauncher = Callable[[int, int, Path], subprocess.Popen]


@dataclass
class BoostingConfig:
    """The ``boosting:`` section of a config; its presence turns ``fit`` into a boosting run.

    Attributes:
        rounds: number of members T (a finished run can be extended by raising it).
        gap_rule: a ``GapRule`` (``class_path``/``init_args``); default ``MeanGapRule``.
        run_dir: one directory for the run: per-round logs and checkpoints, ``state.pt``,
            ``summary.json`` and the ensemble's TensorBoard events.
        seed: the run's seed; member t is seeded with ``member_seed(seed, t)`` (initialisation and
            data order), so runs with different seeds share no member.
        resume: continue the run found in ``run_dir``; ``false`` refuses to touch an existing run.
        training_margins: score every member on the whole training set (margins, ``M``, the
            margin summaries and figures). ``null``: when the gap rule needs them, i.e. for every
            rule but ``NoGapRule``; ``true`` asks for them in a deep ensemble too.
        concurrent_members: how many members train at once (one process each, the CPU threads
            shared among them). Above 1 only with ``NoGapRule``, where no member depends on
            another, and a trainer of one process; members and results are those of a sequential
            run (same seeds). Each worker takes seconds to start: measured, it pays on a GPU with
            members of a few epochs, not on a 2-core CPU (docs/boosting.md).
    """

    rounds: int = 3
    gap_rule: GapRule = field(default_factory=lambda: lazy_instance(MeanGapRule))
    run_dir: str = "runs/boost"
    seed: int = 0
    resume: bool = True
    training_margins: bool | None = None
    concurrent_members: int = 1


def member_seed(seed: int, t: int) -> int:
    """The seed of member ``t`` (``1..T``) of a run seeded with ``seed``: initialisation and data order.

    ``numpy.random.SeedSequence([seed, t − 1])`` hashes the pair into one 32-bit seed. Unlike
    ``seed + t − 1`` (where run 0's second member *was* run 1's first member), runs with different
    seeds get unrelated members, so seed-to-seed spreads are over independent ensembles. A pure
    function of the pair: every rank and every resume of a run computes the same seeds.

    >>> member_seed(0, 1), member_seed(0, 2) != member_seed(1, 1)
    (2968811710, True)
    """
    seed = check_int("boosting.seed", seed, low=0)
    t = check_int("member_seed.t", t, low=1)
    return int(np.random.SeedSequence([seed, t - 1]).generate_state(1)[0])


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


def _rng_states() -> dict[str, Any]:
    """Every global RNG state, as tensors and ints (checkpoints load with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(),
              "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
              "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RoundCheckpoint(ModelCheckpoint):
    """Lightning's last checkpoint of the round in training (``round_<t>/checkpoints/last.ckpt``).

    Saved at every training-epoch end, with the RNG states (torch, CUDA, NumPy, Python) of that
    moment, so a round resumed from it draws the same data order and augmentations as an
    uninterrupted one. Removed once the round is committed to ``state.pt``.
    """

    def __init__(self, dirpath: str | Path) -> None:
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, every_n_epochs=1,
                         save_on_train_epoch_end=True, enable_version_counter=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # With save_top_k=0 ModelCheckpoint writes last.ckpt only when a top-k file was written this
        # step; here last.ckpt is the only file, written at every epoch end.
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng_states": _rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        rng = state_dict.pop("rng_states", None)
        super().load_state_dict(state_dict)
        if rng is not None:
            _set_rng_states(rng)


class _Workers:
    """The worker processes training later rounds' members while this process trains one.

    While any runs, the torch CPU threads of this process are split evenly among the
    ``concurrent`` processes (workers get the same share), so they do not oversubscribe the cores.
    """

    def __init__(self, launcher: MemberLauncher | None, concurrent: int) -> None:
        self.launcher = launcher
        self.total_threads = torch.get_num_threads()
        self.threads = max(1, self.total_threads // concurrent)
        self.procs: dict[int, subprocess.Popen] = {}

    def __contains__(self, t: int) -> bool:
        return t in self.procs

    def launch(self, t: int, rdir: Path) -> None:
        rdir.mkdir(parents=True, exist_ok=True)
        self.procs[t] = self.launcher(t, self.threads, rdir / WORKER_LOG)

    def wait(self, t: int) -> int:
        """Wait for round ``t``'s worker; its exit status."""
        return self.procs.pop(t).wait()

    @contextlib.contextmanager
    def sharing_threads(self):
        if not self.procs:
            yield
            return
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(self.total_threads)

    def stop(self) -> None:
        """End the workers still running (this process is stopping): their rounds resume later."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()


def _digest(fingerprint: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(fingerprint), sort_keys=True).encode()).hexdigest()


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


class BoostingOrchestrator:
    """Trains ``rounds`` members in sequence, feeding gaps back through the DataModule.

    Use from Python with two factories, or through ``lightning fit`` with a ``boosting:`` section::

        orch = BoostingOrchestrator(rounds=3, run_dir="runs/demo")
        summary = orch.run(lambda t, seed: MarginClassifier(...),
                           lambda t, round_dir: L.Trainer(max_epochs=10, default_root_dir=round_dir),
                           DigitsDataModule())

    Rounds are numbered ``t = 1..T`` everywhere (folders ``round_<t>``, console, TensorBoard
    steps, ``summary.json``); the factories receive ``t``.

    Args:
        rounds: number of members T (>= 1).
        gap_rule: maps cumulative margins to gaps; ``MeanGapRule()`` by default.
        run_dir: directory of the run (see :class:`BoostingConfig`).
        seed: the run's seed; member t uses ``member_seed(seed, t)`` (a ``SeedSequence`` hash).
        resume: continue a run found in ``run_dir``.
        config_fingerprint: ``{field: value}`` of the configuration that changes results (the CLI
            passes the resolved model, data, trainer and boosting fields); a resumed run must
            match it field for field.
        require_existing: ``run_dir`` must already hold a run (``--ckpt_path RUN_DIR``).
        training_margins: score each member on the training set; ``None``: when the gap rule
            needs margins (see :class:`BoostingConfig`).
        ensemble_logger: where the ensemble's rounds are logged (:class:`EnsembleLogger`); by default
            TensorBoard events in ``run_dir/ensemble``.
        concurrent_members: members trained at once (see :class:`BoostingConfig`); above 1,
            :meth:`run` needs a ``member_launcher`` (``lightning fit`` passes one).
    """

    def __init__(self, rounds: int = 3, gap_rule: GapRule | None = None, run_dir: str | Path = "runs/boost",
                 seed: int = 0, resume: bool = True, config_fingerprint: Mapping[str, str] | None = None,
                 require_existing: bool = False, training_margins: bool | None = None,
                 ensemble_logger: EnsembleLogger | None = None, concurrent_members: int = 1) -> None:
        self.rounds = check_int("boosting.rounds", rounds, low=1)
        if gap_rule is not None and not isinstance(gap_rule, GapRule):
            raise ConfigError("boosting.gap_rule", type(gap_rule).__name__,
                              "a lightning_app.GapRule (class_path/init_args)", describe=True)
        self.gap_rule = gap_rule or MeanGapRule()
        if isinstance(run_dir, Path):
            run_dir = str(run_dir)
        if not isinstance(run_dir, str) or not run_dir:
            raise ConfigError("boosting.run_dir", run_dir, "a directory path")
        self.run_dir = Path(run_dir)
        self.seed = check_int("boosting.seed", seed)
        self.resume = check_bool("boosting.resume", resume)
        self.config_fingerprint = dict(config_fingerprint or {})
        self.require_existing = require_existing
        if training_margins is not None:
            training_margins = check_bool("boosting.training_margins", training_margins)
            if not training_margins and self.gap_rule.needs_margins:
                raise ConfigError("boosting.training_margins", False,
                                  f"true or null with {self.gap_rule!r} (it computes the gaps from the margins)")
        self.training_margins = training_margins
        self.concurrent_members = check_int("boosting.concurrent_members", concurrent_members, low=1)
        if self.concurrent_members > 1 and not isinstance(self.gap_rule, NoGapRule):
            raise ConfigError("boosting.concurrent_members", self.concurrent_members,
                              f"1 with {self.gap_rule!r} (each member trains on the gaps of the members before "
                              "it); above 1 only with NoGapRule, a deep ensemble")
        self.ensemble_logger = ensemble_logger or EnsembleLogger()
        self.state: dict[str, Any] | None = None

    @property
    def scores_training_set(self) -> bool:
        """Whether each round makes a margin pass over the training set."""
        return self.gap_rule.needs_margins if self.training_margins is None else self.training_margins

    @classmethod
    def from_config(cls, config: BoostingConfig, **overrides) -> BoostingOrchestrator:
        kwargs = {f.name: getattr(config, f.name) for f in fields(config)}
        kwargs.update(overrides)
        return cls(**kwargs)

    # -- state ------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.run_dir / STATE_FILE

    def fingerprint(self, targets: Tensor) -> dict[str, str]:
        """Every field a resumed run must share with the saved one, as ``{field: json text}``."""
        out = {"data.training_set": json.dumps(training_set_fingerprint(targets), sort_keys=True),
               "boosting.gap_rule": json.dumps(repr(self.gap_rule)),
               "boosting.seed": json.dumps(self.seed), **self.config_fingerprint}
        if self.scores_training_set != self.gap_rule.needs_margins:  # only an explicit choice; M depends on it
            out["boosting.training_margins"] = json.dumps(self.scores_training_set)
        return out

    def _fresh_state(self, fingerprint: dict[str, str], num_train: int) -> dict[str, Any]:
        return {"version": STATE_VERSION, "rounds_done": 0, "seed": self.seed, "gap_rule": repr(self.gap_rule),
                "fingerprint": fingerprint, "M": torch.zeros(num_train), "gaps": torch.zeros(num_train),
                "train_logit_sum": None, "val_logits": [], "members": [], "history": []}

    def check_startable(self) -> None:
        """The checks that need no data: run directory usable, ``--ckpt_path`` names a run."""
        if self.require_existing and not self.state_path.is_file():
            raise ConfigError("ckpt_path", str(self.run_dir),
                              f"a boosting run directory holding {STATE_FILE} (or that file); to start a new "
                              "run leave --ckpt_path out", describe=False)
        check_run_dir(self.run_dir)
        if self.state_path.exists() and not self.resume:
            raise ConfigError("boosting.resume", False, f"true, to continue the run in {str(self.run_dir)!r} "
                              "(it holds state.pt), or another boosting.run_dir")

    def _load_or_start(self, fingerprint: dict[str, str], num_train: int) -> dict[str, Any]:
        if not self.state_path.exists():
            return self._fresh_state(fingerprint, num_train)
        state = load_state(self.run_dir)
        if state.get("version") != STATE_VERSION:
            raise ConfigError(str(self.state_path), f"version {state.get('version')}",
                              f"version {STATE_VERSION} (rounds numbered from 1); start a new run in another "
                              "boosting.run_dir", describe=True)
        differences = fingerprint_differences(state["fingerprint"], fingerprint)
        if differences:
            raise ConfigError(f"resume of {self.run_dir}", "; ".join(differences),
                              "the configuration the run was started with (drop these overrides), or another "
                              "boosting.run_dir for a new run", describe=True)
        if self.rounds < state["rounds_done"]:
            raise ConfigError("boosting.rounds", self.rounds,
                              f"an integer >= {state['rounds_done']} (rounds already done in {self.run_dir})")
        member_paths(self.run_dir, state)  # every completed member's checkpoint must be there
        return state

    # -- the loop ---------------------------------------------------------------------------
    def run(self, model_factory: Callable[[int, int], L.LightningModule],
            trainer_factory: Callable[[int, Path], L.Trainer], datamodule: L.LightningDataModule,
            member_launcher: MemberLauncher | None = None) -> dict[str, Any]:
        """Train the remaining rounds; returns the summary (also written to ``summary.json``).

        Args:
            model_factory: ``(t, seed) -> LightningModule``, called after seeding; ``t`` in ``1..T``.
            trainer_factory: ``(t, round_dir) -> Trainer``; a fresh Trainer per round.
            datamodule: a ``GapDataModule`` (needs ``set_gaps``, ``train_eval_dataloader``).
            member_launcher: starts the worker process that trains member ``t`` while this one
                trains another (``concurrent_members > 1``); ``lightning fit`` passes one.
        """
        self.check_startable()
        if self.concurrent_members > 1 and member_launcher is None:
            raise ConfigError("boosting.concurrent_members", self.concurrent_members,
                              "1 when run from Python without a member_launcher (`lightning fit` starts the "
                              "worker processes)")
        if os.environ.get("LOCAL_RANK", "0") == "0":
            datamodule.prepare_data()  # download once per node, before the training set is read
        targets = _wait_for_training_set(datamodule)
        num_train = datamodule.num_train
        state = self.state = self._load_or_start(self.fingerprint(targets), num_train)
        self._publish(state, targets)  # repairs summary.json / events a crash left stale
        datamodule.set_gaps(state["gaps"])
        display = RoundDisplay(self.rounds)
        if state["rounds_done"] == self.rounds:
            display.complete(state["rounds_done"], self.run_dir)
        workers = _Workers(member_launcher, self.concurrent_members)
        try:
            for t in range(state["rounds_done"] + 1, self.rounds + 1):
                self._round(t, state, targets, model_factory, trainer_factory, datamodule, display, workers)
        finally:
            workers.stop()
        return self.summary(state)

    def _round(self, t: int, state: dict[str, Any], targets: Tensor, model_factory, trainer_factory, datamodule,
               display: RoundDisplay, workers: _Workers) -> None:
        round_started = time.perf_counter()
        num_train = datamodule.num_train
        seed = member_seed(self.seed, t)
        rdir = round_dir(self.run_dir, t)
        display.start(t, seed)
        if t in workers and (status := workers.wait(t)) != 0:
            rank_zero_warn(f"boosting: the worker process for round {t} exited with status {status} (log: "
                           f"{rdir / WORKER_LOG}); training the member here")
        prefit = self._prefit(t, seed)
        if prefit is None:
            for u in range(t + 1, min(self.rounds, t + self.concurrent_members - 1) + 1):
                if u not in workers and self._prefit(u, member_seed(self.seed, u)) is None:
                    workers.launch(u, round_dir(self.run_dir, u))
            with workers.sharing_threads():
                model, trainer, fit_seconds, shared = self.fit_member(t, seed, model_factory, trainer_factory,
                                                                       datamodule, display)
            sharpness = member_sharpness(trainer)
        else:
            model, trainer = self._prefit_member(t, seed, prefit, model_factory, trainer_factory)
            fit_seconds, sharpness, shared = prefit["fit_seconds"], prefit["sharpness"], None
        checkpoint = rdir / MEMBER_FILE
        train_logits, val_logits, val_y, score_seconds = self._score(model, trainer, datamodule, num_train, shared)
        m = ensemble_m = None
        if train_logits is not None:
            train_logits = train_logits.cpu()
            m = margins(train_logits, targets)
            state["M"] = state["M"] + m
            logit_sum = train_logits if state["train_logit_sum"] is None else state["train_logit_sum"] + train_logits
            state["train_logit_sum"] = logit_sum
            ensemble_m = margins(logit_sum, targets)
        gaps = self.gap_rule(state["M"], t)
        assert_identical_across_ranks(gaps, "gaps")
        datamodule.set_gaps(gaps)
        state["gaps"] = gaps.clone()
        state["val_logits"].append(val_logits.cpu())
        state["val_y"] = val_y.cpu()  # the reliability diagram's labels
        metrics = ensemble_metrics(state["val_logits"], val_y.cpu())
        relative = str(checkpoint.relative_to(self.run_dir))
        record = {"round": t, "seed": seed, "checkpoint": relative, "fit_seconds": fit_seconds,
                  "score_seconds": score_seconds, **metrics,
                  "member_train_margin": None if m is None else margin_summary(m),
                  "ensemble_train_margin": None if ensemble_m is None else margin_summary(ensemble_m),
                  "gap": margin_summary(gaps), "sharpness": sharpness}
        if prefit is not None:
            record["trained_in_worker"] = True
        state["members"].append({"round": t, "seed": seed, "checkpoint": relative,
                                 "class_path": _class_path(model)})
        state["history"].append(record)
        state["rounds_done"] = t
        self._commit(state, m, ensemble_m)
        self._publish(state, targets)
        self._record_round_time(state, time.perf_counter() - round_started)
        display.end(state["history"])

    def fit_member(self, t: int, seed: int, model_factory: Callable[[int, int], L.LightningModule],
                   trainer_factory: Callable[[int, Path], L.Trainer], datamodule: L.LightningDataModule,
                   display: RoundDisplay | None = None):
        """Seed, build and fit member ``t``, resuming its round's ``last.ckpt``; save ``member.ckpt``.

        Returns ``(model, trainer, fit_seconds, shared margin callback or None)``.
        """
        L.seed_everything(seed, workers=True, verbose=False)
        model = model_factory(t, seed)
        self._check_head_takes_gaps(model)
        rdir = round_dir(self.run_dir, t)
        trainer = trainer_factory(t, rdir)
        _check_trainer_trains(trainer)
        trainer.callbacks.append(RoundCheckpoint(rdir / LAST_CHECKPOINT.parent))
        shared = self._shareable_margin_callback(trainer)
        if display is not None:
            display.attach(trainer)
        last = rdir / LAST_CHECKPOINT
        started = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None)
        if trainer.interrupted:
            raise KeyboardInterrupt(f"boosting round {t} was interrupted; re-run the command to resume")
        fit_seconds = time.perf_counter() - started
        trainer.save_checkpoint(rdir / MEMBER_FILE, weights_only=False)  # every rank calls it; rank 0 writes
        return model, trainer, fit_seconds, shared

    def fit_in_worker(self, t: int, model_factory: Callable[[int, int], L.LightningModule],
                      trainer_factory: Callable[[int, Path], L.Trainer], datamodule: L.LightningDataModule) -> None:
        """A worker process's whole job: fit member ``t`` on zero gaps, then write ``prefit.json``.

        The file comes last (atomically), so a member counts as trained only when it is complete;
        it records what the round's record needs and the run's fingerprint, which the
        orchestrator compares before using the member.
        """
        if os.environ.get("LOCAL_RANK", "0") == "0":
            datamodule.prepare_data()
        targets = _wait_for_training_set(datamodule)
        datamodule.set_gaps(torch.zeros(datamodule.num_train))
        seed = member_seed(self.seed, t)
        _, trainer, fit_seconds, _ = self.fit_member(t, seed, model_factory, trainer_factory, datamodule)
        save_atomic({"round": t, "seed": seed, "fingerprint": _digest(self.fingerprint(targets)),
                     "fit_seconds": fit_seconds, "sharpness": member_sharpness(trainer)},
                    round_dir(self.run_dir, t) / PREFIT_FILE)

    def _prefit(self, t: int, seed: int) -> dict[str, Any] | None:
        """Member ``t`` as a worker left it (this run's fingerprint and seed), else ``None``."""
        if self.concurrent_members == 1 or self.state is None:
            return None
        path = round_dir(self.run_dir, t) / PREFIT_FILE
        if not path.is_file() or not (round_dir(self.run_dir, t) / MEMBER_FILE).is_file():
            return None
        prefit = json.loads(path.read_text())
        if prefit.get("seed") != seed or prefit.get("fingerprint") != _digest(self.state["fingerprint"]):
            return None
        return prefit

    def _prefit_member(self, t: int, seed: int, prefit: Mapping[str, Any], model_factory, trainer_factory):
        """Member ``t`` built as :meth:`fit_member` builds it, with the weights a worker trained."""
        L.seed_everything(seed, workers=True, verbose=False)
        model = model_factory(t, seed)
        saved = torch.load(round_dir(self.run_dir, t) / MEMBER_FILE, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["state_dict"])
        rank_zero_info(f"boosting: round {t}'s member was trained by a worker process in {prefit['fit_seconds']:.1f} s "
                       f"(log: {round_dir(self.run_dir, t) / WORKER_LOG})")
        return model, trainer_factory(t, round_dir(self.run_dir, t))

    def _check_head_takes_gaps(self, model: L.LightningModule) -> None:
        """Before any training: a head that refuses gaps (``linear``) only boosts with ``NoGapRule``."""
        head = getattr(model, "head", None)
        if getattr(head, "accepts_gap", True) or isinstance(self.gap_rule, NoGapRule):
            return
        raise ConfigError("boosting.gap_rule", f"{self.gap_rule!r} with model.head {head.name!r}",
                          "NoGapRule for this head (it has no fixed logit scale), or a head that takes "
                          "gaps: margin, l2_softmax, cosface, arcface", describe=True)

    def _shareable_margin_callback(self, trainer: L.Trainer) -> TrainingLogits | None:
        """An attached measurement of the whole training set (``PerSampleMargins``,
        ``MarginTheoryCheck``) whose last pass can stand in for the round's own.

        Its pass is used when it ran at the fit's last step (at fit end, or at the end of the last
        epoch), i.e. on the final weights. On one process only: under DDP each rank measures with
        its own BN statistics, the round with rank 0's.
        """
        # trainer.world_size: under Lightning's DDP launchers the process group starts inside fit
        if not self.scores_training_set or is_distributed() or trainer.world_size > 1:
            return None
        for callback in trainer.callbacks:
            if isinstance(callback, TrainingLogits) and getattr(callback, "num_batches", None) is None:
                callback.keep_logits = True
                return callback
        return None

    def _score(self, model: L.LightningModule, trainer: L.Trainer, datamodule, num_train: int,
               shared: TrainingLogits | None = None):
        """Training-set (``None`` when not scored) and validation logits of the finished member.

        The training-set logits come from ``shared``'s latest measurement when it measured the
        final weights (one pass per round), else from a pass of their own, on the training device.
        """
        started = time.perf_counter()
        device = trainer.strategy.root_device
        model.to(device)
        broadcast_buffers(model)
        train_logits = shared.logits_at(trainer.global_step) if shared is not None else None
        if train_logits is None and self.scores_training_set:
            train_logits, _ = collect_logits(model, datamodule.train_eval_dataloader(), num_train, device)
        val_loader = _sharded(datamodule.val_dataloader())
        val_logits, val_y = collect_logits(model, val_loader, len(val_loader.dataset), device)
        model.cpu()
        return train_logits, val_logits, val_y, time.perf_counter() - started

    def summary(self, state: dict[str, Any]) -> dict[str, Any]:
        timed = [r for r in state["history"] if "round_seconds" in r and not r.get("trained_in_worker")]
        fit = sum(r["fit_seconds"] for r in timed)
        overhead = sum(r["round_seconds"] - r["fit_seconds"] for r in timed) / fit if fit > 0 else None
        return {"rounds": self.rounds, "rounds_done": state["rounds_done"], "seed": self.seed,
                "gap_rule": state["gap_rule"], "fingerprint": state["fingerprint"],
                "run_dir": str(self.run_dir), "overhead": overhead, "history": state["history"]}

    def _record_round_time(self, state: dict[str, Any], round_seconds: float) -> None:
        """The round's wall time and ``overhead`` = (round − fit) / fit, saved with the state.

        Measured after the commit and the publishing, so it covers everything a round does
        besides ``fit``: building the member and its trainer, saving it, scoring, the ensemble
        metrics, the state and the logs (all but this second save of the state and summary, which
        carries the timing). A run that dies right here keeps the round without them.
        """
        record = state["history"][-1]
        record["round_seconds"] = round_seconds
        # a worker's member: this process only waited for it, there is no fit here to compare with
        record["overhead"] = None if record.get("trained_in_worker") else \
            (round_seconds - record["fit_seconds"]) / record["fit_seconds"]
        self._save_state_and_summary(state)

    @rank_zero_only
    def _save_state_and_summary(self, state: dict[str, Any]) -> None:
        save_atomic(state, self.state_path)
        save_atomic(self.summary(state), self.run_dir / SUMMARY_FILE)

    @rank_zero_only
    def _commit(self, state: dict[str, Any], member_margins: Tensor | None, ensemble_margins: Tensor | None) -> None:
        """Round ``t``'s margins, then ``state.pt`` (the commit point), then drop the round's last.ckpt."""
        rdir = round_dir(self.run_dir, state["rounds_done"])
        rdir.mkdir(parents=True, exist_ok=True)
        save_atomic({"M": state["M"], "gaps": state["gaps"], "member_margins": member_margins,
                     "ensemble_margins": ensemble_margins}, rdir / "margins.pt")
        save_atomic(state, self.state_path)
        (rdir / LAST_CHECKPOINT).unlink(missing_ok=True)

    @rank_zero_only
    def _publish(self, state: dict[str, Any], targets: Tensor) -> None:
        """The ensemble's events and ``summary.json`` of the committed state, each written once.

        Idempotent: a run that died between ``state.pt`` and these files gets them on its next start.
        """
        if state["rounds_done"] == 0:
            return
        self.ensemble_logger.publish(self.run_dir, state, targets, self.rounds,
                                     (self.gap_rule.g_min, self.gap_rule.g_max))
        summary_path = self.run_dir / SUMMARY_FILE
        summary = self.summary(state)
        if not summary_path.is_file() or json.loads(summary_path.read_text()) != json.loads(json.dumps(summary)):
            save_atomic(summary, summary_path)


def _check_trainer_trains(trainer: L.Trainer) -> None:
    """A member that trains no step would be scored untrained and recorded as a round."""
    if trainer.max_epochs == 0:
        raise ConfigError("trainer.max_epochs", 0, "an integer >= 1 under boosting (each member must train)")
    if trainer.max_steps == 0:
        raise ConfigError("trainer.max_steps", 0, "-1 or an integer >= 1 under boosting (each member must train)")
