r"""How large can the mean training margin be with a frozen head ``W`` after a BatchNorm?

The classifier is ``f(x) = W · BN(φ(x))`` with ``BN`` without affine, so in train mode each feature
dimension of a batch has mean 0 and variance 1 (up to BN's ``eps``). Seed 004 claims
``mean_i m_i ≤ 2/K · ‖W‖₁`` (entrywise L1 norm) for balanced classes. That is not a valid bound
for ``K ≥ 3``: with ``W = I_K``, features ``√(K−1)`` on the true class and ``−1/√(K−1)`` elsewhere
have zero mean and unit variance in every dimension and margin ``K/√(K−1)`` on every object
(``10/3`` for ``K = 10``), against ``2/K·‖W‖₁ = 2``.

:func:`seed_mean_margin_value` is the seed's number, under that name. :func:`max_bn_mean_margin`
is the actual maximum for a given ``W``, computed numerically:

* The margin ``m(z) = (Wz)_y − max_{j≠y} (Wz)_j`` is concave in the feature ``z``, so replacing
  every feature by its class mean ``μ_c`` does not lower the mean margin (Jensen), and the
  between-class variance of a dimension is at most its total variance. Hence every BN-feasible
  mean margin is at most

  .. math:: \max_{μ} \sum_c p_c\, m_c(μ_c) \quad\text{s.t.}\quad \sum_c p_c μ_c = 0,\;
            \sum_c p_c μ_{c,d}^2 \le 1 \;\; (d = 1..D),

  with ``p_c`` the class frequencies. The counterexample attains it for ``W = I_K``.
* That problem is a concave maximisation over a convex set (a ``K × D`` matrix): projected
  subgradient ascent reaches its maximum. The projection (centre every column with weights ``p``,
  then shrink a column whose weighted second moment exceeds 1) is exact, so every iterate is
  feasible and the value returned is attained by real class means.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def seed_mean_margin_value(weight: Tensor) -> Tensor:
    """Seed 004's claimed bound on the mean margin, ``2/K · ‖W‖₁`` (entrywise L1 norm of ``W [K, D]``).

    Logged under an honest name: it is *not* an upper bound for ``K ≥ 3`` (see the module doc).

    >>> seed_mean_margin_value(torch.eye(10)).item()
    2.0
    """
    return 2.0 / weight.shape[0] * weight.detach().abs().sum()


def class_mean_margins(means: Tensor, weight: Tensor) -> Tensor:
    """Margin ``m_c`` of class mean ``μ_c`` for its own class: ``means [K, D]``, ``weight [K, D]`` → ``[K]``."""
    logits = means @ weight.T  # [K, K]: row c = logits of class c's mean feature
    own = logits.diagonal()
    others = logits.masked_fill(torch.eye(len(logits), dtype=torch.bool, device=logits.device), -math.inf)
    return own - others.amax(1)


def project_bn_feasible(means: Tensor, freq: Tensor) -> Tensor:
    """Closest class means (in the ``p``-weighted norm) with ``Σ p_c μ_c = 0`` and ``Σ p_c μ_{c,d}² ≤ 1``."""
    centred = means - freq @ means
    second = (freq[:, None] * centred.pow(2)).sum(0).sqrt()
    return centred / second.clamp_min(1.0)


def max_bn_mean_margin(weight: Tensor, class_freq: Tensor | None = None, steps: int = 1000,
                       lr: float = 2.0) -> tuple[float, Tensor]:
    r"""The largest mean margin reachable with head ``W`` and BN-normalised features.

    Projected subgradient ascent on :math:`\sum_c p_c m_c(μ_c)` over feasible class means (see
    the module doc), started from ``μ_c ∝ Wᵀ(e_c − p)``, step ``lr/√t``; the best iterate is kept.

    Args:
        weight: the head ``W [K, D]`` (detached; float64 internally).
        class_freq: ``p [K]`` (normalised here); ``None``: balanced classes.
        steps: ascent steps.
        lr: initial step size.

    Returns:
        ``(value, means)``: the mean margin and the feasible class means ``[K, D]`` that reach it.

    Example:
        >>> value, _ = max_bn_mean_margin(torch.eye(10))
        >>> round(value, 4)  # K/√(K−1): above the seed's 2/K·‖W‖₁ = 2
        3.3333
    """
    w = weight.detach().to("cpu", torch.float64)
    k, _ = w.shape
    freq = (torch.full((k,), 1.0 / k, dtype=torch.float64) if class_freq is None
            else class_freq.detach().to("cpu", torch.float64))
    if freq.shape != (k,) or (freq < 0).any() or freq.sum() <= 0:
        raise ValueError(f"class_freq must be {k} non-negative numbers with a positive sum, got {class_freq}")
    freq = freq / freq.sum()
    means = project_bn_feasible((torch.eye(k, dtype=torch.float64) - freq) @ w * 1e3, freq)
    best_value, best = float(freq @ class_mean_margins(means, w)), means.clone()
    off_diagonal = torch.eye(k, dtype=torch.bool)
    for t in range(1, steps + 1):
        logits = (means @ w.T).masked_fill(off_diagonal, -math.inf)
        rival = logits.argmax(1)  # the strongest other class of each class mean
        # The subgradient of Σ p_c m_c is p_c (W_c − W_rival(c)); in the p-weighted geometry of the
        # projection the ascent direction is that divided by p_c.
        step = w - w[rival]
        means = project_bn_feasible(means + lr / math.sqrt(t) * step / (step.norm() + 1e-12), freq)
        value = float(freq @ class_mean_margins(means, w))
        if value > best_value:
            best_value, best = value, means.clone()
    return best_value, best
