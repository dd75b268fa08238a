"""The seeds' theory, watched on a run: Theorem 1 (margins ≥ gap) and the mean-margin maximum.

* Seed 000, Theorem 1: with gap ``g``, once training reaches 100% accuracy every training margin
  is ``≥ g``. Logged per epoch from measured margins (eval mode, un-augmented training set):
  ``train/min_margin``, ``train/frac_below_gap`` (share of objects with ``m_i < g_i``, the gaps
  the member trains with), ``train/eval_acc`` (share with ``m_i > 0``: the premise) and
  ``train/eval_margin_mean``.
* Seed 004's mean-margin claim ``2/K·‖W‖₁`` is not a bound for ``K ≥ 3``
  (:mod:`models.margin_bounds`). Logged next to it, once computed per fit from the head alone:
  ``train/max_mean_margin``, the largest mean margin that BN-normalised features can reach with
  this ``W`` and the training set's class frequencies (:func:`models.max_bn_mean_margin`).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from marginboost import ConfigError, check_int, gather_by_index, per_sample_outputs
from models import margins as margins_from_logits
from models import max_bn_mean_margin, seed_mean_margin_value

from .base import MeasurementBatches, SharpnessCallback, TrainingLogits


def theorem1_summary(margins: Tensor, gaps: Tensor) -> dict[str, float]:
    """``min_margin``, ``frac_below_gap`` (``m_i < g_i``), ``eval_acc`` (``m_i > 0``), ``eval_margin_mean``.

    >>> theorem1_summary(torch.tensor([0.5, 2.0, -1.0]), torch.tensor([1.0, 1.0, 0.0]))["frac_below_gap"]
    0.6666666666666666
    """
    m, g = margins.detach().double(), gaps.detach().double()
    return {"min_margin": m.min().item(), "frac_below_gap": (m < g).double().mean().item(),
            "eval_acc": (m > 0).double().mean().item(), "eval_margin_mean": m.mean().item()}


class MarginTheoryCheck(SharpnessCallback, TrainingLogits):
    """Logs Theorem 1's quantities every epoch and the head's mean-margin maximum once per fit.

    Needs a model with a ``head.weight`` ``[K, D]`` after a BN without affine
    (``models.MarginClassifier``). Values go to ``train/...`` (see the module doc).

    Args:
        every_n_epochs: measure after every n-th epoch (``None``/``0``: only at fit end).
        at_fit_end: measure when the fit ends.
        max_margin_steps: ascent steps of :func:`models.max_bn_mean_margin` (``0``: skip it).
        batch_size: measurement batch size (``None``: the data module's ``eval_batch_size``).

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: callbacks.MarginTheoryCheck
    """

    name = "train"
    default_bn_mode = "eval"
    reduce_values = False

    def __init__(self, every_n_epochs: int | None = 1, at_fit_end: bool = True, max_margin_steps: int = 1000,
                 batch_size: int | None = None, progress: bool = False) -> None:
        super().__init__(every_n_epochs, at_fit_end, batch_size=batch_size, cache_batches=False, progress=progress)
        self.max_margin_steps = check_int("MarginTheoryCheck.max_margin_steps", max_margin_steps, low=0)
        self.max_mean_margin: float | None = None
        self.seed_value: float | None = None

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        weight = getattr(getattr(pl_module, "head", None), "weight", None)
        if not torch.is_tensor(weight) or weight.ndim != 2:
            raise ConfigError("MarginTheoryCheck", type(pl_module).__name__,
                              "a model with a head.weight [K, D] (models.MarginClassifier)", describe=True)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        weight = pl_module.head.weight
        self.seed_value = float(seed_mean_margin_value(weight))
        if self.max_margin_steps:
            targets = self._datamodule(trainer, None).train_targets
            freq = torch.bincount(targets.cpu(), minlength=weight.shape[0]).double()
            self.max_mean_margin, _ = max_bn_mean_margin(weight, freq, steps=self.max_margin_steps)

    def measure(self, pl_module: L.LightningModule, batches: MeasurementBatches) -> dict[str, Any]:
        keep = self.keep_logits  # the logits as a third column (TrainingLogits)
        if len(batches):
            m, g, *logits = per_sample_outputs(
                pl_module, batches, batches.dataset_size,
                lambda out, b: (margins_from_logits(out, b["y"]), b["gap"].to(out.dtype), *((out,) if keep else ())))
        else:  # more ranks than batches: this rank only joins the gathers
            device = pl_module.device
            empty, no_idx = torch.zeros(0, device=device), torch.zeros(0, dtype=torch.long, device=device)
            m = gather_by_index(empty, no_idx, batches.dataset_size)
            g = gather_by_index(empty, no_idx, batches.dataset_size)
            logits = [gather_by_index(torch.zeros(0, pl_module.head.weight.shape[0], device=device), no_idx,
                                      batches.dataset_size)] if keep else []
        self.logits = logits[0].detach().cpu() if logits else None
        out: dict[str, Any] = dict(theorem1_summary(m, g))
        if self.max_mean_margin is not None:
            out["max_mean_margin"] = self.max_mean_margin
        return out
