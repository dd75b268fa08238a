r"""Sharpness-aware minimisation: the perturbation math as pure functions, and ``SAMClassifier``.

SAM (Foret et al., 2021) takes the gradient step at the point of (approximately) highest loss in a
ball of radius :math:`\rho` around the weights:

.. math::
    \varepsilon = \rho\, \frac{g}{\lVert g \rVert_2}, \qquad
    w \leftarrow w - \eta_{\mathrm{lr}}\, \nabla L(w + \varepsilon)

ASAM (Kwon et al., 2021) measures the ball in the coordinates :math:`T_w^{-1} w` with the
element-wise operator :math:`T_w = |w| + \eta` (:math:`\eta` keeps zero weights perturbable):

.. math::
    \varepsilon = \rho\, \frac{T_w^2\, g}{\lVert T_w\, g \rVert_2}

Riemannian SAM takes the step on the sphere :math:`\{v : \lVert v \rVert = \lVert w \rVert\}` of
every scale-invariant tensor ``w`` (:math:`L(c\,w) = L(w)`, as defined in
:mod:`models.scale_invariance`): the gradient is projected to the tangent space, the step of length
:math:`\rho` (shared, as in SAM, with the other perturbed tensors) is taken along it and the result
is retracted to the sphere:

.. math::
    g_\perp = g - \frac{\langle g, w\rangle}{\lVert w\rVert^2} w, \qquad
    v = \rho\, \frac{g_\perp}{N}, \qquad
    w + \varepsilon = \lVert w\rVert \frac{w + v}{\lVert w + v\rVert}

with :math:`N = \sqrt{\sum_{\text{s.-inv.}} \lVert g_\perp\rVert^2 + \sum_{\text{others}}
\lVert g\rVert^2}`; tensors that are not scale-invariant get the SAM step :math:`\rho g / N`. The
radial component of ``g`` (along which the loss does not change) is discarded, so the whole budget
:math:`\rho` goes into directions that change the function.

All norms are global over the perturbed tensors (one ball, not one per tensor). The functions work on
lists of tensors (one per parameter) and never modify their inputs. :class:`SAMClassifier` trains
with them on top of :class:`~models.manual_step.ManualStepClassifier`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric

from marginboost.errors import ConfigError, check_bool, check_int, check_number

from .manual_step import ManualStepClassifier
from .parameters import global_norm, match_parameters
from .scale_invariance import scale_invariant_structure, select_scale_invariant
from .state import get_rng_state, preserved_batchnorm_stats, set_rng_state

# Added to the gradient norm so that a zero gradient (or rho=0) gives a zero perturbation, not NaN.
NORM_EPS = 1e-12


def _with_weight_decay(params: Sequence[Tensor], grads: Sequence[Tensor],
                       weight_decay: float | Sequence[float]) -> list[Tensor]:
    if isinstance(weight_decay, (int, float)):
        weight_decay = [float(weight_decay)] * len(params)
    if len(weight_decay) != len(params):
        raise ValueError(f"weight_decay: got {len(weight_decay)} values for {len(params)} parameters")
    return [g + wd * p if wd else g for p, g, wd in zip(params, grads, weight_decay)]


def sam_epsilon(params: Sequence[Tensor], grads: Sequence[Tensor], rho: float, *, adaptive: bool = False,
                eta: float = 0.01, weight_decay: float | Sequence[float] = 0.0) -> list[Tensor]:
    r"""The SAM / ASAM perturbation :math:`\varepsilon` for each tensor.

    * SAM: :math:`\varepsilon = \rho\, g / \lVert g \rVert`.
    * ASAM (``adaptive=True``): :math:`\varepsilon = \rho\, T_w^2 g / \lVert T_w g \rVert` with
      :math:`T_w = |w| + \eta` element-wise.

    ``g`` is ``grads`` plus ``weight_decay · w`` (per tensor when a sequence is given), i.e. the
    gradient of the L2-regularised loss when the regulariser is to enter the ascent step. The norm
    is global over all tensors, computed in at least float32; a zero gradient gives ``ε = 0``.

    Args:
        params: the weights ``w`` (any shapes).
        grads: ``∇L`` with the same shapes.
        rho: radius of the ball, ``>= 0``.
        adaptive: ASAM instead of SAM.
        eta: the ASAM offset ``η >= 0``.
        weight_decay: a float or one float per tensor.

    Returns:
        One tensor per parameter, of its shape and dtype.

    Example:
        >>> eps = sam_epsilon([torch.zeros(2)], [torch.tensor([3.0, 4.0])], rho=0.5)
        >>> eps[0]
        tensor([0.3000, 0.4000])
    """
    if len(params) != len(grads):
        raise ValueError(f"got {len(params)} parameters but {len(grads)} gradients")
    g = _with_weight_decay(params, grads, weight_decay)
    if adaptive:
        t = [p.abs() + eta for p in params]
        tg = [ti * gi for ti, gi in zip(t, g)]
        scale = rho / (global_norm(tg) + NORM_EPS)
        return [(ti * tgi * scale).to(p.dtype) for ti, tgi, p in zip(t, tg, params)]
    scale = rho / (global_norm(g) + NORM_EPS)
    return [(gi * scale).to(p.dtype) for gi, p in zip(g, params)]


def tangent_projection(w: Tensor, g: Tensor) -> Tensor:
    r"""The component of ``g`` orthogonal to ``w``: :math:`g - \frac{\langle g,w\rangle}{\lVert w\rVert^2} w`.

    Example:
        >>> tangent_projection(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 3.0]))
        tensor([0., 3.])
    """
    w2 = (w * w).sum()
    return g - (g * w).sum() / (w2 + NORM_EPS) * w


def retract_to_sphere(w: Tensor, v: Tensor) -> Tensor:
    r"""The point :math:`\lVert w\rVert (w + v) / \lVert w + v\rVert` on the sphere of radius ``‖w‖``.

    Example:
        >>> retract_to_sphere(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
        tensor([0.7071, 0.7071])
    """
    moved = w + v
    return moved * (torch.linalg.vector_norm(w) / (torch.linalg.vector_norm(moved) + NORM_EPS))


def riemannian_epsilon(params: Sequence[Tensor], grads: Sequence[Tensor], rho: float,
                       scale_invariant: Sequence[bool], *,
                       weight_decay: float | Sequence[float] = 0.0) -> list[Tensor]:
    r"""The Riemannian SAM perturbation (see the module docstring for the formula).

    For a scale-invariant tensor ``w`` the returned ``ε`` satisfies ``‖w + ε‖ = ‖w‖``; its
    tangent step before retraction is ``v = ρ g_⊥ / N``. Other tensors get ``ε = ρ g / N``.
    Weight decay, if given, is added to ``g`` first; it is radial, so it only changes the
    non-scale-invariant tensors and the shared norm through them.

    Args:
        params, grads: weights and gradients, one tensor each per parameter.
        rho: step length ``>= 0``.
        scale_invariant: one flag per parameter.

    Example:
        >>> w, g = torch.tensor([1.0, 0.0]), torch.tensor([5.0, 1.0])
        >>> eps = riemannian_epsilon([w], [g], rho=1.0, scale_invariant=[True])[0]
        >>> w + eps  # rotated by 45 degrees, still of norm 1
        tensor([0.7071, 0.7071])
    """
    if not (len(params) == len(grads) == len(scale_invariant)):
        raise ValueError("params, grads and scale_invariant must have the same length")
    g = _with_weight_decay(params, grads, weight_decay)
    directions = [tangent_projection(p, gi) if si else gi for p, gi, si in zip(params, g, scale_invariant)]
    scale = rho / (global_norm(directions) + NORM_EPS)
    out = []
    for p, d, si in zip(params, directions, scale_invariant):
        v = d * scale
        out.append((retract_to_sphere(p, v) - p).to(p.dtype) if si else v.to(p.dtype))
    return out


class SAMClassifier(ManualStepClassifier):
    r"""Sharpness-aware minimisation (SAM, ASAM, Riemannian SAM) of the discounted cross-entropy.

    Each SAM step: (1) forward/backward at ``w`` gives ``g``; (2) ``ε`` from ``g`` (see
    the functions above): SAM ``ρ g/‖g‖``, ASAM ``ρ T_w² g/‖T_w g‖`` with ``T_w = |w| + η``,
    Riemannian ``‖w‖(w+v)/‖w+v‖ - w`` with ``v = ρ g_⊥/N`` on scale-invariant tensors;
    (3) forward/backward at ``w + ε`` gives the update gradient, for every trainable parameter;
    (4) ``w`` is restored exactly (copied back, not ``w + ε - ε``) and the base optimizer steps.

    What the two passes share: the second pass runs with the RNG state of the first, so dropout draws
    the same masks, and BatchNorm's running statistics are put back to the first pass's values
    (the perturbed weights must not leak into them). With ``ρ = 0`` the trajectory is bit-identical to
    the base optimizer's. With gradient accumulation the perturbation is taken from the gradient of
    the whole window (micro-batches are kept until its end, then each is re-run at ``w + ε``), which
    is SAM on the effective batch.

    Under DDP ``sync_perturbation=True`` all-reduces the first-pass gradient (its backward is the
    synchronised one), so every replica takes the same ``ε`` from the global batch; ``False`` runs
    the first backward in ``no_sync`` and each replica perturbs with its own shard's gradient
    (the "m-sharpness" of the SAM paper, one all-reduce per step instead of two). The second-pass
    gradient is all-reduced in both modes.

    Args:
        rho: radius ``ρ >= 0`` (typical: 0.05 for SAM, 0.5 to 2 for ASAM).
        adaptive: ASAM.
        eta: the ASAM offset ``η >= 0``.
        riemannian: Riemannian SAM on the scale-invariant tensors (exclusive with ``adaptive``).
        sam_every: take a SAM step every ``k`` optimizer steps, a plain step otherwise.
        perturb_params: regexes (``re.search`` on names such as ``backbone.0.weight``) of the
            parameters to perturb; ``null`` perturbs all trainable ones. All trainable parameters
            are updated with the second-pass gradient either way.
        scale_invariant_params: regexes of the scale-invariant tensors for ``riemannian``;
            ``null`` detects them (:func:`~models.scale_invariance.scale_invariant_structure`).
        perturb_weight_decay: use ``g + λw`` (``λ`` = the optimizer group's ``weight_decay``) for
            ``ε``, i.e. perturb along the gradient of the regularised loss.
        sync_perturbation: see above (only matters under DDP).
        **kwargs: :class:`ManualStepClassifier` and :class:`~models.MarginClassifier` arguments.

    Example (YAML)::

        model:
          class_path: models.SAMClassifier
          init_args: {rho: 0.05, backbone: resnet18}
    """

    def __init__(self, *, rho: float = 0.05, adaptive: bool = False, eta: float = 0.01, riemannian: bool = False,
                 sam_every: int = 1, perturb_params: str | list[str] | None = None,
                 scale_invariant_params: str | list[str] | None = None, perturb_weight_decay: bool = False,
                 sync_perturbation: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rho = check_number("model.rho", rho, low=0.0)
        self.eta = check_number("model.eta", eta, low=0.0)
        self.sam_every = check_int("model.sam_every", sam_every, low=1)
        self.adaptive = check_bool("model.adaptive", adaptive)
        self.riemannian = check_bool("model.riemannian", riemannian)
        if adaptive and riemannian:
            raise ConfigError("model.riemannian", True, "false when model.adaptive is true (pick ASAM or "
                              "Riemannian SAM)")
        self.perturb_params, self.scale_invariant_params = perturb_params, scale_invariant_params
        self.perturb_weight_decay, self.sync_perturbation = perturb_weight_decay, sync_perturbation
        perturbed = match_parameters(self, perturb_params, "model.perturb_params")
        self.scale_invariant_names: list[str] = []
        if riemannian:
            example = torch.zeros(2, *tuple(self.hparams.input_shape))
            if scale_invariant_params is None:
                found = scale_invariant_structure(self, example)
            else:
                found = select_scale_invariant(self, scale_invariant_params, "model.scale_invariant_params", example)
            self.scale_invariant_names = list(found)
            chosen = {n for n, _ in perturbed}
            if not chosen.intersection(self.scale_invariant_names):
                raise ConfigError("model.riemannian", True, "false, or perturbed parameters that include "
                                  f"scale-invariant ones (detected: {self.scale_invariant_names}; name them in "
                                  "model.scale_invariant_params)")
            rank_zero_info(f"Riemannian SAM: scale-invariant tensors {self.scale_invariant_names}")
        self.sam_sharpness = MeanMetric()
        self._pending: list[tuple[Mapping[str, Tensor], Any, Tensor]] = []
        self._sam_now = False
        self._sharpness_seen = False
        self._plan: tuple[list[nn.Parameter], list[bool], list[float]] | None = None

    def on_fit_start(self) -> None:
        self._plan = None  # re-resolve: the parameters or the optimizer may have been replaced

    def _resolve(self) -> tuple[list[nn.Parameter], list[bool], list[float]]:
        if self._plan is None:
            named = match_parameters(self, self.perturb_params, "model.perturb_params")
            si = set(self.scale_invariant_names)
            decay = {}
            if self.perturb_weight_decay:
                for group in self.trainer.optimizers[0].param_groups:
                    for p in group["params"]:
                        decay[id(p)] = float(group.get("weight_decay", 0.0))
            self._plan = ([p for _, p in named], [n in si for n, _ in named],
                          [decay.get(id(p), 0.0) for _, p in named])
        return self._plan

    def begin_window(self) -> None:
        self._sam_now = self._windows % self.sam_every == 0
        self._pending = []

    def micro_batch(self, batch: Mapping[str, Tensor], sync: bool) -> tuple[Tensor, Tensor]:
        if not self._sam_now:
            return super().micro_batch(batch, sync)
        rng = get_rng_state(self.device)
        loss, logits = self.loss_and_logits(batch)
        self.backward_scaled(loss, sync and self.sync_perturbation)
        self._pending.append((batch, rng, loss.detach()))
        return loss, logits

    def perturbation(self, params: Sequence[Tensor], grads: Sequence[Tensor], scale_invariant: Sequence[bool],
                     weight_decay: Sequence[float]) -> list[Tensor]:
        """``ε`` for the configured method (override to try another perturbation)."""
        if self.riemannian:
            return riemannian_epsilon(params, grads, self.rho, scale_invariant, weight_decay=weight_decay)
        return sam_epsilon(params, grads, self.rho, adaptive=self.adaptive, eta=self.eta, weight_decay=weight_decay)

    def finish_window(self) -> None:
        if not self._sam_now:
            return
        params, si, decay = self._resolve()
        rng_after = get_rng_state(self.device)
        with torch.no_grad():
            scale = self.loss_scale()
            grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]
            if scale != 1.0:  # fp16: .grad carries the loss scale, which weight decay terms must not see
                grads = [g / scale for g in grads]
            finite = bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
            # A non-finite first pass still runs the second one (at w, ε = 0): under DDP every
            # replica must reach the same backward calls. The step is then skipped on the
            # synchronised gradients.
            eps = self.perturbation(params, grads, si, decay) if finite else None
            backup = [p.detach().clone() for p in params]
            if eps is not None:
                torch._foreach_add_(params, eps)
        self.zero_grad(set_to_none=True)
        try:
            with preserved_batchnorm_stats(self):
                for j, (batch, rng, loss0) in enumerate(self._pending):
                    set_rng_state(rng, self.device)
                    loss2, _ = self.loss_and_logits(batch)
                    self.backward_scaled(loss2, sync=j == len(self._pending) - 1)
                    self.sam_sharpness.update(loss2.detach().float() - loss0.float())
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, backup)
            set_rng_state(rng_after, self.device)
            self._pending = []
        self._sharpness_seen = True

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self._sharpness_seen:  # mean over the epoch's SAM steps of L(w + ε) - L(w)
            self.log("train/sam_sharpness", self.sam_sharpness.compute())
            self.sam_sharpness.reset()
            self._sharpness_seen = False
