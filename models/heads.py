"""Classifier heads: features ``z`` ``[N, D]`` to logits ``[N, K]``, and each head's training loss.

Every head has the form ``f = h(z) Wᵀ (+ b)``: an embedding ``h = embed(z)`` fed to a linear map
whose effective matrix is ``weight`` (``[K, D]``). The heads differ in how ``h`` and ``W`` are
constrained and in the margin their loss demands:

============  ==================================  ================================================
head          logits ``f``                        training loss (``g_i``: the object's gap)
============  ==================================  ================================================
margin        ``W·BN(z)``, BN without affine,     ``CE(f − g_i e_y)`` (the discounted loss)
              ``W`` frozen by default
linear        ``W z + b``, trainable (plain CE)   ``CE(f)``; refuses gaps (no fixed logit scale)
l2_softmax    ``W (α z/‖z‖) + b`` (Ranjan 2017)   ``CE(f − g_i e_y)``
cosface       ``s cos θ_j`` (Wang 2018)           ``CE(f − (s·m + g_i) e_y)``
arcface       ``s cos θ_j`` (Deng 2019)           true logit ``s cos(θ_y + m) − g_i``
============  ==================================  ================================================

``cos θ_j = ⟨w_j, z⟩ / (‖w_j‖‖z‖)``. A gap is always in **logit units** and subtracted from the
true-class logit after the head's own margin, the unit margins are measured in (``f_y −
max_{j≠y} f_j`` on the logits above, without any training margin), so boosting's margins feed
back as gaps for every head. For CosFace the gap is a per-object margin ``m_i = m + g_i/s``
(exactly); for ArcFace it is an additive cosine margin ``g_i/s`` on top of the angular margin
``m`` (InsightFace's combined margin ``cos(θ_y + m) − g_i/s``).

With ``W`` trainable and nothing normalised, the network could scale its logits up until any gap
is meaningless; the ``margin`` head freezes ``W`` and drops the BN affine to keep the logit scale
bounded, and the ``linear`` head (the plain cross-entropy baseline) refuses non-zero gaps.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginboost.errors import ConfigError, check_bool, check_choice, check_number

from .losses import discounted_cross_entropy

HEAD_INITS = ("orthogonal", "kaiming", "simplex_etf")


def head_weight(num_classes: int, in_features: int, init: str = "orthogonal",
                scale: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """A ``[K, D]`` head matrix.

    * ``orthogonal``: orthonormal rows (columns if ``K > D``), times ``scale``.
    * ``kaiming``: ``N(0, 2/D)`` entries (Kaiming normal, fan-in), times ``scale``.
    * ``simplex_etf``: the simplex equiangular tight frame
      ``sqrt(K/(K-1)) · (I_K - 11ᵀ/K) Uᵀ`` with ``U ∈ R^{D×K}`` orthonormal columns: unit rows,
      pairwise cosine ``-1/(K-1)``; needs ``D >= K``.
    """
    check_choice("model.head_init", init, HEAD_INITS)
    K, D = num_classes, in_features
    if init == "orthogonal":
        a = torch.randn(max(K, D), min(K, D), generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(a)
        q = q * torch.sign(torch.diagonal(r))  # unique, uniformly distributed factor
        w = q.T if K <= D else q  # [K, D]
    elif init == "kaiming":
        w = torch.randn(K, D, generator=generator, dtype=torch.float64) * math.sqrt(2.0 / D)
    else:
        if D < K:
            raise ConfigError("model.head_init", init, f"orthogonal or kaiming when the feature dimension D={D} is "
                              f"below num_classes K={K} (simplex_etf needs D >= K)")
        u, _ = torch.linalg.qr(torch.randn(D, K, generator=generator, dtype=torch.float64))
        centred = torch.eye(K, dtype=torch.float64) - 1.0 / K
        w = math.sqrt(K / (K - 1)) * centred @ u.T
    return (scale * w).float()


def _is_zero(gap: float | Tensor) -> bool:
    return not torch.is_tensor(gap) and gap == 0


class Head(nn.Module):
    """Base of the heads: ``forward(z) = embed(z) @ weight.T + bias``; ``loss`` adds the margin.

    Subclasses set ``name``, ``kwargs`` (the ``head_kwargs`` they accept), ``default_frozen``,
    implement :meth:`embed` and the ``weight``/``bias`` properties, and override
    :meth:`margin_gap` when their loss demands a margin of its own.
    """

    name: ClassVar[str]
    kwargs: ClassVar[tuple[str, ...]] = ()
    accepts_gap: ClassVar[bool] = True
    default_frozen: ClassVar[bool] = False

    def embed(self, features: Tensor) -> Tensor:
        """``h [N, D]``: what the final linear map sees."""
        raise NotImplementedError

    @property
    def weight(self) -> Tensor:
        """The effective class-weight matrix ``[K, D]`` (``logits = h Wᵀ + b``)."""
        raise NotImplementedError

    @property
    def bias(self) -> Tensor | None:
        return None

    def forward(self, features: Tensor) -> Tensor:
        return F.linear(self.embed(features), self.weight, self.bias)

    def margin_gap(self, logits: Tensor, target: Tensor) -> float | Tensor:
        """The head's own training margin as a logit-space gap on the true class (``0``: none)."""
        return 0.0

    def loss(self, logits: Tensor, target: Tensor, gap: float | Tensor = 0.0) -> Tensor:
        r"""The training loss on this head's logits: ``CE(f − (margin_gap + g)·onehot(y), y)``.

        Args:
            logits: ``[N, K]`` from :meth:`forward`.
            target: ``[N]`` class indices.
            gap: a float or ``[N]`` per-object gaps in logit units.
        """
        if not self.accepts_gap and not torch.is_tensor(gap) and gap != 0:
            # a float is checked here; a batch's gap tensor was checked once before training
            # (:meth:`check_gaps`), since reading it back every step would sync the device
            self.check_gaps(torch.as_tensor(gap))
        own = self.margin_gap(logits, target)
        total = gap if _is_zero(own) else own + gap
        return discounted_cross_entropy(logits, target, total)

    def check_gaps(self, gaps: Tensor) -> None:
        """Raise :class:`~marginboost.errors.ConfigError` if this head refuses these gaps."""
        if not self.accepts_gap and bool((torch.as_tensor(gaps) != 0).any()):
            raise ConfigError("model.head", f"{self.name!r} with non-zero gaps",
                              "a head with a fixed logit scale for gaps (margin, l2_softmax, cosface, "
                              "arcface), or all gaps 0 (boosting.gap_rule: NoGapRule)", describe=True)

    def logit_scale(self, features: Tensor) -> Tensor:
        r"""``mean_j ‖w_j‖ · RMS_i ‖h_i‖``: the typical size of a logit on these features.

        Margins divided by it are comparable across heads (for CosFace/ArcFace it is ``s`` and
        ``m_i / s`` is a difference of cosines).
        """
        h = self.embed(features).detach().double()
        w = self.weight.detach().double()
        return w.norm(dim=1).mean() * h.pow(2).sum(1).mean().sqrt()

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class MarginHead(Head):
    """``BatchNorm1d(D, affine=False)`` followed by a bias-free linear map ``W`` (``[K, D]``), frozen
    by default: the head of the discounted loss."""

    name = "margin"
    default_frozen = True

    def __init__(self, in_features: int, num_classes: int, init: str = "orthogonal",
                 scale: float = 1.0, frozen: bool = True, seed: int | None = None) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features, affine=False)
        self.linear = nn.Linear(in_features, num_classes, bias=False)
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.linear.weight.copy_(head_weight(num_classes, in_features, init, scale, gen))
        self.linear.weight.requires_grad_(not frozen)

    @property
    def weight(self) -> Tensor:
        return self.linear.weight

    def embed(self, features: Tensor) -> Tensor:
        return self.bn(features)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(self.bn(features))


