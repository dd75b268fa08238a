"""Variational (diagonal Gaussian) weights over any network, through ``torch.func.functional_call``.

A network's parameters ``w`` get a posterior ``q(w) = N(m, diag σ²)`` and a prior
``p(w) = N(μ, A⁻¹)`` with ``A⁻¹ = s²·I``. The network's own module is kept only for its structure:
the weights it runs with come from outside, either from a :class:`VariationalModel` (one set of
``(m, log σ²)``, trained at one λ) or from a hypernetwork ``G(λ)`` (``models.hypernet``).

Training uses reparameterised samples ``w = m + σ·ε``, ``ε ~ N(0, I)``; evaluation uses the mean
``m``. The per-object training objective is the negative generalized evidence

    L(λ) = −(1/N)·E_q log p(D|w) + λ·KL(q‖p)/N  ≈  mean_i CE(f(x_i; w̃), y_i) + λ·KL(q‖p)/N,

one sample ``w̃ ~ q`` per batch, ``N`` the training-set size (the KL scaled by the data-set size,
as is standard for mini-batch variational inference).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from marginboost.errors import ConfigError, check_number

__all__ = [
    "VariationalModel",
    "VariationalNet",
    "gaussian_kl",
    "negative_evidence",
    "sample_weights",
]

Weights = dict[str, Tensor]


def gaussian_kl(mean: Tensor, log_var: Tensor, prior_mean: float = 0.0, prior_var: float = 0.1) -> Tensor:
    """``KL(N(m, diag σ²) ‖ N(μ, s²·I))`` summed over all elements, in closed form.

    ``KL = ½ Σ_i [ log(s²/σ_i²) + (σ_i² + (m_i − μ)²)/s² − 1 ]`` with ``σ_i² = exp(log_var_i)``.

    Args:
        mean: ``m``, any shape.
        log_var: ``log σ²``, the shape of ``mean``.
        prior_mean: ``μ`` (a scalar: the same for every weight).
        prior_var: ``s²`` (``A⁻¹ = s²·I``).

    Returns:
        A scalar tensor.

    Example:
        >>> abs(float(gaussian_kl(torch.zeros(3), torch.full((3,), math.log(0.1)), 0.0, 0.1))) < 1e-6
        True
        >>> round(float(gaussian_kl(torch.ones(1), torch.zeros(1), 0.0, 1.0)), 6)  # ½·(1 + 1 − 1)
        0.5
    """
    ratio = (log_var.exp() + (mean - prior_mean) ** 2) / prior_var
    return 0.5 * (math.log(prior_var) - log_var + ratio - 1.0).sum()


def sample_weights(mean: Mapping[str, Tensor], log_var: Mapping[str, Tensor],
                   generator: torch.Generator | None = None) -> Weights:
    """One reparameterised draw ``w = m + exp(½·log σ²)·ε``, ``ε ~ N(0, I)``, per tensor.

    ``generator`` makes the draw reproducible without touching the global RNG.
    """
    out = {}
    for name, m in mean.items():
        eps = torch.randn(m.shape, generator=generator, device=m.device, dtype=m.dtype)
        out[name] = m + (0.5 * log_var[name]).exp() * eps
    return out


def negative_evidence(logits: Tensor, target: Tensor, kl: Tensor, lam: float | Tensor,
                      data_size: int) -> Tensor:
    """Per-object negative generalized evidence ``mean_i CE(logits_i, y_i) + λ·KL/N``.

    ``logits`` come from sampled weights (``[B, K]``), ``kl`` is ``KL(q‖p)`` of the whole network
    (a scalar) and ``N = data_size`` the number of training objects. With ``λ = 0`` this is the
    expected negative log-likelihood per object (one Monte-Carlo sample).
    """
    return F.cross_entropy(logits, target) + lam * kl / data_size


class VariationalNet(nn.Module):
    """A network run as a function of externally given weights, with a Gaussian prior.

    The module holds no trainable parameters: ``forward(x, mean, log_var)`` runs ``net`` through
    ``functional_call`` with a sample from ``N(mean, exp(log_var))`` in training mode (or when
    ``sample=True``) and with ``mean`` in eval mode. Names are ``net``'s parameter names
    (``"0.weight"``). ``net`` must have no buffers: BatchNorm running statistics are not part of
    a weight posterior (use a backbone without BN, e.g. ``relu_mlp``).

    Args:
        net: the target network (its initial weights become :attr:`initial_mean`).
        prior_mean: ``μ`` of the prior.
        prior_var: ``s²`` of the prior ``N(μ, s²·I)``.

    Shapes: ``x`` is what ``net`` takes; the output is ``net``'s output (``[B, K]`` logits).
    """

    def __init__(self, net: nn.Module, prior_mean: float = 0.0, prior_var: float = 0.1) -> None:
        super().__init__()
        buffers = [name for name, _ in net.named_buffers()]
        if buffers:
            raise ConfigError("model.backbone", f"a network with buffers {buffers[:3]}",
                              "a network without buffers (no BatchNorm), e.g. 'relu_mlp'",
                              describe=True)
        self.prior_mean = check_number("model.prior_mean", prior_mean)
        self.prior_var = check_number("model.prior_var", prior_var, low=0.0, low_open=True)
        self.shapes = {name: tuple(p.shape) for name, p in net.named_parameters()}
        self.initial_mean = {name: p.detach().clone() for name, p in net.named_parameters()}
        # Only the structure is needed: functional_call replaces every parameter. Kept out of the
        # module tree (no duplicate parameters in state_dict or the optimizer), on the meta device.
        self.__dict__["net"] = net.to("meta").requires_grad_(False)

    @property
    def num_weights(self) -> int:
        """``P``, the number of weights (each has an ``m`` and a ``log σ²``)."""
        return sum(math.prod(s) for s in self.shapes.values())

    def forward(self, x: Tensor, mean: Mapping[str, Tensor], log_var: Mapping[str, Tensor],
                sample: bool | None = None, generator: torch.Generator | None = None) -> Tensor:
        if sample is None:
            sample = self.training
        weights = sample_weights(mean, log_var, generator) if sample else dict(mean)
        return functional_call(self.net, weights, (x,))

    def kl(self, mean: Mapping[str, Tensor], log_var: Mapping[str, Tensor]) -> Tensor:
        """``KL(q‖p)`` of the whole network (sum over every weight)."""
        return sum(gaussian_kl(mean[n], log_var[n], self.prior_mean, self.prior_var) for n in self.shapes)


def _key(name: str) -> str:
    return name.replace(".", "/")  # ParameterDict keys cannot contain "."


class VariationalModel(nn.Module):
    """One diagonal Gaussian posterior ``(m, log σ²)`` over a network's weights: the direct model.

    Training mode samples the weights (reparameterised), eval mode uses the means.

    Args:
        net: the target network; its initialisation becomes ``m``.
        prior_mean, prior_var: the prior ``N(μ, s²·I)``.
        init_log_var: initial ``log σ²`` of every weight.

    Example:
        >>> model = VariationalModel(nn.Linear(4, 3)).eval()
        >>> model(torch.randn(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(self, net: nn.Module, prior_mean: float = 0.0, prior_var: float = 0.1,
                 init_log_var: float = -6.0) -> None:
        super().__init__()
        init_log_var = check_number("model.init_log_var", init_log_var)
        self.target = VariationalNet(net, prior_mean, prior_var)
        self.mean = nn.ParameterDict({_key(n): nn.Parameter(m.clone())
                                      for n, m in self.target.initial_mean.items()})
        self.log_var = nn.ParameterDict({_key(n): nn.Parameter(torch.full(s, init_log_var))
                                         for n, s in self.target.shapes.items()})

    def variational_parameters(self, lam: float | Tensor | None = None) -> tuple[Weights, Weights]:
        """``(mean, log_var)`` keyed by the target's parameter names (the live Parameters).

        ``lam`` is accepted and ignored, so a direct model and a hypernetwork are called alike.
        """
        names = self.target.shapes
        return ({n: self.mean[_key(n)] for n in names}, {n: self.log_var[_key(n)] for n in names})

    def forward(self, x: Tensor, sample: bool | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        mean, log_var = self.variational_parameters()
        return self.target(x, mean, log_var, sample=self.training if sample is None else sample,
                           generator=generator)

    def kl(self) -> Tensor:
        return self.target.kl(*self.variational_parameters())

    @torch.no_grad()
    def load_variational(self, mean: Mapping[str, Tensor], log_var: Mapping[str, Tensor]) -> None:
        """Copy ``(mean, log_var)`` (e.g. a hypernetwork's ``G(λ)``) into this model."""
        own_mean, own_log_var = self.variational_parameters()
        missing = set(own_mean) ^ set(mean)
        if missing or set(own_log_var) ^ set(log_var):
            raise ValueError(f"load_variational: names differ from the target's: {sorted(missing)}")
        for n in own_mean:
            own_mean[n].copy_(mean[n])
            own_log_var[n].copy_(log_var[n])
