r"""Curvature penalties added to the training criterion: gradient norm and Hessian trace.

For the criterion :math:`L(\theta)` (the discounted cross-entropy of the batch) the trained
objective is

.. math::
    J(\theta) = L(\theta) + \lambda_g\, \lVert \nabla_S L(\theta) \rVert^{p}
                + \lambda_t\, \frac{1}{k}\sum_{j=1}^{k} v_j^\top \nabla_S^2 L(\theta)\, v_j,
    \qquad p \in \{1, 2\},\; v_j \sim \mathrm{Rademacher}

where :math:`S` is the set of penalised parameters (all trainable ones by default) and the second
term is Hutchinson's unbiased estimate of :math:`\mathrm{tr}\,\nabla_S^2 L` with fresh probes
every step.

The gradient-norm term has two forms:

* ``exact``: double backward, :math:`\nabla_\theta \lVert g \rVert = H g / \lVert g \rVert`
  through ``create_graph=True``;
* ``finite_difference`` (Zhao et al., 2022): :math:`H \hat g \approx (\nabla L(\theta + r\hat g)
  - \nabla L(\theta)) / r` with :math:`\hat g = g/\lVert g\rVert`, so the gradient of :math:`J` is
  :math:`(1-\alpha)\,\nabla L(\theta) + \alpha\,\nabla L(\theta + r \hat g)` with
  :math:`\alpha = \lambda_g / r` (times :math:`2\lVert g\rVert` for :math:`p=2`): two first-order
  passes, like SAM, and the same care for BatchNorm statistics and dropout masks.

The trace term is differentiated exactly (third-order autograd through ``create_graph``); its
forward pass runs every BatchNorm as elementary ops (:func:`composite_batchnorm`) because PyTorch's
fused batch norm has wrong third derivatives in training mode.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from marginboost.errors import ConfigError, check_bool, check_choice, check_int, check_number

from .curvature import hutchinson_forms, rademacher_like
from .manual_step import ManualStepClassifier
from .parameters import global_norm, match_parameters
from .state import get_rng_state, preserved_batchnorm_stats, set_rng_state

GRAD_NORM_FORMS = ("finite_difference", "exact")


def _composite_batchnorm_forward(self: nn.modules.batchnorm._BatchNorm, input: Tensor) -> Tensor:
    """``BatchNorm`` written with elementary ops, so autograd differentiates it to any order."""
    self._check_input_dim(input)
    shape = [1, -1] + [1] * (input.ndim - 2)
    dims = [0, *range(2, input.ndim)]
    x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
    if self.training or not self.track_running_stats:
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                n = x.numel() / x.shape[1]
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_((var.detach() * (n / max(n - 1, 1))).to(self.running_var.dtype),
                                                  alpha=m)
    else:
        mean, var = self.running_mean.to(x.dtype), self.running_var.to(x.dtype)
    out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
    if self.affine:
        out = out * self.weight.view(shape) + self.bias.view(shape)
    return out.to(input.dtype)


@contextmanager
def composite_batchnorm(model: nn.Module) -> Iterator[None]:
    """Within the block every (non-synchronised) BatchNorm of ``model`` runs as elementary ops.

    PyTorch's fused training-mode batch norm gives correct first and second derivatives but silently
    wrong third ones (its double backward treats the batch statistics as constants; pytorch/pytorch
    #186256). The gradient of the Hutchinson penalty ``vᵀ H v`` is a third derivative, so the
    trace penalty's forward pass runs under this context. Output and running-statistics updates
    match ``nn.BatchNorm*`` up to rounding.
    """
    patched = [m for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)]
    for m in patched:
        m.forward = types.MethodType(_composite_batchnorm_forward, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


class CurvaturePenaltyClassifier(ManualStepClassifier):
    r"""``MarginClassifier`` trained on ``L + λ_g ‖∇L‖^p + λ_t tr(∇²L)`` (see the module docstring).

    ``L`` is the discounted cross-entropy with the batch's gaps (``loss_and_logits``), so the
    penalties combine with boosting. Penalties are per micro-batch: with gradient accumulation the
    window's objective is the mean over its micro-batches of ``L_b + penalties_b``. The logged
    ``train/loss`` is the criterion alone; ``train/grad_norm`` and ``train/hessian_trace`` are the
    penalised quantities (before the weights).

    Costs per step relative to plain training: finite-difference gradient norm about 2× (two
    first-order passes); exact gradient norm one double backward; trace ``k`` Hessian-vector
    products with third-order backward — the most expensive (see ``bench/bench_sam.py``).

    Args:
        grad_norm_weight: ``λ_g >= 0``.
        grad_norm_form: ``finite_difference`` or ``exact``.
        grad_norm_radius: ``r > 0`` of the finite-difference form.
        grad_norm_squared: penalise ``‖∇L‖²`` (``p = 2``) instead of ``‖∇L‖``.
        trace_weight: ``λ_t >= 0``.
        trace_probes: Rademacher probes ``k >= 1`` per step.
        penalty_every: add the penalties every ``k`` optimizer steps, plain steps otherwise.
        penalty_params: regexes of the parameters ``S`` whose gradient/Hessian is penalised
            (``null``: all trainable); the penalty's gradient reaches every trainable parameter.
        **kwargs: :class:`~models.manual_step.ManualStepClassifier` and
            :class:`~models.MarginClassifier` arguments.

    Example (YAML)::

        model:
          class_path: models.CurvaturePenaltyClassifier
          init_args: {trace_weight: 1.0e-4, trace_probes: 1}
    """

    def __init__(self, *, grad_norm_weight: float = 0.0, grad_norm_form: str = "finite_difference",
                 grad_norm_radius: float = 0.01, grad_norm_squared: bool = False, trace_weight: float = 0.0,
                 trace_probes: int = 1, penalty_every: int = 1, penalty_params: str | list[str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_number("model.grad_norm_weight", grad_norm_weight, low=0.0)
        check_number("model.trace_weight", trace_weight, low=0.0)
        check_choice("model.grad_norm_form", grad_norm_form, GRAD_NORM_FORMS)
        check_number("model.grad_norm_radius", grad_norm_radius, low=0.0, low_open=True)
        check_bool("model.grad_norm_squared", grad_norm_squared)
        check_int("model.trace_probes", trace_probes, low=1)
        check_int("model.penalty_every", penalty_every, low=1)
        match_parameters(self, penalty_params, "model.penalty_params")  # fail now, not at fit time
        if getattr(self, "compile_backbone", False) and (trace_weight > 0 or (
                grad_norm_weight > 0 and grad_norm_form == "exact")):
            raise ConfigError("model.compile_backbone", True, "false with model.trace_weight > 0 or "
                              "model.grad_norm_form='exact' (torch.compile does not support double backward)")
        self.grad_norm_weight, self.grad_norm_form = float(grad_norm_weight), grad_norm_form
        self.grad_norm_radius, self.grad_norm_squared = float(grad_norm_radius), grad_norm_squared
        self.trace_weight, self.trace_probes = float(trace_weight), trace_probes
        self.penalty_every, self.penalty_params = penalty_every, penalty_params
        self.grad_norm_metric, self.trace_metric = MeanMetric(), MeanMetric()
        self._penalise_now = False
        self._split: tuple[list[nn.Parameter], list[int]] | None = None

    def draw_probes(self, params: Sequence[Tensor]) -> list[list[Tensor]]:
        """``trace_probes`` fresh Rademacher probes, one list per probe (override for other probes)."""
        return [rademacher_like(params) for _ in range(self.trace_probes)]

    def begin_window(self) -> None:
        self._penalise_now = self._windows % self.penalty_every == 0 and (
            self.grad_norm_weight > 0 or self.trace_weight > 0)

    def on_fit_start(self) -> None:
        self._split = None  # re-resolve: the parameters may have been replaced since construction

    def _penalty_split(self) -> tuple[list[nn.Parameter], list[int]]:
        if self._split is None:
            params = self.trainable_parameters()
            chosen = {id(p) for _, p in match_parameters(self, self.penalty_params, "model.penalty_params")}
            self._split = (params, [i for i, p in enumerate(params) if id(p) in chosen])
        return self._split

    def micro_batch(self, batch: Mapping[str, Tensor], sync: bool) -> tuple[Tensor, Tensor]:
        if not self._penalise_now:
            return super().micro_batch(batch, sync)
        params, sel = self._penalty_split()
        fd = self.grad_norm_weight > 0 and self.grad_norm_form == "finite_difference"
        exact_gn = self.grad_norm_weight > 0 and not fd
        rng = get_rng_state(self.device) if fd else None
        # third derivatives (trace penalty) need the composite BatchNorm, see composite_batchnorm
        with composite_batchnorm(self) if self.trace_weight > 0 else nullcontext():
            loss, logits = self.loss_and_logits(batch)
        terms = []
        if exact_gn or self.trace_weight > 0:
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
            sub_g, sub_p = [grads[i] for i in sel], [params[i] for i in sel]
            if exact_gn:
                norm = global_norm(sub_g, self.grad_norm_squared)
                terms.append(self.grad_norm_weight * norm)
                self.grad_norm_metric.update((norm.sqrt() if self.grad_norm_squared else norm).detach().float())
            if self.trace_weight > 0:
                trace = hutchinson_forms(sub_g, sub_p, self.draw_probes(sub_p)).mean()
                terms.append(self.trace_weight * trace)
                self.trace_metric.update(trace.detach().float())
            g0 = [g.detach() for g in grads]
        elif fd:
            g0 = [g if g is not None else torch.zeros_like(p) for g, p in
                  zip(torch.autograd.grad(loss, params, allow_unused=True), params)]
        if not fd:
            self.backward_scaled(loss + sum(terms), sync)
        else:
            self._finite_difference_pass(batch, loss, terms, params, sel, g0, rng, sync)
        self._log_penalties(batch["y"].shape[0])
        return loss, logits

    def _finite_difference_pass(self, batch, loss, terms, params, sel, g0, rng, sync) -> None:
        """Add ``(1-α) ∇L(θ)`` and ``α ∇L(θ + r ĝ)`` (plus any exact terms) to ``.grad``."""
        sub_g0 = [g0[i] for i in sel]
        norm = global_norm(sub_g0).detach()
        self.grad_norm_metric.update(norm.float())
        r = self.grad_norm_radius
        alpha = self.grad_norm_weight / r * (2.0 * float(norm) if self.grad_norm_squared else 1.0)
        if terms:
            self.backward_scaled(sum(terms), sync=False)
        # The first-pass gradient goes into .grad by hand (it was taken with autograd.grad so that the
        # loss's graph is walked once); ``backward_scaled`` would divide by k and apply the loss scale.
        factor = (1.0 - alpha) * self.loss_scale() / self.accumulate_grad_batches
        with torch.no_grad():
            for p, g in zip(params, g0):
                if p.grad is None:
                    p.grad = g * factor
                else:
                    p.grad.add_(g, alpha=factor)
        rng_after = get_rng_state(self.device)
        sub_p = [params[i] for i in sel]
        finite = bool(torch.isfinite(norm)) and float(norm) > 0
        with torch.no_grad():
            backup = [p.detach().clone() for p in sub_p]
            if finite:
                torch._foreach_add_(sub_p, [g * (r / float(norm)) for g in sub_g0])
        try:
            with preserved_batchnorm_stats(self):
                set_rng_state(rng, self.device)
                loss2, _ = self.loss_and_logits(batch)
                self.backward_scaled(alpha * loss2, sync)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(sub_p, backup)
            set_rng_state(rng_after, self.device)

    def _log_penalties(self, n: int) -> None:
        if self.grad_norm_weight > 0:
            self.log("train/grad_norm", self.grad_norm_metric, on_step=False, on_epoch=True, batch_size=n)
        if self.trace_weight > 0:
            self.log("train/hessian_trace", self.trace_metric, on_step=False, on_epoch=True, batch_size=n)
