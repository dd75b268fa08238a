"""Pruning variational weights by relative density, the accuracy-vs-pruning sweep, stability.

The relative density of weight ``i`` at zero, ``ρ_i = q_i(0)/q_i(m_i) = exp(−m_i²/(2σ_i²))``,
says how compatible its posterior is with the weight being zero. Weights with the highest ``ρ``
(equivalently the lowest signal-to-noise ratio ``|m|/σ``) are removed first: their mean is set to
zero. The ranking is global over all tensors of the network.

Stability ``S = acc(0% removed) / acc(90% removed)``: 1 means pruning 90% costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from marginboost.errors import check_number

__all__ = [
    "count_parameter_updates",
    "plot_pruning_curves",
    "prune_by_relative_density",
    "pruned_mean",
    "pruning_curve",
    "pruning_masks",
    "relative_density",
    "stability",
]

Weights = dict[str, Tensor]


def relative_density(mean: Tensor, log_var: Tensor) -> Tensor:
    """``ρ = exp(−m²/(2σ²))`` elementwise (1 for a weight whose posterior is centred at zero)."""
    return torch.exp(-mean.pow(2) / (2.0 * log_var.exp()))


def _signal_to_noise(mean: Tensor, log_var: Tensor) -> Tensor:
    # |m|/σ ranks exactly like −ρ but does not underflow to ρ = 0 for confident weights.
    return mean.abs() * torch.exp(-0.5 * log_var)


def pruning_masks(mean: Mapping[str, Tensor], log_var: Mapping[str, Tensor], fraction: float) -> Weights:
    """Boolean keep-masks removing exactly ``round(fraction·P)`` weights of lowest ``|m|/σ``.

    Ties are broken by position (a stable sort), so the count is exact for any input.

    Args:
        mean, log_var: ``(m, log σ²)`` by parameter name.
        fraction: share of all ``P`` weights to remove, in ``[0, 1]``.

    Returns:
        ``{name: mask}``, ``True`` where the weight is kept.
    """
    fraction = check_number("pruning.fraction", fraction, 0.0, 1.0)
    names = list(mean)
    scores = torch.cat([_signal_to_noise(mean[n].detach(), log_var[n].detach()).flatten() for n in names])
    remove = int(round(fraction * scores.numel()))
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[torch.sort(scores, stable=True).indices[:remove]] = False
    masks, start = {}, 0
    for n in names:
        size = mean[n].numel()
        masks[n] = keep[start:start + size].view(mean[n].shape)
        start += size
    return masks


def pruned_mean(mean: Mapping[str, Tensor], log_var: Mapping[str, Tensor], fraction: float) -> Weights:
    """A copy of ``mean`` with the ``fraction`` of weights of highest relative density set to 0."""
    masks = pruning_masks(mean, log_var, fraction)
    return {n: torch.where(masks[n], mean[n].detach(), torch.zeros((), dtype=mean[n].dtype,
                                                                     device=mean[n].device))
            for n in mean}


@torch.no_grad()
def prune_by_relative_density(model: nn.Module, fraction: float) -> Weights:
    """Prune ``model`` in place: zero the means of the ``fraction`` of weights most compatible with 0.

    ``model`` is anything with ``variational_parameters()`` returning its live ``(mean, log_var)``
    Parameters (``models.VariationalModel``, a direct-mode ``models.HyperNetClassifier``). The
    variances are left as they are; evaluation uses the means, so a pruned weight contributes 0.

    Returns:
        The keep-masks (``True`` = kept).

    Example:
        >>> from models import VariationalModel
        >>> model = VariationalModel(nn.Linear(10, 10))
        >>> masks = prune_by_relative_density(model, 0.3)
        >>> sum(int((~m).sum()) for m in masks.values())  # 30% of 110 weights
        33
    """
    mean, log_var = model.variational_parameters()
    masks = pruning_masks(mean, log_var, fraction)
    for n, m in mean.items():
        m.mul_(masks[n])
    return masks


def pruning_curve(evaluate: Callable[[Weights], float], mean: Mapping[str, Tensor],
                  log_var: Mapping[str, Tensor], fractions: Sequence[float]) -> list[float]:
    """``[evaluate(pruned_mean(mean, log_var, f)) for f in fractions]``.

    ``evaluate`` maps a set of mean weights to a score (accuracy); the inputs are not modified.
    """
    return [float(evaluate(pruned_mean(mean, log_var, f))) for f in fractions]


def stability(acc_unpruned: float, acc_pruned: float) -> float:
    """``S = acc(unpruned) / acc(pruned)`` (the study prunes 90%); ``inf`` if the pruned acc is 0."""
    return math.inf if acc_pruned == 0 else acc_unpruned / acc_pruned


def count_parameter_updates(module: nn.Module, steps: int) -> int:
    """The study's cost measure: trainable parameters × optimizer steps."""
    return steps * sum(p.numel() for p in module.parameters() if p.requires_grad)


def plot_pruning_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                        title: str = ""):
    """Accuracy vs removed fraction, one line per label (e.g. ``"λ=1"``); object-oriented API.

    ``curves`` maps a label to ``(fractions, accuracies)``; the x axis is in percent.
    """
    from matplotlib.figure import Figure  # imported here: plotting is optional at import time

    fig = Figure(figsize=(5.0, 3.6), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    for label, (fractions, accs) in curves.items():
        ax.plot([100.0 * f for f in fractions], list(accs), marker="o", markersize=2.5, label=label)
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
