"""Gap rules: from the cumulative margins ``M`` after round ``t`` to the next member's gaps.

The seed algorithm writes ``g_i ← 2·Σ_j m_j − m_i``. Read literally, the sum over all objects makes
the gap grow with the size of the data set, so the default rule uses the **mean** over objects:
``g = 2·mean(M) − M`` (see docs/design.md). Every rule may clip its output to ``[g_min, g_max]``: a gap
larger than the network can reach leaves 100% training accuracy out of reach.
"""

from __future__ import annotations

import torch
from torch import Tensor

from marginboost.errors import ConfigError, check_number


class GapRule:
    """Base class. Subclasses implement :meth:`compute`; ``__call__`` validates and clips.

    Args:
        g_min: lower clip of the gaps (``None``: no lower clip).
        g_max: upper clip of the gaps (``None``: no upper clip).

    Attributes:
        needs_margins: whether :meth:`compute` reads ``M``. A rule that does not (``NoGapRule``)
            spares the orchestrator the margin pass over the training set each round, unless
            ``boosting.training_margins`` asks for it.
    """

    needs_margins = True

    def __init__(self, g_min: float | None = None, g_max: float | None = None) -> None:
        if g_min is not None:
            g_min = check_number("boosting.gap_rule.g_min", g_min)
        if g_max is not None:
            g_max = check_number("boosting.gap_rule.g_max", g_max)
        if g_min is not None and g_max is not None and g_min > g_max:
            raise ConfigError("boosting.gap_rule.g_min", g_min, f"a number <= g_max={g_max}")
        self.g_min, self.g_max = g_min, g_max

    def compute(self, cumulative_margins: Tensor, rounds_done: int) -> Tensor:
        """Gaps ``[N]`` from ``M [N]`` after ``rounds_done >= 1`` completed rounds."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute(M, t)")

    def __call__(self, cumulative_margins: Tensor, rounds_done: int) -> Tensor:
        if rounds_done < 1:
            raise ValueError(f"rounds_done must be >= 1, got {rounds_done}")
        gaps = self.compute(cumulative_margins, rounds_done)
        if self.g_min is not None or self.g_max is not None:
            gaps = gaps.clamp(self.g_min, self.g_max)
        return gaps

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class MeanGapRule(GapRule):
    """The default seed rule ``g_i = 2·mean_j(M_j) − M_i``."""

    def compute(self, cumulative_margins: Tensor, rounds_done: int) -> Tensor:
        return 2.0 * cumulative_margins.mean() - cumulative_margins


class ClippedGapRule(MeanGapRule):
    """The seed rule clipped to ``[g_min, g_max]`` (both required; defaults ``[0, 5]``)."""

    def __init__(self, g_min: float = 0.0, g_max: float = 5.0) -> None:
        super().__init__(g_min, g_max)


class NormalizedGapRule(GapRule):
    """The seed rule on the average margin per round: ``g_i = (2·mean_j(M_j) − M_i) / t``."""

    def compute(self, cumulative_margins: Tensor, rounds_done: int) -> Tensor:
        return (2.0 * cumulative_margins.mean() - cumulative_margins) / rounds_done


class TargetGapRule(GapRule):
    """A target margin ``τ``: ``g_i = max(0, τ − M_i / t)`` — push objects below ``τ`` on average.

    Args:
        tau: the target average margin.
    """

    def __init__(self, tau: float = 1.0, g_min: float | None = None, g_max: float | None = None) -> None:
        super().__init__(g_min, g_max)
        self.tau = check_number("boosting.gap_rule.tau", tau)

    def compute(self, cumulative_margins: Tensor, rounds_done: int) -> Tensor:
        return torch.clamp(self.tau - cumulative_margins / rounds_done, min=0.0)


class NoGapRule(GapRule):
    """``g = 0``: independent members, the deep-ensemble baseline (``deep_ensemble.yaml``)."""

    needs_margins = False

    def compute(self, cumulative_margins: Tensor, rounds_done: int) -> Tensor:
        return torch.zeros_like(cumulative_margins)
