"""Paths in parameter space between two trained networks of one architecture.

A path maps ``t ∈ [0, 1]`` to a point ``ψ(t)``: a dict ``{parameter name: tensor}`` with the
names of ``model.named_parameters()``. The base model stays unchanged; a point is evaluated with
``torch.func.functional_call(model, ψ(t), (x,))``, so no second copy of the layers is built.

* :class:`LinearPath` — ``ψ(t) = (1−t)·θ_A + t·θ_B``.
* :class:`ArcPath` — ``ψ(t) = μ + cos(πt/2)·(θ_A − μ) + sin(πt/2)·(θ_B − μ)`` with μ the prior mean
  (``E θ_A = E θ_B``; 0 for the usual zero-mean initialisations and Gaussian priors).
* :class:`BezierCurve` — ``ψ(t) = Σ_{k=0}^{n} C(n,k)·t^k·(1−t)^{n−k}·θ_k`` with ``θ_0 = θ_A``,
  ``θ_n = θ_B`` fixed and the ``n−1`` bends ``θ_1..θ_{n−1}`` trainable (Garipov et al. 2018).
* :class:`PolygonalChain` — piecewise linear through ``θ_A, θ_1, …, θ_{n−1}, θ_B`` at
  ``t = 0, 1/n, …, 1``.

Every path is an ``nn.Module``: endpoints are buffers and bends are parameters, so a trained curve
is saved in a checkpoint and its bends receive gradients (and DDP's all-reduce) like any weight.

Example:
    >>> import torch
    >>> a = {"w": torch.zeros(2)}; b = {"w": torch.ones(2)}
    >>> LinearPath(a, b).point(0.25)["w"]
    tensor([0.2500, 0.2500])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from marginboost.errors import ConfigError, check_int

PATH_KINDS = ("linear", "arc", "bezier", "chain")


def _check_endpoints(theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor]) -> list[str]:
    names = list(theta_a)
    if set(names) != set(theta_b):
        missing = sorted(set(names) ^ set(theta_b))
        raise ConfigError("path.endpoints", f"parameter names differ: {missing[:5]}",
                          "two networks of one architecture", describe=True)
    for n in names:
        if theta_a[n].shape != theta_b[n].shape:
            raise ConfigError("path.endpoints", f"{n}: {tuple(theta_a[n].shape)} vs {tuple(theta_b[n].shape)}",
                              "two networks of one architecture (equal shapes)", describe=True)
    return names


class CurvePath(nn.Module):
    """Base class: the endpoints ``θ_A``, ``θ_B`` (buffers) and ``point(t) -> {name: tensor}``."""

    def __init__(self, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.names = _check_endpoints(theta_a, theta_b)
        for i, n in enumerate(self.names):
            self.register_buffer(f"a{i}", theta_a[n].detach().clone())
            self.register_buffer(f"b{i}", theta_b[n].detach().clone())

    def endpoint(self, which: str) -> dict[str, Tensor]:
        """``θ_A`` (``which="a"``) or ``θ_B`` (``"b"``)."""
        return {n: getattr(self, f"{which}{i}") for i, n in enumerate(self.names)}

    def point(self, t: float | Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def forward(self, t: float | Tensor) -> dict[str, Tensor]:
        return self.point(t)


class LinearPath(CurvePath):
    """``ψ(t) = (1−t)·θ_A + t·θ_B``."""

    def point(self, t: float | Tensor) -> dict[str, Tensor]:
        return {n: torch.lerp(getattr(self, f"a{i}"), getattr(self, f"b{i}"), float(t))
                for i, n in enumerate(self.names)}


class ArcPath(CurvePath):
    """``ψ(t) = μ + cos(πt/2)·(θ_A − μ) + sin(πt/2)·(θ_B − μ)``.

    Args:
        mu: the prior mean: ``None`` or a number (the same value for every entry; default 0) or a
            dict ``{name: tensor}``. With ``θ_A, θ_B`` independent draws around μ with equal
            covariance, every point of the arc has the same distribution as the endpoints, which
            the straight line (shrinking towards μ in the middle) does not.
    """

    def __init__(self, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor],
                 mu: float | Mapping[str, Tensor] | None = None) -> None:
        super().__init__(theta_a, theta_b)
        for i, n in enumerate(self.names):
            if isinstance(mu, Mapping):
                if n not in mu:
                    raise ConfigError("path.mu", f"no entry for {n!r}", "a value for every parameter",
                                      describe=True)
                m = mu[n].detach().clone().to(theta_a[n])
            else:
                m = torch.full_like(theta_a[n], 0.0 if mu is None else float(mu))
            self.register_buffer(f"mu{i}", m)

    def point(self, t: float | Tensor) -> dict[str, Tensor]:
        t = float(t)
        if t in (0.0, 1.0):  # exact endpoints (μ + (θ − μ) and cos(π/2) = 6e-17 both round)
            return self.endpoint("a" if t == 0.0 else "b")
        c, s = math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)
        out = {}
        for i, n in enumerate(self.names):
            mu = getattr(self, f"mu{i}")
            out[n] = mu + c * (getattr(self, f"a{i}") - mu) + s * (getattr(self, f"b{i}") - mu)
        return out


class _BendCurve(CurvePath):
    """Curves with ``num_bends`` trainable control points, initialised on the straight line."""

    def __init__(self, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor], num_bends: int = 1,
                 trainable: Sequence[str] | None = None) -> None:
        super().__init__(theta_a, theta_b)
        self.num_bends = check_int("path.num_bends", num_bends, low=1)
        trainable = self.names if trainable is None else list(trainable)
        unknown = sorted(set(trainable) - set(self.names))
        if unknown:
            raise ConfigError("path.trainable", unknown, "names of the endpoints' parameters")
        # Names outside `trainable` (a frozen head, say) follow the straight line between A and B.
        self.trainable = [n in trainable for n in self.names]
        n_seg = self.num_bends + 1
        self.bends = nn.ParameterList()
        for k in range(1, n_seg):
            for i, n in enumerate(self.names):
                if self.trainable[i]:
                    init = torch.lerp(theta_a[n].detach(), theta_b[n].detach(), k / n_seg)
                    self.bends.append(nn.Parameter(init.clone()))
        self._slot = {}  # (k, i) -> index into self.bends
        j = 0
        for k in range(1, n_seg):
            for i in range(len(self.names)):
                if self.trainable[i]:
                    self._slot[(k, i)] = j
                    j += 1

    def control_point(self, k: int, i: int) -> Tensor:
        """Control point ``k`` (0 = A, ``num_bends + 1`` = B) of parameter ``i``."""
        if k == 0:
            return getattr(self, f"a{i}")
        if k == self.num_bends + 1:
            return getattr(self, f"b{i}")
        if not self.trainable[i]:
            return torch.lerp(getattr(self, f"a{i}"), getattr(self, f"b{i}"), k / (self.num_bends + 1))
        return self.bends[self._slot[(k, i)]]


class BezierCurve(_BendCurve):
    """Bezier curve of degree ``num_bends + 1`` with fixed endpoints (Garipov et al. 2018).

    ``ψ(t) = Σ_{k=0}^{n} C(n,k)·t^k·(1−t)^{n−k}·θ_k``, ``n = num_bends + 1``. With one bend this is
    the quadratic curve ``(1−t)²θ_A + 2t(1−t)θ_1 + t²θ_B``.
    """

    def point(self, t: float | Tensor) -> dict[str, Tensor]:
        t = float(t)
        deg = self.num_bends + 1
        coef = [math.comb(deg, k) * t**k * (1 - t) ** (deg - k) for k in range(deg + 1)]
        return {n: sum(coef[k] * self.control_point(k, i) for k in range(deg + 1))
                for i, n in enumerate(self.names)}


class PolygonalChain(_BendCurve):
    """Piecewise-linear path through ``θ_A, θ_1, …, θ_B`` at equally spaced ``t``."""

    def point(self, t: float | Tensor) -> dict[str, Tensor]:
        t = min(max(float(t), 0.0), 1.0)
        n_seg = self.num_bends + 1
        k = min(int(t * n_seg), n_seg - 1)
        s = t * n_seg - k
        return {n: torch.lerp(self.control_point(k, i), self.control_point(k + 1, i), s)
                for i, n in enumerate(self.names)}


def make_path(kind: str, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor], *,
              mu: float | Mapping[str, Tensor] | None = None, num_bends: int = 1,
              trainable: Sequence[str] | None = None) -> CurvePath:
    """A path of ``kind`` in ``linear``, ``arc``, ``bezier``, ``chain`` between two parameter dicts."""
    from marginboost.errors import check_choice

    check_choice("path.kind", kind, PATH_KINDS)
    if kind == "linear":
        return LinearPath(theta_a, theta_b)
    if kind == "arc":
        return ArcPath(theta_a, theta_b, mu)
    cls = BezierCurve if kind == "bezier" else PolygonalChain
    return cls(theta_a, theta_b, num_bends=num_bends, trainable=trainable)


def parameters_of(model: nn.Module) -> dict[str, Tensor]:
    """``{name: detached tensor}`` of a model's parameters (the coordinates a path moves in)."""
    return {n: p.detach() for n, p in model.named_parameters()}


def t_grid(points: int = 21) -> list[float]:
    """``points`` equally spaced values of t in [0, 1] (21 by default; Garipov et al. use 61)."""
    points = check_int("path.grid_points", points, low=2)
    return [k / (points - 1) for k in range(points)]
