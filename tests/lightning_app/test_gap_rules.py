"""Gap rules by hand."""
import pytest
import torch

from lightning_app import (
    ClippedGapRule,
    GapRule,
    MeanGapRule,
    NoGapRule,
    NormalizedGapRule,
    TargetGapRule,
)
from marginboost.errors import ConfigError


def test_gap_rules_by_hand():
    M = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mean 3
    assert torch.equal(MeanGapRule()(M, 1), torch.tensor([5.0, 4.0, 3.0, 0.0]))
    assert torch.equal(MeanGapRule(g_min=1.0, g_max=4.5)(M, 1), torch.tensor([4.5, 4.0, 3.0, 1.0]))
    assert torch.equal(ClippedGapRule(0.5, 3.5)(M, 1), torch.tensor([3.5, 3.5, 3.0, 0.5]))
    assert torch.equal(NormalizedGapRule()(M, 2), torch.tensor([2.5, 2.0, 1.5, 0.0]))
    assert torch.equal(TargetGapRule(tau=2.0)(M, 2), torch.tensor([1.5, 1.0, 0.5, 0.0]))
    assert torch.equal(NoGapRule()(M, 3), torch.zeros(4))
    with pytest.raises(ConfigError, match="boosting.gap_rule.g_min: 2.0; allowed"):
        MeanGapRule(g_min=2.0, g_max=1.0)
    with pytest.raises(ConfigError, match="boosting.gap_rule.g_max: nan"):
        MeanGapRule(g_max=float("nan"))
    with pytest.raises(ConfigError, match="boosting.gap_rule.tau: inf"):
        TargetGapRule(tau=float("inf"))
    with pytest.raises(NotImplementedError):
        GapRule()(M, 1)
    with pytest.raises(ValueError, match="rounds_done"):
        MeanGapRule()(M, 0)
