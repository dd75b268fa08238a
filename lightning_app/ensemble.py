"""The metrics of boosted and deep ensembles, from member logits (``callbacks.collect_logits``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import multiclass_calibration_error


def _accuracy(pred: Tensor, y: Tensor) -> float:
    return (pred == y).float().mean().item()


def brier_score(probs: Tensor, y: Tensor) -> float:
    r"""Multi-class Brier score :math:`\frac1N\sum_i\sum_k (p_{ik} - [y_i = k])^2`.

    Args:
        probs: ``[N, K]`` predicted probabilities.
        y: ``[N]`` labels.

    Example:
        >>> brier_score(torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([0, 1]))
        0.25
    """
    onehot = F.one_hot(y, probs.shape[1]).to(probs.dtype)
    return (probs - onehot).pow(2).sum(1).mean().item()


def _scores(prefix: str, probs: Tensor, log_probs: Tensor, y: Tensor, k: int, n_bins: int) -> dict[str, float]:
    return {
        f"{prefix}_acc": _accuracy(probs.argmax(-1), y),
        f"{prefix}_nll": F.nll_loss(log_probs, y).item(),
        f"{prefix}_ece": multiclass_calibration_error(probs.float(), y, k, n_bins=n_bins).item(),
        f"{prefix}_brier": brier_score(probs, y),
    }


def ensemble_metrics(member_logits: Sequence[Tensor], y: Tensor, n_bins: int = 15) -> dict[str, float]:
    """Metrics of the members and of the two ensembles built from them.

    * ``boosted_*``: predicts with the **sum of member logits** (softmax of the sum for NLL/ECE/Brier);
    * ``deep_*``: the **mean of member softmaxes** (the deep-ensemble baseline);
    * ``member_{acc,nll,ece,brier}_{t}``: member ``t`` alone, ``t = 1..T``;
    * ``disagreement``: mean over member pairs of the fraction of objects on which their
      predictions differ (0 for one member).

    Each of ``acc`` (accuracy), ``nll`` (mean negative log-likelihood), ``ece`` (expected
    calibration error over ``n_bins`` equal-width confidence bins) and ``brier``
    (:func:`brier_score`). Computed in float64.

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
        **_scores("boosted", boosted.softmax(-1), boosted.log_softmax(-1), y, k, n_bins),
        **_scores("deep", deep_p, deep_p.clamp_min(1e-300).log(), y, k, n_bins),
        "disagreement": (sum((preds[a] != preds[b]).float().mean().item() for a, b in pairs) / len(pairs)
                         if pairs else 0.0),
    }
    # The boosted NLL as before: cross-entropy of the summed logits (bit-identical to earlier runs).
    out["boosted_nll"] = F.cross_entropy(boosted, y).item()
    out["boosted_acc"] = _accuracy(boosted.argmax(-1), y)
    for i in range(t):
        member = _scores("member", stacked[i].softmax(-1), stacked[i].log_softmax(-1), y, k, n_bins)
        out.update({f"{key}_{i + 1}": value for key, value in member.items()})
    return out
