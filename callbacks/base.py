"""``SharpnessCallback``: the base of every metric callback.

A subclass implements :meth:`SharpnessCallback.measure` and returns named values; everything
around it (when, on which data, in which mode, leaving the model as it was, reducing across
ranks, logging, history) lives here.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torch.utils.data import DataLoader

from marginboost.batches import as_batch, batch_len, batch_to
from marginboost.distributed import comm_device, is_distributed
from marginboost.errors import ConfigError, check_bool, check_choice, check_int
from models.losses import resolve_criterion
from models.state import BN_MODES, batchnorm_mode, preserved_state


@dataclass
class Measurement:
    """A measured value, optionally with its standard error and what else describes it.

    ``value`` is a float or a tensor (a 1-element tensor is a scalar; a longer one is logged as a
    histogram); ``info`` (e.g. ``{"probes": 32}``) is copied into the history record.
    """

    value: float | Tensor
    stderr: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def is_scalar(self) -> bool:
        return not torch.is_tensor(self.value) or self.value.numel() == 1


# -- the measurement data -----------------------------------------------------------------------

class MeasurementBatches:
    """This rank's measurement batches: re-iterable, on the model's device, with counts.

    Attributes: ``num_samples`` (this rank), ``num_total`` (all ranks), ``dataset_size`` (the
    whole training set), ``batch_size``, ``num_batches`` (this rank), ``description``.
    """

    def __init__(self, loader: Iterable, device: torch.device, num_samples: int, num_total: int,
                 dataset_size: int, batch_size: int, num_batches: int, description: str,
                 cache: bool = True) -> None:
        self.loader, self.device, self.cache = loader, device, cache
        self.num_samples, self.num_total, self.dataset_size = num_samples, num_total, dataset_size
        self.batch_size, self.num_batches, self.description = batch_size, num_batches, description
        self._cached: list[dict[str, Tensor]] | None = None
        self.on_batch = None  # set by the base to advance a progress task

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        source = self._cached if self._cached is not None else self._load()
        for batch in source:
            if self.on_batch is not None:
                self.on_batch()
            yield batch

    def _load(self) -> Iterator[dict[str, Tensor]]:
        kept = []
        for raw in self.loader:
            batch = batch_to(as_batch(raw), self.device)
            if self.cache:
                kept.append(batch)
            yield batch
        if self.cache:
            self._cached = kept


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


class TrainingLogits:
    """Mixin of a measurement that passes over the whole training set: with ``keep_logits`` it
    keeps that pass's fp32 logits ``[num_train, K]`` (CPU) in :attr:`logits`, for a caller that
    needs them at the same weights. The boosting orchestrator sets it on a member's callback and
    takes the logits of a pass that ran at the fit's last step instead of making a pass of its
    own (one pass over the training set per round)."""

    keep_logits: bool = False
    logits: Tensor | None = None

    def logits_at(self, step: int) -> Tensor | None:
        """The kept logits when the latest measurement ran at ``global_step == step``, else ``None``."""
        if self.logits is None or getattr(self, "_last_step", None) != step:
            return None
        return self.logits


class SharpnessCallback(Callback):
    """Base class of the metric callbacks: implement :meth:`measure`, get the rest.

    The base class owns:

    * **schedule**: every ``every_n_epochs`` training epochs (``None``/``0``: never), once at
      ``at_fit_end`` (in a boosting run: every member, each round being one fit), and whenever
      :meth:`measure_now` is called;
    * **data**: the DataModule's ordered, un-augmented ``train_eval_dataloader()`` dataset, the
      whole training set or a fixed seeded subset of ``num_batches`` batches of ``batch_size``.
      Under DDP whole batches are dealt to ranks round-robin, so every batch is the batch one
      process would see (no padding duplicates, same BN batch statistics);
    * **mode and seed**: everything in eval mode except BN in ``bn_mode``; ``torch``, numpy and
      python RNGs seeded with ``seed`` (the same probes every time: epochs compare directly);
      autograd on (``inference_mode(False)``, ``enable_grad``), autocast off;
    * **restoring** parameters, buffers (BN statistics, ``num_batches_tracked``), ``.grad``,
      train/eval flags and RNG states exactly (:class:`~models.state.ModelState`);
    * **reduction**: with ``reduce_values = True`` (the default for subclasses) each scalar is a
      mean over this rank's samples and the base makes it the mean over all samples (weights =
      sample counts; standard errors combined as independent). Built-ins that reduce inside their
      own computation set ``reduce_values = False``;
    * **logging**: scalars (and ``<name>_stderr``) to every logger under ``<prefix>/<name>`` at
      ``trainer.global_step``; histograms and matplotlib figures to TensorBoard on rank 0; the
      scalars also land in ``trainer.callback_metrics`` (monitorable);
    * **history**: one record per value with what was measured (criterion, data, augmentation,
      BN mode, batch size, samples, seed, dtype, stderr, world size, plus the metric's own info);
    * **progress**: a task in the ``RichProgressBar`` while measuring, when there is one.

    Args:
        every_n_epochs: measure after every n-th training epoch; ``None`` or ``0`` disables.
        at_fit_end: measure when ``fit`` ends (skipped if the last epoch was just measured).
        num_batches: ``None``: the whole training set; ``k``: a fixed subset of ``k`` batches
            drawn with ``seed``.
        batch_size: measurement batch size (``None``: the loader's, usually ``eval_batch_size``).
        drop_last: drop the last incomplete batch (``None``: the metric's ``default_drop_last``).
        seed: seed of the subset and of the probes.
        criterion: ``"discounted_ce"`` (the training criterion, gaps included), ``"ce"`` or a
            callable ``(logits, batch) -> loss``.
        bn_mode: ``"eval"`` or ``"train"``; ``None`` takes the metric's default.
        prefix: logging prefix (default: the class's ``name``).
        cache_batches: keep the measurement batches on the device between passes (``None``: the
            metric's ``default_cache_batches``).
        progress: show a Rich progress task.

    Example (a metric in a few lines)::

        class MeanLoss(SharpnessCallback):
            name = "mean_loss"

            def measure(self, pl_module, batches):
                losses = [self.loss(pl_module, b) for b in batches]
                return {"value": torch.stack(losses).mean()}
    """

    name: str = "metric"
    default_bn_mode: str = "eval"
    default_drop_last: bool = False
    default_cache_batches: bool = True
    reduce_values: bool = True
    augmentation: str = "none (train_eval_dataloader)"

    def __init__(self, every_n_epochs: int | None = 1, at_fit_end: bool = True, num_batches: int | None = None,
                 batch_size: int | None = None, drop_last: bool | None = None, seed: int = 0,
                 criterion: Any = "discounted_ce", bn_mode: str | None = None, prefix: str | None = None,
                 cache_batches: bool | None = None, progress: bool = True) -> None:
        owner = type(self).__name__
        if every_n_epochs is not None:
            check_int(f"{owner}.every_n_epochs", every_n_epochs, low=0)
        for name, value in (("num_batches", num_batches), ("batch_size", batch_size)):
            if value is not None:
                check_int(f"{owner}.{name}", value, low=1)
        check_int(f"{owner}.seed", seed, low=0)
        drop_last = self.default_drop_last if drop_last is None else drop_last
        cache_batches = self.default_cache_batches if cache_batches is None else cache_batches
        for name, value in (("at_fit_end", at_fit_end), ("drop_last", drop_last), ("cache_batches", cache_batches),
                            ("progress", progress)):
            check_bool(f"{owner}.{name}", value)
        bn_mode = self.default_bn_mode if bn_mode is None else bn_mode
        check_choice(f"{owner}.bn_mode", bn_mode, BN_MODES)
        self.criterion_fn, self.criterion_name = resolve_criterion(criterion, f"{owner}.criterion")
        self.every_n_epochs, self.at_fit_end = every_n_epochs, at_fit_end
        self.num_batches, self.batch_size, self.drop_last = num_batches, batch_size, drop_last
        self.seed, self.bn_mode, self.cache_batches, self.progress = seed, bn_mode, cache_batches, progress
        self.prefix = prefix if prefix is not None else self.name
        self.history: list[dict[str, Any]] = []
        self._last_step: int | None = None
        self._progress_task: Any = None

    # -- what a subclass implements ------------------------------------------------------------
    def measure(self, pl_module: L.LightningModule,
                batches: MeasurementBatches) -> Mapping[str, float | Tensor | Measurement]:
        """Measure on ``batches`` (this rank's share) and return named values.

        Runs with the mode, seed and autograd set up; the model is restored afterwards, so it may
        be changed freely. Return floats, tensors or :class:`Measurement` s.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement measure(pl_module, batches)")

    def settings(self) -> dict[str, Any]:
        """Extra fields for every history record (e.g. the number of probes)."""
        return {}

    def expected_passes(self) -> int:
        """Passes over the batches one measurement makes (sizes the progress task)."""
        return 1

    def on_measured(self, trainer: L.Trainer | None, pl_module: L.LightningModule,
                    results: dict[str, Measurement], tag: str) -> None:
        """Called on every rank after a measurement is reduced and logged (e.g. to save files)."""

    # -- helpers for subclasses --------------------------------------------------------------
    def loss(self, pl_module: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """The criterion on one batch: ``criterion(pl_module(batch["x"]), batch)``."""
        return self.criterion_fn(pl_module(batch["x"]), batch)

    # -- data ------------------------------------------------------------------------------------
    def _datamodule(self, trainer: L.Trainer | None, datamodule: Any) -> Any:
        dm = datamodule if datamodule is not None else getattr(trainer, "datamodule", None)
        if dm is None or not callable(getattr(dm, "train_eval_dataloader", None)):
            raise ConfigError(f"{type(self).__name__}.datamodule", type(dm).__name__ if dm is not None else "none",
                              "a DataModule with train_eval_dataloader() (any datamodules.GapDataModule); fit with "
                              "datamodule=..., or pass datamodule= to measure_now", describe=True)
        return dm

    def default_batch_size(self, datamodule: Any, loader: DataLoader) -> int:
        return loader.batch_size or 1

    def measurement_batches(self, trainer: L.Trainer | None, pl_module: L.LightningModule,
                            datamodule: Any = None) -> MeasurementBatches:
        """This rank's batches of the measurement set (see the class docstring)."""
        owner = type(self).__name__
        dm = self._datamodule(trainer, datamodule)
        full = dm.train_eval_dataloader(distributed=False)
        if not isinstance(full, DataLoader) or isinstance(full.dataset, torch.utils.data.IterableDataset):
            return self._batches_from_iterable(full, pl_module)
        dataset = full.dataset
        n = len(dataset)
        bs = self.batch_size or self.default_batch_size(dm, full)
        if self.num_batches is None:
            order = torch.arange(n)
            what = f"train: all {n}"
        else:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[: self.num_batches * bs]
            what = f"train: seeded subset of {min(self.num_batches * bs, n)}/{n} (seed {self.seed})"
        chunks = [c.tolist() for c in order.split(bs)]
        if self.drop_last and chunks and len(chunks[-1]) < bs:
            chunks = chunks[:-1]
        if not chunks:
            raise ConfigError(f"{owner}.batch_size", bs, f"at most the training-set size {n} with drop_last=true "
                              "(or set drop_last=false)")
        rank, world = _rank_world()
        mine = chunks[rank::world]
        loader = DataLoader(dataset, batch_sampler=mine, num_workers=full.num_workers, collate_fn=full.collate_fn,
                            pin_memory=full.pin_memory)
        return MeasurementBatches(loader, pl_module.device, sum(map(len, mine)), sum(map(len, chunks)), n, bs,
                                  len(mine), f"{what}, {len(chunks)} batches of {bs}" +
                                  (" (last dropped)" if self.drop_last else ""), self.cache_batches)

    def _batches_from_iterable(self, loader: Any, pl_module: L.LightningModule) -> MeasurementBatches:
        # A loader without indexable data: its own batches in its order, the first num_batches of
        # them for a subset (no seeded draw possible), dealt to ranks round-robin as above.
        rank, world = _rank_world()
        kept, sizes = [], []
        for i, raw in enumerate(loader):
            if self.num_batches is not None and i >= self.num_batches:
                break
            batch = as_batch(raw)
            sizes.append(batch_len(batch))
            if i % world == rank:
                kept.append(batch_to(batch, pl_module.device))
        if self.drop_last and sizes and sizes[-1] < sizes[0]:
            sizes.pop()
            if (len(sizes)) % world == rank:
                kept.pop()
        if not sizes:
            raise ValueError(f"{type(self).__name__}: train_eval_dataloader() yielded no batches")
        what = "train: all" if self.num_batches is None else f"train: first {len(sizes)} batches"
        return MeasurementBatches(kept, pl_module.device, sum(sizes[rank::world]), sum(sizes), sum(sizes), sizes[0],
                                  len(kept), f"{what} ({sum(sizes)} samples, loader order)", cache=False)

    # -- the measurement --------------------------------------------------------------------
    def measure_now(self, trainer: L.Trainer | None, pl_module: L.LightningModule, tag: str | None = None,
                    step: int | None = None, datamodule: Any = None) -> dict[str, Measurement]:
        """Measure now, log, append to :attr:`history` and return ``{name: Measurement}``.

        Call on every rank (it runs collectives). ``tag`` names the occasion (``"round3"``;
        default ``"step<global_step>"``), ``step`` the logging step (default
        ``trainer.global_step``). Without a trainer pass ``datamodule``; nothing is logged then.
        """
        epoch = trainer.current_epoch if trainer is not None else None
        gstep = trainer.global_step if trainer is not None else None
        step = step if step is not None else (gstep if gstep is not None else len(self.history))
        tag = tag if tag is not None else f"step{step}"
        with preserved_state(pl_module), torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(pl_module.device.type, enabled=False), batchnorm_mode(pl_module, self.bn_mode):
            torch.manual_seed(self.seed)
            np.random.seed(self.seed)
            random.seed(self.seed)
            batches = self.measurement_batches(trainer, pl_module, datamodule)
            self._start_progress(trainer, len(batches) * self.expected_passes())
            batches.on_batch = self._advance_progress
            try:
                raw = self.measure(pl_module, batches)
            finally:
                batches.on_batch = None
                self._stop_progress()
        results = self._as_measurements(raw)
        if self.reduce_values:
            results = self._reduce(results, batches.num_samples)
        self._record(results, batches, pl_module, epoch, gstep, step, tag)
        self._log(trainer, results, step)
        self._last_step = gstep
        self.on_measured(trainer, pl_module, results, tag)
        return results

    def _as_measurements(self, raw: Mapping[str, Any]) -> dict[str, Measurement]:
        if not isinstance(raw, Mapping):
            raise TypeError(f"{type(self).__name__}.measure must return a mapping name -> value, got "
                            f"{type(raw).__name__}")
        out = {}
        for k, v in raw.items():
            m = v if isinstance(v, Measurement) else Measurement(v)
            if torch.is_tensor(m.value):
                m.value = m.value.detach()
                if m.value.numel() == 1:
                    m.value = float(m.value)
            elif isinstance(m.value, (int, float)):
                m.value = float(m.value)
            if torch.is_tensor(m.stderr):
                m.stderr = float(m.stderr)
            out[k] = m
        return out

    def _reduce(self, results: dict[str, Measurement], n_local: int) -> dict[str, Measurement]:
        if not is_distributed():
            return results
        keys = [k for k in sorted(results) if results[k].is_scalar and isinstance(results[k].value, float)]
        rows = []
        for k in keys:
            m = results[k]
            value = m.value * n_local if n_local else 0.0
            se = (m.stderr * n_local) ** 2 if (m.stderr is not None and n_local) else 0.0
            rows.append([value, se, float(n_local), float(m.stderr is not None)])
        t = torch.tensor(rows or [[0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
        buf = t.to(comm_device())
        dist.all_reduce(buf)
        t = buf.cpu()
        for i, k in enumerate(keys):
            total = t[i, 2].item()
            results[k].value = t[i, 0].item() / total if total else float("nan")
            if results[k].stderr is not None:
                results[k].stderr = math.sqrt(t[i, 1].item()) / total if total else float("nan")
        return results

    def _record(self, results: dict[str, Measurement], batches: MeasurementBatches, pl_module: nn.Module,
                epoch: int | None, gstep: int | None, step: int, tag: str) -> None:
        params = [p for p in pl_module.parameters() if p.is_floating_point()]
        base = {"epoch": epoch, "global_step": gstep, "step": step, "tag": tag, "criterion": self.criterion_name,
                "data": batches.description, "augmentation": self.augmentation, "bn_mode": self.bn_mode,
                "batch_size": batches.batch_size, "num_samples": batches.num_total, "seed": self.seed,
                "dtype": str(params[0].dtype).replace("torch.", "") if params else None,
                "world_size": _rank_world()[1], **self.settings()}
        for k, m in results.items():
            value = m.value if m.is_scalar else "tensor" + str(list(m.value.shape))
            self.history.append({"metric": f"{self.prefix}/{k}", "value": value, "stderr": m.stderr,
                                 **base, **m.info})

    def _scalars(self, results: dict[str, Measurement]) -> dict[str, float]:
        out = {}
        for k, m in results.items():
            if m.is_scalar and isinstance(m.value, float):
                out[f"{self.prefix}/{k}"] = m.value
                if m.stderr is not None:
                    out[f"{self.prefix}/{k}_stderr"] = m.stderr
        return out

    def _log(self, trainer: L.Trainer | None, results: dict[str, Measurement], step: int) -> None:
        if trainer is None:
            return
        scalars = self._scalars(results)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in scalars.items()})
        _log_rank_zero(trainer, scalars, {f"{self.prefix}/{k}": m.value for k, m in results.items()
                                          if not m.is_scalar or not isinstance(m.value, float)}, step)

    # -- progress ------------------------------------------------------------------------------
    def _start_progress(self, trainer: L.Trainer | None, total: int) -> None:
        from lightning.pytorch.callbacks import RichProgressBar

        bar = getattr(trainer, "progress_bar_callback", None) if trainer is not None else None
        progress = getattr(bar, "progress", None) if isinstance(bar, RichProgressBar) else None
        if not self.progress or progress is None:
            return
        self._progress_task = (bar, progress.add_task(f"measuring {self.prefix}", total=max(total, 1)))

    def _advance_progress(self) -> None:
        if self._progress_task is not None:
            bar, task = self._progress_task
            bar.progress.update(task, advance=1)
            bar.refresh()

    def _stop_progress(self) -> None:
        if self._progress_task is not None:
            bar, task = self._progress_task
            if bar.progress is not None:
                bar.progress.remove_task(task)
            self._progress_task = None

    # -- Lightning hooks -----------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and (self.every_n_epochs or self.at_fit_end):
            self._datamodule(trainer, None)  # fail before training, not after the first epoch
            self.check(trainer, pl_module)

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Validate the configuration against the model before training (override to add checks)."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.measure_now(trainer, pl_module, tag=f"epoch{trainer.current_epoch:04d}")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Measured here rather than in on_fit_end: Lightning moves the module back to the CPU
        # between the two, and a fit-end Hessian should run on the training device.
        if self.at_fit_end and self._last_step != trainer.global_step:
            self.measure_now(trainer, pl_module, tag="fit_end")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A fit with no training batches never calls on_train_end.
        self.on_train_end(trainer, pl_module)

    @property
    def state_key(self) -> str:
        # two instances of one metric with different settings keep separate checkpoint state
        return self._generate_state_key(prefix=self.prefix, seed=self.seed, num_batches=self.num_batches,
                                        batch_size=self.batch_size, bn_mode=self.bn_mode)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


@rank_zero_only
def _log_rank_zero(trainer: L.Trainer, scalars: dict[str, float], tensors: dict[str, Any], step: int) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if scalars:
            logger.log_metrics(scalars, step=step)
        if isinstance(logger, TensorBoardLogger):
            for name, value in tensors.items():
                if torch.is_tensor(value):
                    logger.experiment.add_histogram(name, value.detach().float().cpu(), global_step=step)
                elif hasattr(value, "savefig"):  # a matplotlib figure
                    logger.experiment.add_figure(name, value, global_step=step)
        logger.save()
