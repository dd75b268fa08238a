"""The run's figures: fixed axes across rounds, reliability bins against torchmetrics' ECE, no pyplot."""

import math

import matplotlib
import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from lightning_app.ensemble import ensemble_metrics
from lightning_app.figures import (
    FigureLimits,
    RunFigureData,
    figure_to_array,
    nice_range,
    reliability_bins,
    round_figures,
)


def _record(t, acc=0.9, nll=0.3):
    return {"round": t, "boosted_acc": acc, "deep_acc": acc - 0.01, f"member_acc_{t}": acc - 0.02,
            "boosted_nll": nll, "deep_nll": nll + 0.05, f"member_nll_{t}": nll + 0.1}


def _data(rounds=3, n=200, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    val_y = torch.randint(0, k, (50,), generator=g)
    margins = {t: torch.randn(n, generator=g) * (0.5 + 0.3 * t) + 0.2 * t for t in range(1, rounds + 1)}
    gaps = {t: (2.0 * torch.rand(n, generator=g) * t) for t in range(1, rounds + 1)}
    history = [_record(t, acc=0.8 + 0.05 * t, nll=0.6 - 0.1 * t) for t in range(1, rounds + 1)]
    val_logits = [torch.randn(50, k, generator=g) * 3 for _ in range(rounds)]
    return RunFigureData(normalised_margins=margins, gaps=gaps, history=history, val_logits=val_logits,
                         val_y=val_y)


def test_nice_range_pads_and_rounds_outward():
    lo, hi = nice_range(-0.3, 1.7)  # span 2, padded by 0.5 each side -> [-0.8, 2.2], step 0.5
    assert (lo, hi) == (-1.0, 2.5)
    assert nice_range(0.0, 0.0)[0] < 0.0 < nice_range(0.0, 0.0)[1]  # a degenerate range still opens


def test_limits_come_from_round_one_and_the_rule_bounds():
    data = _data()
    limits = FigureLimits.from_round_one(data.normalised_margins[1], data.gaps[1], data.history[0], rounds=5,
                                         gap_bounds=(0.0, 4.0))
    m = data.normalised_margins[1]
    lo, hi = torch.quantile(m.double(), torch.tensor([0.001, 0.999], dtype=torch.float64)).tolist()
    span = hi - lo
    assert lo - 0.1 * span >= limits.margin[0] > lo - 0.1 * span - span and limits.margin[0] < 0
    assert hi + 0.1 * span <= limits.margin[1] < hi + 0.1 * span + span
    assert limits.gap == pytest.approx((-0.2, 4.2))  # the rule's bounds, 5% room each side
    worst_acc = min(0.85, 0.84, 0.83)
    assert limits.accuracy == (math.floor((1 - 3 * (1 - worst_acc)) * 20) / 20, 1.0) == (0.45, 1.0)
    assert limits.nll[0] == 0.0 and limits.nll[1] >= 3 * 0.6
    assert FigureLimits.from_json(limits.to_json()) == limits
    unbounded = FigureLimits.from_round_one(m, data.gaps[1], data.history[0], rounds=5)
    assert unbounded.gap[0] <= data.gaps[1].min().item() and unbounded.gap[1] >= data.gaps[1].max().item()


def _axes_limits(fig):
    return [(tuple(ax.get_xlim()), tuple(ax.get_ylim())) for ax in fig.axes]


def test_every_figure_keeps_its_axes_across_rounds():
    data = _data(rounds=3)
    limits = FigureLimits.from_round_one(data.normalised_margins[1], data.gaps[1], data.history[0], rounds=3)
    by_round = {t: round_figures(data, t, limits) for t in (1, 2, 3)}
    assert set(by_round[1]) == {"margin_cdf", "gap_cdf", "reliability", "accuracy_nll"}
    for name in by_round[1]:
        first = _axes_limits(by_round[1][name])
        assert all(_axes_limits(by_round[t][name]) == first for t in (2, 3)), name
    assert _axes_limits(by_round[3]["margin_cdf"]) == [(limits.margin, (0.0, 1.0))]
    assert _axes_limits(by_round[3]["gap_cdf"]) == [(limits.gap, (0.0, 1.0))]
    assert _axes_limits(by_round[1]["accuracy_nll"]) == [((0.5, 3.5), limits.accuracy), ((0.5, 3.5), limits.nll)]
    # one curve per round so far, and the share a later round puts outside the fixed axis is stated
    assert len(by_round[3]["margin_cdf"].axes[0].get_lines()) == 3 + 1  # + the zero line
    outside = ((data.gaps[3] < limits.gap[0]) | (data.gaps[3] > limits.gap[1])).double().mean().item()
    assert outside > 0 and f"{100 * outside:.1f}% of round 3" in by_round[3]["gap_cdf"].axes[0].get_title()


def test_reliability_bins_match_torchmetrics_ece_and_the_ensemble_metrics():
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(300, 5, generator=g) * 2 for _ in range(3)]
    y = torch.randint(0, 5, (300,), generator=g)
    probs = torch.stack(logits).double().softmax(-1).mean(0).float()  # the deep ensemble
    bins = reliability_bins(probs, y, n_bins=15)
    expected = multiclass_calibration_error(probs, y, 5, n_bins=15).item()
    assert bins["ece"].item() == pytest.approx(expected, abs=1e-6)
    assert bins["count"].sum().item() == 300
    metrics = ensemble_metrics(logits, y)
    assert bins["ece"].item() == pytest.approx(metrics["deep_ece"], abs=1e-6)
    # by hand: one bin of width 1/2 holding both objects (conf 0.9 right, conf 0.6 wrong)
    small = reliability_bins(torch.tensor([[0.9, 0.1], [0.6, 0.4]]), torch.tensor([0, 1]), n_bins=2)
    assert small["accuracy"][1].item() == 0.5 and small["confidence"][1].item() == pytest.approx(0.75)


def test_figures_render_without_touching_the_backend():
    backend = matplotlib.rcParams["backend"]
    data = _data(rounds=1)
    limits = FigureLimits.from_round_one(data.normalised_margins[1], data.gaps[1], data.history[0], rounds=1)
    image = figure_to_array(round_figures(data, 1, limits)["margin_cdf"])
    assert image.dtype.name == "uint8" and image.ndim == 3 and image.shape[2] == 3
    assert image.std() > 0  # something was drawn
    assert matplotlib.rcParams["backend"] == backend
