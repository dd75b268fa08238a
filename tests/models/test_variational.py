"""Variational weights: the KL against the closed form and a Monte-Carlo estimate, sampling, λ → 0."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from marginboost.errors import ConfigError
from models import (
    HyperNetClassifier,
    VariationalModel,
    VariationalNet,
    gaussian_kl,
    negative_evidence,
)


def _posterior(n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, generator=g, dtype=torch.float64)
    log_var = torch.randn(n, generator=g, dtype=torch.float64) - 1.0
    return mean, log_var


def test_kl_matches_torch_distributions_closed_form():
    mean, log_var = _posterior()
    for prior_mean, prior_var in ((0.0, 0.1), (0.3, 2.0)):
        q = torch.distributions.Normal(mean, (0.5 * log_var).exp())
        p = torch.distributions.Normal(torch.full_like(mean, prior_mean), torch.full_like(mean, prior_var ** 0.5))
        expected = torch.distributions.kl_divergence(q, p).sum()
        assert torch.allclose(gaussian_kl(mean, log_var, prior_mean, prior_var), expected, rtol=1e-12)


def test_kl_matches_a_monte_carlo_estimate():
    mean, log_var = _posterior(n=5)
    prior_mean, prior_var = 0.2, 0.1
    g = torch.Generator().manual_seed(0)
    n = 400_000
    w = mean + (0.5 * log_var).exp() * torch.randn(n, 5, generator=g, dtype=torch.float64)
    log_q = -0.5 * ((w - mean) ** 2 / log_var.exp() + log_var + math.log(2 * math.pi))
    log_p = -0.5 * ((w - prior_mean) ** 2 / prior_var + math.log(prior_var) + math.log(2 * math.pi))
    terms = (log_q - log_p).sum(1)
    estimate, stderr = terms.mean(), terms.std() / n ** 0.5
    kl = gaussian_kl(mean, log_var, prior_mean, prior_var)
    assert abs(float(kl - estimate)) < 4 * float(stderr), (float(kl), float(estimate), float(stderr))
    assert float(stderr) < 0.02 * float(kl)  # the check is tight enough to catch a wrong formula


def test_network_kl_is_the_sum_over_every_weight():
    model = VariationalModel(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), 0.1, 0.5, -3.0)
    mean, log_var = model.variational_parameters()
    expected = sum(gaussian_kl(mean[n], log_var[n], 0.1, 0.5) for n in mean)
    assert len(mean) == 4 and torch.allclose(model.kl(), expected)
    assert model.target.num_weights == 4 * 3 + 3 + 3 * 2 + 2


def test_eval_uses_the_mean_and_training_samples_by_reparameterisation():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    reference = copy.deepcopy(net)
    model = VariationalModel(net, init_log_var=-2.0)
    x = torch.randn(6, 5)
    assert torch.equal(model.eval()(x), reference(x))  # the mean is the network's initialisation
    model.train()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    sampled = model(x, generator=g1)
    # By hand: w = m + exp(log σ² / 2)·ε with the same ε stream.
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(math.exp(-1.0) * torch.randn(p.shape, generator=g2))
    assert torch.allclose(sampled, reference(x), atol=1e-6)
    assert not torch.allclose(sampled, model.eval()(x))
    # Gradients reach both the means and the log-variances.
    model.train()(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_networks_with_buffers_are_refused():
    with pytest.raises(ConfigError, match="model.backbone: .*running_mean.*allowed: a network without buffers"):
        VariationalNet(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    with pytest.raises(ConfigError, match="model.prior_var: 0.0; allowed"):
        VariationalNet(nn.Linear(3, 3), prior_var=0.0)


def test_objective_reduces_to_the_expected_nll_as_lambda_goes_to_zero():
    model = HyperNetClassifier(num_classes=3, input_shape=(4,), backbone_kwargs={"width": 8, "depth": 1},
                               mode="direct", lam=0.0, data_size=50, init_log_var=-1.0)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))

    def expected_nll(seed):
        mean, log_var = model.variational_parameters()
        logits = model.target(x, mean, log_var, sample=True, generator=torch.Generator().manual_seed(seed))
        return F.cross_entropy(logits, y)

    kl = model.kl().detach()
    assert kl > 1.0  # the KL term is not negligible by itself
    for lam in (0.0, 1e-9):
        loss, nll, _, _ = model.objective(x, y, lam, generator=torch.Generator().manual_seed(7))
        assert torch.allclose(loss, expected_nll(7), rtol=0, atol=1e-6 * (1 + lam * float(kl)))
        assert torch.equal(nll, expected_nll(7))
    loss, nll, kl_term, _ = model.objective(x, y, 2.0, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(loss, nll + 2.0 * kl_term / 50)
    assert torch.allclose(loss, negative_evidence(model.target(
        x, *model.variational_parameters(), sample=True, generator=torch.Generator().manual_seed(7)), y, kl, 2.0, 50))
