"""Pruning by relative density: exact count, exactly the lowest |μ|/σ, sweep, stability, figure."""

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from marginboost.errors import ConfigError
from models import (
    VariationalModel,
    plot_pruning_curves,
    prune_by_relative_density,
    pruned_mean,
    pruning_curve,
    pruning_masks,
    relative_density,
    stability,
)


def _posterior(seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = {"a": torch.randn(4, 5, generator=g), "b": torch.randn(7, generator=g)}
    log_var = {n: 2.0 * torch.randn(m.shape, generator=g) for n, m in mean.items()}
    return mean, log_var


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_pruning_removes_exactly_the_fraction_with_lowest_signal_to_noise(fraction):
    mean, log_var = _posterior()
    masks = pruning_masks(mean, log_var, fraction)
    flat_mean = np.concatenate([mean[n].numpy().ravel() for n in ("a", "b")])
    flat_sigma = np.exp(0.5 * np.concatenate([log_var[n].numpy().ravel() for n in ("a", "b")]))
    removed = np.flatnonzero(~np.concatenate([masks[n].numpy().ravel() for n in ("a", "b")]))
    k = int(round(fraction * flat_mean.size))
    assert removed.size == k
    # By hand, in float64: the k weights of lowest |μ|/σ (highest relative density).
    expected = np.argsort(np.abs(flat_mean.astype(np.float64)) / flat_sigma, kind="stable")[:k]
    assert set(removed.tolist()) == set(expected.tolist())
    rho = np.exp(-flat_mean.astype(np.float64) ** 2 / (2 * flat_sigma ** 2))
    if 0 < k < flat_mean.size:
        assert rho[removed].min() >= np.delete(rho, removed).max()


def test_the_ranking_is_not_by_the_mean_alone():
    # Large mean but huge variance goes first; small mean with a tiny variance stays.
    mean = {"w": torch.tensor([3.0, 0.1, 1.0])}
    log_var = {"w": torch.log(torch.tensor([100.0, 1e-4, 1.0]))}
    assert pruning_masks(mean, log_var, 1 / 3)["w"].tolist() == [False, True, True]
    assert torch.allclose(relative_density(mean["w"], log_var["w"]),
                          torch.exp(-mean["w"] ** 2 / (2 * log_var["w"].exp())))


def test_ties_still_remove_the_exact_count():
    mean = {"w": torch.zeros(10)}
    log_var = {"w": torch.zeros(10)}
    assert int((~pruning_masks(mean, log_var, 0.3)["w"]).sum()) == 3


def test_prune_by_relative_density_zeroes_the_model_in_place():
    torch.manual_seed(0)
    model = VariationalModel(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), init_log_var=-1.0)
    with torch.no_grad():
        for p in model.log_var.values():
            p.normal_(-1.0, 1.0)
    mean, log_var = model.variational_parameters()
    expected = pruned_mean(mean, log_var, 0.6)
    log_var_before = {n: v.detach().clone() for n, v in log_var.items()}
    masks = prune_by_relative_density(model, 0.6)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.6 * total)
    for n, m in model.variational_parameters()[0].items():
        assert torch.equal(m.detach(), expected[n])
        assert torch.all(m.detach()[~masks[n]] == 0)
        assert torch.equal(log_var[n].detach(), log_var_before[n])  # variances untouched


def test_pruning_curve_and_stability():
    mean, log_var = _posterior()
    zeros = pruning_curve(lambda w: sum(int((t == 0).sum()) for t in w.values()), mean, log_var,
                          [0.0, 0.5, 1.0])
    assert zeros == [0.0, 14.0, 27.0]
    assert all(torch.count_nonzero(m) == m.numel() for m in mean.values())  # inputs unchanged
    assert stability(0.9, 0.6) == pytest.approx(1.5) and stability(0.9, 0.0) == float("inf")
    with pytest.raises(ConfigError, match="pruning.fraction: 1.5; allowed: a finite number in"):
        pruning_masks(mean, log_var, 1.5)


def test_plot_pruning_curves_draws_one_line_per_lambda():
    fig = plot_pruning_curves({"λ=1": ([0.0, 0.5], [0.9, 0.8]), "λ=10": ([0.0, 0.5], [0.8, 0.8])}, "t")
    assert isinstance(fig, Figure)
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["λ=1", "λ=10"]
    assert list(lines[0].get_xdata()) == [0.0, 50.0]
