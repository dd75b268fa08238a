"""``NormalizedMargins``: Jiang et al.'s normalized margin distributions as a metric callback."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from torch import nn

from .base import MeasurementBatches, SharpnessCallback
from .functional.normalized_margins import (
    INPUT,
    OUTPUT,
    margin_distribution_features,
    normalized_layer_margins,
)


def default_layers(model: nn.Module) -> list[str]:
    """The output, the backbone's activation outputs (``ReLU`` modules) and the head's input.

    For ``models.MarginClassifier`` this is every hidden layer after its nonlinearity, the
    BN-normalised features the head ``W`` sees (``head.bn``), and the logits.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU | nn.GELU | nn.SiLU)]
    if "head.bn" in dict(model.named_modules()):
        names.append("head.bn")
    return [*names, OUTPUT]


class NormalizedMargins(SharpnessCallback):
    r"""Distributions of the normalized margins :math:`\hat d_l = d_l/\nu_l` over the training set.

    :math:`d_l` is the first-order distance of layer ``l``'s activation to the decision boundary
    (:func:`~callbacks.functional.normalized_margins.normalized_layer_margins`) and :math:`\nu_l` the
    layer's total variation :math:`\sqrt{\operatorname{tr}\operatorname{Cov}(h_l)}`. Eval mode,
    un-augmented inputs, fp32; under DDP the distances are gathered by index. Logs for every
    layer ``<layer>/q1 .. upper_fence, mean, std, skewness, kurtosis`` and the total variation
    ``<layer>/total_variation``.

    Args:
        layers: module names (``"backbone.2"``), ``"input"`` or ``"output"``; ``None`` takes
            :func:`default_layers`.
        **kwargs: :class:`~callbacks.SharpnessCallback` arguments (``num_batches`` for a subset).

    Attributes:
        latest: the latest :class:`~callbacks.functional.normalized_margins.NormalizedMarginResult`.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: callbacks.NormalizedMargins
              init_args: {every_n_epochs: 5, layers: [backbone.2, head.bn, output]}
    """

    name = "normalized_margins"
    default_bn_mode = "eval"
    default_cache_batches = False
    reduce_values = False

    def __init__(self, layers: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.layers = list(layers) if layers is not None else None
        self.latest = None

    def settings(self) -> dict[str, Any]:
        return {"layers": self.layers}

    def resolved_layers(self, pl_module: nn.Module) -> list[str]:
        return self.layers if self.layers is not None else default_layers(pl_module)

    def measure(self, pl_module: L.LightningModule, batches: MeasurementBatches) -> dict[str, Any]:
        layers = self.resolved_layers(pl_module)
        full = batches.num_total >= batches.dataset_size  # the whole training set: place objects by idx
        result = normalized_layer_margins(pl_module, batches, layers, batches.dataset_size if full else None)
        self.latest = result
        out: dict[str, Any] = {}
        for layer in layers:
            label = layer.replace(".", "_")
            for key, value in margin_distribution_features(result.normalized[layer]).items():
                out[f"{label}/{key}"] = value
            out[f"{label}/total_variation"] = result.total_variation[layer]
        return out


__all__ = ["INPUT", "OUTPUT", "NormalizedMargins", "default_layers"]
