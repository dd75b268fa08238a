"""The discounted cross-entropy and margins against the formulas by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from models import DiscountedCrossEntropy, discounted_cross_entropy, margins


def _by_hand(logits, target, gap):
    """-log(e^{f_y-g} / (e^{f_y-g} + Σ_{j≠y} e^{f_j})) in Python floats."""
    out = []
    for row, y, g in zip(logits.tolist(), target.tolist(), gap.tolist()):
        true = math.exp(row[y] - g)
        rest = sum(math.exp(v) for j, v in enumerate(row) if j != y)
        out.append(-math.log(true / (true + rest)))
    return torch.tensor(out, dtype=torch.float64)


def test_gap_zero_is_exactly_cross_entropy():
    logits, y = torch.randn(7, 5), torch.randint(0, 5, (7,))
    for reduction in ("mean", "sum", "none"):
        ref = F.cross_entropy(logits, y, reduction=reduction)
        assert torch.equal(discounted_cross_entropy(logits, y, 0.0, reduction), ref)
        assert torch.equal(discounted_cross_entropy(logits, y, torch.zeros(7), reduction), ref)


def test_matches_formula_by_hand():
    logits = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    gap = torch.tensor([0.0, 0.5, -1.0, 2.0, 3.5, 0.25], dtype=torch.float64)
    per = discounted_cross_entropy(logits, y, gap, reduction="none")
    torch.testing.assert_close(per, _by_hand(logits, y, gap), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(discounted_cross_entropy(logits, y, gap), per.mean())
    torch.testing.assert_close(discounted_cross_entropy(logits, y, gap, "sum"), per.sum())
    # a float gap is the same gap for every object
    torch.testing.assert_close(discounted_cross_entropy(logits, y, 0.7, "none"),
                               _by_hand(logits, y, torch.full((6,), 0.7, dtype=torch.float64)))
    assert torch.equal(DiscountedCrossEntropy("none")(logits, y, gap), per)


def test_gap_only_moves_the_true_logit():
    logits, y = torch.randn(3, 4), torch.tensor([1, 2, 3])
    gap = torch.tensor([1.0, 2.0, 3.0])
    shifted = logits.clone()
    shifted[torch.arange(3), y] -= gap
    assert torch.equal(discounted_cross_entropy(logits, y, gap, "none"), F.cross_entropy(shifted, y, reduction="none"))


def test_gradients_finite_for_extreme_logits():
    logits = (torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [0.0, 0.0, -1e4]])).requires_grad_()
    y = torch.tensor([1, 0, 2])
    loss = discounted_cross_entropy(logits, y, torch.tensor([5.0, -5.0, 1e3]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_bad_inputs():
    logits, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="reduction"):
        discounted_cross_entropy(logits, y, reduction="avg")
    with pytest.raises(ValueError, match="gap"):
        discounted_cross_entropy(logits, y, torch.zeros(3))
    with pytest.raises(ValueError, match="target"):
        discounted_cross_entropy(logits, y[:2])


def test_margins_by_hand():
    logits = torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, 4.0], [-1.0, -2.0, 5.0], [2.0, 7.0, 1.0]])
    y = torch.tensor([0, 1, 2, 0])
    # 3-2.5; 4-4 (tie with another class); 5-(-1); 2-7
    assert torch.equal(margins(logits, y), torch.tensor([0.5, 0.0, 6.0, -5.0]))


def test_margins_upcast_half_precision_and_reject_one_class():
    logits = torch.randn(5, 4).bfloat16()
    y = torch.randint(0, 4, (5,))
    assert margins(logits, y).dtype == torch.float32
    with pytest.raises(ValueError, match="2 classes"):
        margins(torch.randn(3, 1), torch.zeros(3, dtype=torch.long))
