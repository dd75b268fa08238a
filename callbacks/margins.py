"""``PerSampleMargins``: the margin of every training object, as a metric callback."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from torch import Tensor

from marginboost.distributed import gather_by_index
from marginboost.errors import check_bool
from marginboost.per_sample import collect_logits
from models.losses import margins as margins_from_logits

from .base import Measurement, MeasurementBatches, SharpnessCallback, TrainingLogits
from .functional.margins import collect_margins, margin_summary


class PerSampleMargins(SharpnessCallback, TrainingLogits):
    r"""Margins :math:`m_i = f(x_i)_{y_i} - \max_{j\ne y_i} f(x_i)_j` of every training object.

    Raw logits, eval mode, un-augmented inputs, fp32; under DDP gathered across ranks by index
    (every object exactly once). Logs the quartiles, Tukey fences, min, mean and the fraction of
    negative margins (:func:`~callbacks.functional.margins.margin_summary`) as scalars and the whole
    distribution as a histogram; rank 0 saves the ``[num_train]`` tensor to
    ``<save_dir or trainer.log_dir/margins>/margins_<tag>.pt`` (``tag`` = ``epoch0004``,
    ``fit_end`` or what :meth:`measure_now` was given, e.g. ``round2``).

    Args:
        keep_logits: also keep the fp32 logits ``[num_train, K]`` of the latest measurement in
            :attr:`logits` (see :class:`~callbacks.base.TrainingLogits`; the boosting orchestrator
            sets it on a member's callback).

    Attributes:
        margins: the latest full margin tensor ``[num_train]`` (CPU), ``None`` before the first.
        logits: the latest logits ``[num_train, K]`` (CPU) when ``keep_logits``, else ``None``.
        latest_path: where it was saved.
    """

    name = "margins"
    default_bn_mode = "eval"
    reduce_values = False

    def __init__(self, every_n_epochs: int | None = 1, at_fit_end: bool = True, save: bool = True,
                 save_dir: str | None = None, histogram: bool = True, batch_size: int | None = None,
                 prefix: str | None = None, progress: bool = True, keep_logits: bool = False) -> None:
        super().__init__(every_n_epochs=every_n_epochs, at_fit_end=at_fit_end, batch_size=batch_size, prefix=prefix,
                         cache_batches=False, progress=progress)
        self.save, self.save_dir, self.histogram = save, save_dir, histogram
        self.keep_logits = check_bool(f"{type(self).__name__}.keep_logits", keep_logits)
        self.margins: Tensor | None = None
        self.logits: Tensor | None = None
        self.latest_path: str | None = None

    def measure(self, pl_module: L.LightningModule, batches: MeasurementBatches) -> dict[str, Any]:
        self.logits = None
        if len(batches) and self.keep_logits:
            logits, y = collect_logits(pl_module, batches, batches.dataset_size)
            self.logits = logits.detach().cpu()
            m = margins_from_logits(logits, y)
        elif len(batches):
            m = collect_margins(pl_module, batches, batches.dataset_size)
        else:  # more ranks than batches: this rank only joins the gather(s)
            device = pl_module.device
            empty = (torch.zeros(0, device=device), torch.zeros(0, dtype=torch.long, device=device))
            if self.keep_logits:  # the same two gathers (logits, labels) as the other ranks
                num_classes = pl_module.head.weight.shape[0]
                logits = gather_by_index(torch.zeros(0, num_classes, device=device), empty[1], batches.dataset_size)
                y = gather_by_index(empty[1], empty[1], batches.dataset_size)
                self.logits = logits.detach().cpu()
                m = margins_from_logits(logits, y)
            else:
                m = gather_by_index(*empty, batches.dataset_size)
        self.margins = m.detach().cpu()
        out: dict[str, Any] = dict(margin_summary(m))
        if self.histogram:
            out["distribution"] = self.margins
        return out

    def on_measured(self, trainer: L.Trainer | None, pl_module: L.LightningModule,
                    results: dict[str, Measurement], tag: str) -> None:
        if not self.save:
            return
        if self.save_dir is not None:
            folder = self.save_dir
        elif trainer is not None:
            folder = os.path.join(trainer.log_dir, "margins")  # log_dir broadcasts: every rank calls it
        else:
            return
        path = os.path.join(folder, f"margins_{tag}.pt")
        if trainer is None or trainer.is_global_zero:
            os.makedirs(folder, exist_ok=True)
            torch.save(self.margins, path)
        self.latest_path = path