class LinearHead(Head):
    """``W z + b`` with ``W``, ``b`` trainable and no normalisation: the plain cross-entropy baseline.

    It refuses non-zero gaps: its logit scale is free, so the loss with a gap tends to the loss
    without it as the network scales its logits up.
    """

    name = "linear"
    kwargs = ("bias",)
    accepts_gap = False

    def __init__(self, in_features: int, num_classes: int, init: str = "orthogonal", scale: float = 1.0,
                 frozen: bool = False, seed: int | None = None, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes, bias=check_bool("model.head_kwargs.bias", bias))
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.linear.weight.copy_(head_weight(num_classes, in_features, init, scale, gen))
            if self.linear.bias is not None:
                self.linear.bias.zero_()
        self.linear.requires_grad_(not frozen)

    @property
    def weight(self) -> Tensor:
        return self.linear.weight

    @property
    def bias(self) -> Tensor | None:
        return self.linear.bias

    def embed(self, features: Tensor) -> Tensor:
        return features


class L2SoftmaxHead(LinearHead):
    r"""L2-constrained softmax (Ranjan et al. 2017): ``W (α z/‖z‖) + b``, every feature of norm ``α``.

    ``head_kwargs``: ``alpha`` (default 16), ``learn_alpha`` (default false: ``α`` is a fixed
    buffer; true: a trainable scalar, subject to the optimizer's weight decay), ``bias``.
    Gaps are subtracted from the true logit as in the discounted loss.
    """

    name = "l2_softmax"
    kwargs = ("alpha", "learn_alpha", "bias")
    accepts_gap = True

    def __init__(self, in_features: int, num_classes: int, init: str = "orthogonal", scale: float = 1.0,
                 frozen: bool = False, seed: int | None = None, alpha: float = 16.0,
                 learn_alpha: bool = False, bias: bool = True) -> None:
        super().__init__(in_features, num_classes, init, scale, frozen, seed, bias)
        alpha_t = torch.tensor(check_number("model.head_kwargs.alpha", alpha, low=0.0, low_open=True))
        if check_bool("model.head_kwargs.learn_alpha", learn_alpha):
            self.alpha = nn.Parameter(alpha_t)
        else:
            self.register_buffer("alpha", alpha_t)

    def embed(self, features: Tensor) -> Tensor:
        return self.alpha * F.normalize(features, dim=1)


