"""The discounted cross-entropy, per-sample margins, and the named training criteria.

All work on raw logits of shape ``[N, K]`` and integer targets of shape ``[N]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginboost.errors import ConfigError, check_choice

_REDUCTIONS = ("mean", "sum", "none")


def _check_logits_target(logits: Tensor, target: Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape [N, K], got {tuple(logits.shape)}")
    if target.shape != logits.shape[:1]:
        raise ValueError(
            f"target must have shape [N]={logits.shape[0]}, got {tuple(target.shape)}"
        )


def discounted_cross_entropy(
    logits: Tensor, target: Tensor, gap: float | Tensor = 0.0, reduction: str = "mean"
) -> Tensor:
    r"""Cross-entropy with a per-object gap subtracted from the true-class logit.

    .. math::
        \ell_i = -\log \frac{e^{f_{y_i} - g_i}}{e^{f_{y_i} - g_i} + \sum_{j \ne y_i} e^{f_j}}
               = \mathrm{CE}(f - g_i \cdot \mathrm{onehot}(y_i),\, y_i)

    Args:
        logits: ``[N, K]`` raw scores.
        target: ``[N]`` class indices.
        gap: a float (same gap for all objects) or a ``[N]`` tensor of per-object gaps.
            ``gap=0`` returns exactly ``F.cross_entropy(logits, target)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0]]); y = torch.tensor([0])
        >>> float(discounted_cross_entropy(logits, y, gap=2.0))  # the two logits now tie
        0.6931471824645996
    """
    check_choice("reduction", reduction, _REDUCTIONS)
    _check_logits_target(logits, target)
    if not torch.is_tensor(gap):
        if gap == 0:
            return F.cross_entropy(logits, target, reduction=reduction)
        gap = torch.full(target.shape, float(gap), device=logits.device)
    if gap.shape != target.shape:
        raise ValueError(f"gap must be a float or have shape [N]={tuple(target.shape)}, got {tuple(gap.shape)}")
    # scatter_add touches only the true-class entry, so the other logits stay bit-identical.
    shifted = logits.scatter_add(1, target[:, None], -gap.to(logits.dtype)[:, None])
    return F.cross_entropy(shifted, target, reduction=reduction)


class DiscountedCrossEntropy(nn.Module):
    """Module form of :func:`discounted_cross_entropy` for scripts that use loss modules.

    Example:
        >>> loss = DiscountedCrossEntropy()
        >>> float(loss(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), gap=2.0))
        0.6931471824645996
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_choice("reduction", reduction, _REDUCTIONS)

    def forward(self, logits: Tensor, target: Tensor, gap: float | Tensor = 0.0) -> Tensor:
        return discounted_cross_entropy(logits, target, gap, self.reduction)


def margins(logits: Tensor, target: Tensor) -> Tensor:
    r"""Per-sample margins :math:`m_i = f_{y_i} - \max_{j \ne y_i} f_j`, in float32 or wider.

    Args:
        logits: ``[N, K]`` raw scores, ``K >= 2``.
        target: ``[N]`` class indices.

    Returns:
        ``[N]`` margins; positive where the object is classified correctly.

    Example:
        >>> margins(torch.tensor([[3.0, 1.0, 2.5]]), torch.tensor([0]))
        tensor([0.5000])
    """
    _check_logits_target(logits, target)
    if logits.shape[1] < 2:
        raise ValueError("margins need at least 2 classes")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    true = logits.gather(1, target[:, None]).squeeze(1)
    others = logits.scatter(1, target[:, None], float("-inf")).amax(dim=1)
    return true - others


# -- criteria by name: what the measurements differentiate ----------------------------------

Criterion = Callable[[Tensor, Mapping[str, Tensor]], Tensor]


def discounted_ce_criterion(logits: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    """The training criterion of ``MarginClassifier``: discounted CE with the batch's gaps."""
    return discounted_cross_entropy(logits, batch["y"], batch.get("gap", 0.0))


def ce_criterion(logits: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    """Plain cross-entropy (gaps ignored)."""
    return F.cross_entropy(logits, batch["y"])


CRITERIA: dict[str, Criterion] = {"discounted_ce": discounted_ce_criterion, "ce": ce_criterion}


def resolve_criterion(criterion: str | Criterion | None, field: str = "criterion") -> tuple[Criterion, str]:
    """``(loss_fn, name)`` from a name in :data:`CRITERIA`, a callable ``(logits, batch) -> loss``
    or ``None`` (the discounted CE).

    >>> resolve_criterion("ce")[1]
    'ce'
    """
    if criterion is None:
        return discounted_ce_criterion, "discounted_ce"
    if isinstance(criterion, str):
        if criterion not in CRITERIA:
            raise ConfigError(field, criterion, f"{', '.join(map(repr, sorted(CRITERIA)))} or a callable "
                              "(logits, batch) -> scalar loss")
        return CRITERIA[criterion], criterion
    if not callable(criterion):
        raise ConfigError(field, type(criterion).__name__, f"a name in {sorted(CRITERIA)} or a callable",
                          describe=True)
    return criterion, getattr(criterion, "__qualname__", type(criterion).__name__)
