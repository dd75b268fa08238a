"""The metrics of boosted and deep ensembles, from member logits (``callbacks.collect_logits``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import multiclass_calibration_error


def _accuracy(pred: Tensor, y: Tensor) -> float:
    return (pred == y).float().mean().item()


def ensemble_metrics(member_logits: Sequence[Tensor], y: Tensor, n_bins: int = 15) -> dict[str, float]:
    """Metrics of the members and of the two ensembles built from them.

    * boosted: predicts with the **sum of member logits** (softmax of the sum for NLL/ECE);
    * deep: the **mean of member softmaxes** (the deep-ensemble baseline);
    * ``member_acc_{t}``: each member alone; ``disagreement``: mean over member pairs of the
      fraction of objects on which their predictions differ (0 for one member).

    Args:
        member_logits: ``T`` tensors ``[N, K]``.
        y: ``[N]`` labels.
    """
    if not member_logits:
        raise ValueError("ensemble_metrics needs at least one member")
    k = member_logits[0].shape[1]
    stacked = torch.stack([m.double() for m in member_logits])  # [T, N, K]
    boosted = stacked.sum(0)
    deep_p = stacked.softmax(-1).mean(0)
    preds = stacked.argmax(-1)  # [T, N]
    t = preds.shape[0]
    pairs = [(a, b) for a in range(t) for b in range(a + 1, t)]
    out = {
        "boosted_acc": _accuracy(boosted.argmax(-1), y),
        "boosted_nll": F.cross_entropy(boosted, y).item(),
        "boosted_ece": multiclass_calibration_error(boosted.softmax(-1).float(), y, k, n_bins=n_bins).item(),
        "deep_acc": _accuracy(deep_p.argmax(-1), y),
        "deep_nll": F.nll_loss(deep_p.clamp_min(1e-300).log(), y).item(),
        "deep_ece": multiclass_calibration_error(deep_p.float(), y, k, n_bins=n_bins).item(),
        "disagreement": (sum((preds[a] != preds[b]).float().mean().item() for a, b in pairs) / len(pairs)
                         if pairs else 0.0),
    }
    for i in range(t):
        out[f"member_acc_{i}"] = _accuracy(preds[i], y)
    return out