class CosFaceHead(Head):
    r"""CosFace / large-margin cosine loss (Wang et al. 2018): logits ``s·cos θ_j``.

    .. math::
        \ell_i = -\log \frac{e^{s(\cos\theta_{y} - m) - g_i}}
                 {e^{s(\cos\theta_{y} - m) - g_i} + \sum_{j\ne y} e^{s\cos\theta_j}}

    so the per-object margin is ``m + g_i/s``. ``head_kwargs``: ``s`` (default 30), ``m``
    (default 0.35). ``W`` (trainable by default) is normalised row-wise in every forward, so
    ``head_scale`` has no effect and must stay 1. With ``m = 0, s = 1`` the loss is the
    softmax cross-entropy over the cosines.
    """

    name = "cosface"
    kwargs = ("s", "m")

    def __init__(self, in_features: int, num_classes: int, init: str = "orthogonal", scale: float = 1.0,
                 frozen: bool = False, seed: int | None = None, s: float = 30.0, m: float = 0.35) -> None:
        super().__init__()
        if scale != 1.0:
            raise ConfigError("model.head_scale", scale,
                              f"1.0 with head {self.name!r} (rows are normalised; the scale is head_kwargs.s)")
        self.s = check_number("model.head_kwargs.s", s, low=0.0, low_open=True)
        self.m = self._check_m(m)
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        self.raw_weight = nn.Parameter(head_weight(num_classes, in_features, init, 1.0, gen),
                                       requires_grad=not frozen)

    def _check_m(self, m: float) -> float:
        return check_number("model.head_kwargs.m", m, low=0.0, high=2.0)

    @property
    def weight(self) -> Tensor:
        return self.s * F.normalize(self.raw_weight, dim=1)

    def embed(self, features: Tensor) -> Tensor:
        return F.normalize(features, dim=1)

    def margin_gap(self, logits: Tensor, target: Tensor) -> float | Tensor:
        return self.s * self.m

    def extra_repr(self) -> str:
        return f"name={self.name!r}, s={self.s}, m={self.m}"


class ArcFaceHead(CosFaceHead):
    r"""ArcFace / additive angular margin (Deng et al. 2019): logits ``s·cos θ_j``; in training the
    true logit is ``s·ψ(θ_y) − g_i`` with ``ψ(θ) = cos(θ + m)`` while ``θ + m ≤ π`` and
    ``cos θ − m·sin m`` beyond (InsightFace's fallback, which keeps ``ψ`` decreasing).

    As a gap on the true logit the margin is ``s(cos θ_y − ψ(θ_y))``, which depends on ``θ_y``
    (and is differentiated through). ``head_kwargs``: ``s`` (default 30), ``m`` in radians
    (default 0.5, at most π/2).
    """

    name = "arcface"

    def __init__(self, in_features: int, num_classes: int, init: str = "orthogonal", scale: float = 1.0,
                 frozen: bool = False, seed: int | None = None, s: float = 30.0, m: float = 0.5) -> None:
        super().__init__(in_features, num_classes, init, scale, frozen, seed, s, m)

    def _check_m(self, m: float) -> float:
        return check_number("model.head_kwargs.m", m, low=0.0, high=math.pi / 2)

    def margin_gap(self, logits: Tensor, target: Tensor) -> float | Tensor:
        cos = (logits.gather(1, target[:, None]).squeeze(1) / self.s).clamp(-1.0, 1.0)
        # sin θ from cos θ; clamped away from 0 so the gradient stays finite at θ = 0 and θ = π.
        sin = (1.0 - cos * cos).clamp_min(1e-7).sqrt()
        psi = cos * math.cos(self.m) - sin * math.sin(self.m)
        psi = torch.where(cos > math.cos(math.pi - self.m), psi, cos - self.m * math.sin(self.m))
        return self.s * (cos - psi)


HEADS: dict[str, type[Head]] = {h.name: h for h in (MarginHead, LinearHead, L2SoftmaxHead, CosFaceHead,
                                                    ArcFaceHead)}


def build_head(name: str, in_features: int, num_classes: int, *, init: str = "orthogonal",
               scale: float = 1.0, frozen: bool | None = None, seed: int | None = None,
               **head_kwargs: Any) -> Head:
    """The head ``name`` (one of :data:`HEADS`) on ``in_features`` features.

    ``frozen=None`` takes the head's default (the margin head frozen, the others trainable).

    Example:
        >>> head = build_head("cosface", 8, 3, s=1.0, m=0.0)
        >>> z = torch.randn(4, 8)
        >>> bool(head(z).abs().max() <= 1.0 + 1e-6)   # cosines
        True
    """
    check_choice("model.head", name, HEADS)
    cls = HEADS[name]
    for key in head_kwargs:
        if key not in cls.kwargs:
            raise ConfigError("model.head_kwargs", key, f"for head {name!r}: "
                              + (", ".join(cls.kwargs) if cls.kwargs else "none"))
    frozen = cls.default_frozen if frozen is None else check_bool("model.freeze_head", frozen)
    return cls(in_features, num_classes, init, scale, frozen, seed, **head_kwargs)
