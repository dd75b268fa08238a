import math

import pytest
import torch

from models import head_weight, max_bn_mean_margin, seed_mean_margin_value
from models.margin_bounds import class_mean_margins, project_bn_feasible


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: a second thread only adds synchronisation (15x slower on a loaded 2-core box)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("k", [3, 10])
def test_identity_head_maximum_is_k_over_sqrt_k_minus_1(k):
    # By hand: m_c <= μ_cc − mean_{j≠c} μ_cj sums to K/(K−1)·Σ_c μ_cc / K, and a zero-mean,
    # unit-variance column has μ_cc <= √(K−1); the counterexample attains it.
    value, means = max_bn_mean_margin(torch.eye(k), steps=50)
    assert value == pytest.approx(k / math.sqrt(k - 1), abs=1e-9)
    assert value >= 10 / 3 - 1e-9 if k == 10 else True
    counterexample = torch.full((k, k), -1 / math.sqrt(k - 1), dtype=torch.float64)
    counterexample.fill_diagonal_(math.sqrt(k - 1))
    torch.testing.assert_close(means, counterexample)
    assert float(seed_mean_margin_value(torch.eye(k))) == pytest.approx(2.0)  # the seed's "bound" is below


@pytest.mark.parametrize("init", ["orthogonal", "kaiming", "simplex_etf"])
def test_returned_class_means_are_feasible_and_give_the_value(init):
    w = head_weight(5, 12, init, generator=torch.Generator().manual_seed(1)).double()
    freq = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2], dtype=torch.float64)
    value, means = max_bn_mean_margin(w, freq * 7, steps=200)  # frequencies are normalised
    assert torch.allclose(freq @ means, torch.zeros(12, dtype=torch.float64), atol=1e-10)
    assert ((freq[:, None] * means.pow(2)).sum(0) <= 1 + 1e-10).all()
    assert value == pytest.approx(float(freq @ class_mean_margins(means, w)), abs=1e-12)


def test_no_bn_normalised_features_exceed_it_and_ascent_on_samples_gets_close():
    # Ground truth another way: maximise the mean margin of N samples whose features are
    # normalised as BN does in train mode (batch mean 0, biased variance 1) — the constraint set.
    torch.manual_seed(0)
    k, d, per_class = 4, 6, 15
    w = head_weight(k, d, "orthogonal", generator=torch.Generator().manual_seed(3)).double()
    y = torch.arange(k).repeat_interleave(per_class)
    bound, _ = max_bn_mean_margin(w)
    z = torch.randn(len(y), d, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.1)
    reached = []
    for _ in range(300):
        centred = z - z.mean(0)
        logits = (centred / centred.pow(2).mean(0).sqrt()) @ w.T
        own = logits.gather(1, y[:, None])[:, 0]
        rival = logits.masked_fill(torch.nn.functional.one_hot(y, k).bool(), -math.inf).amax(1)
        mean_margin = (own - rival).mean()
        reached.append(mean_margin.item())
        opt.zero_grad()
        (-mean_margin).backward()
        opt.step()
    # every step's features are feasible, so the bound applies to all of them
    assert max(reached) <= bound + 1e-9
    assert max(reached) >= 0.97 * bound  # and it is nearly reached: not a loose number


def test_bad_class_frequencies():
    with pytest.raises(ValueError, match="class_freq"):
        max_bn_mean_margin(torch.eye(3), torch.tensor([1.0, -1.0, 1.0]))


def test_projection_is_idempotent_and_shrinks_only_long_columns():
    freq = torch.full((3,), 1 / 3, dtype=torch.float64)
    means = torch.tensor([[2.0, 0.1], [-1.0, 0.0], [-1.0, -0.1]], dtype=torch.float64)
    p = project_bn_feasible(means, freq)
    torch.testing.assert_close(project_bn_feasible(p, freq), p)
    torch.testing.assert_close(p[:, 1], means[:, 1])  # second moment 0.0067 < 1: unchanged
    assert (freq * p[:, 0] ** 2).sum().item() == pytest.approx(1.0)
