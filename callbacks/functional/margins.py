"""Margins of every training object, and the summary statistics of a margin distribution."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from marginboost.per_sample import per_sample_outputs
from models.losses import margins as margins_from_logits


def collect_margins(model: nn.Module, loader: Iterable[Mapping[str, Tensor]], num_total: int,
                    device: torch.device | str | None = None) -> Tensor:
    r"""Margins :math:`f_y - \max_{j\ne y} f_j` ``[num_total]`` of every object, by the batches' ``idx``.

    Raw logits, eval mode, fp32 (autocast off); the model's mode is restored. Under DDP each rank
    passes its shard and every rank receives the same full tensor.
    """
    return per_sample_outputs(model, loader, num_total,
                              lambda logits, b: (margins_from_logits(logits, b["y"]),), device)[0]


def margin_summary(m: Tensor) -> dict[str, float]:
    r"""Quartiles and Tukey fences of a margin vector ``m [N]``.

    ``q1, median, q3`` (linear interpolation), ``iqr = q3 - q1``, ``lower_fence = q1 - 1.5 iqr``,
    ``upper_fence = q3 + 1.5 iqr``, ``min``, ``max``, ``mean``, ``std``, ``frac_negative``
    (share with :math:`m_i < 0`) and ``frac_below_fence`` (share below the lower fence).

    Example:
        >>> margin_summary(torch.tensor([-1.0, 0.0, 1.0, 2.0, 3.0]))["median"]
        1.0
    """
    if m.ndim != 1 or m.numel() == 0:
        raise ValueError(f"margin_summary: needs a non-empty 1-D tensor, got shape {tuple(m.shape)}")
    m = m.detach().double()
    q1, med, q3 = torch.quantile(m, torch.tensor([0.25, 0.5, 0.75], dtype=m.dtype, device=m.device)).tolist()
    iqr = q3 - q1
    lower = q1 - 1.5 * iqr
    return {"q1": q1, "median": med, "q3": q3, "iqr": iqr, "lower_fence": lower, "upper_fence": q3 + 1.5 * iqr,
            "min": m.min().item(), "max": m.max().item(), "mean": m.mean().item(),
            "std": m.std().item() if m.numel() > 1 else 0.0,
            "frac_negative": (m < 0).double().mean().item(), "frac_below_fence": (m < lower).double().mean().item()}
