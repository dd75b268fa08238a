"""Ensemble metrics by hand."""
import pytest
import torch
import torch.nn.functional as F

from lightning_app import (
    ensemble_metrics,
)


def test_ensemble_metrics_by_hand():
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 3.0], [3.0, 0.0]])
    y = torch.tensor([0, 1, 1])
    m = ensemble_metrics([a, b], y, n_bins=10)
    # boosted: sum [[2,1],[0,4],[4,0]] -> preds 0,1,0 -> 2/3 correct
    assert m["boosted_acc"] == pytest.approx(2 / 3)
    assert m["boosted_nll"] == pytest.approx(F.cross_entropy(a + b, y).item())
    p = (a.double().softmax(1) + b.double().softmax(1)) / 2
    assert m["deep_nll"] == pytest.approx(-p[torch.arange(3), y].log().mean().item())
    assert m["deep_acc"] == pytest.approx(2 / 3)
    assert m["member_acc_1"] == pytest.approx(2 / 3) and m["member_acc_2"] == pytest.approx(1 / 3)
    assert m["disagreement"] == pytest.approx(1 / 3)  # members differ on object 0 only
    conf, pred = p.max(1)  # ECE = Σ_b |B|/N·|acc_b − conf_b| over 10 equal-width bins
    bins = (conf * 10).ceil().long()
    ece = 0.0
    for b_ in bins.unique():
        sel = bins == b_
        ece += sel.sum().item() / 3 * abs((pred[sel] == y[sel]).double().mean().item() - conf[sel].mean().item())
    assert bins[1] == bins[2]  # objects 1 and 2 share a bin (same confidence)
    assert m["deep_ece"] == pytest.approx(ece, abs=1e-6)
