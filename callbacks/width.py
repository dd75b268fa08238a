"""``GradientNormWidth``: the gradient-norm minimum width as a metric callback."""

from __future__ import annotations

from typing import Any

import lightning as L

from .base import Measurement, MeasurementBatches, SharpnessCallback
from .functional.width import gradient_norm_width
from .rescaling import UnitNormRescaling


class GradientNormWidth(UnitNormRescaling, SharpnessCallback):
    r"""Gradient-norm minimum width: :math:`\frac1B\sum_b\|\nabla_\theta L_b\|_2` over one pass.

    Trainable parameters; scale-invariant weights (detected by structure
    and confirmed by :math:`\langle\nabla L, w\rangle\approx 0`, or listed in ``scale_invariant``)
    rescaled to unit norm in a copy (per output channel with ``per_channel``); BN with batch
    statistics on full minibatches (``drop_last``), running statistics untouched. The batch size
    defaults to the DataModule's training ``batch_size`` (the figure depends on it) and is recorded.
    Logs ``width/width`` with its standard error over batches.
    """

    name = "width"
    default_bn_mode = "train"
    default_drop_last = True
    default_cache_batches = False
    reduce_values = False

    def __init__(self, normalize: bool = True, per_channel: bool = False, scale_invariant: list[str] | None = None,
                 tol: float = 1e-3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._init_scale(normalize, per_channel, scale_invariant, tol)

    def default_batch_size(self, datamodule: Any, loader: Any) -> int:
        return getattr(datamodule, "batch_size", None) or loader.batch_size or 1

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_names(pl_module)

    def settings(self) -> dict[str, Any]:
        return self.scale_settings()

    def measure(self, pl_module: L.LightningModule, batches: MeasurementBatches) -> dict[str, Any]:
        invariant = self.invariant(pl_module, batches)
        est = gradient_norm_width(pl_module, self.criterion_fn, batches, invariant, normalize=self.normalize,
                                  per_channel=self.per_channel, bn_mode=self.bn_mode)
        return {"width": Measurement(est.value, est.stderr, {"num_batches": est.num_batches}),
                "scale_invariant_tensors": float(len(est.scale_invariant))}
