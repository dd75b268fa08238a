r"""Sharpness-aware training as LightningModules with manual optimization.

:class:`ManualStepClassifier` owns what every two-pass method needs from Lightning's loop and what
the SAM users' common complaints are about: gradient accumulation, skipping steps with non-finite
gradients (bf16 autocast has no loss scaler to do it), stepping the LR schedulers of the base
optimizer, DDP gradient synchronisation, and the counters a resumed run needs.
:class:`SAMClassifier` adds SAM, ASAM and Riemannian SAM on top (math in :mod:`models.sam`).

Both keep the training criterion of :class:`~models.MarginClassifier`
(``loss_and_logits(batch)``, the discounted cross-entropy with the batch's gaps), so they combine
with the gaps set by the boosting orchestrator: name the class in the config's ``model.class_path``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric

from .classifier import MarginClassifier
from .sam import (
    batchnorm_buffers,
    find_scale_invariant,
    get_rng_state,
    preserved_batchnorm_stats,
    riemannian_epsilon,
    sam_epsilon,
    set_rng_state,
)

_CKPT_KEY = "manual_step_state"


def match_parameters(module: nn.Module, patterns: str | Sequence[str] | None, field: str,
                     trainable_only: bool = True) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs whose name matches any regex in ``patterns`` (``re.search``).

    ``None`` selects every (trainable) parameter. A pattern that does not compile or matches
    nothing raises a ``ValueError`` naming the config ``field``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> [n for n, _ in match_parameters(net, r"^0\\.", "model.perturb_params")]
        ['0.weight', '0.bias']
    """
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad or not trainable_only]
    if patterns is None:
        return named
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise ValueError(f"{field}: give at least one name pattern, or null for all trainable parameters")
    selected: dict[str, nn.Parameter] = {}
    for pat in patterns:
        try:
            rx = re.compile(pat)
        except re.error as err:
            raise ValueError(f"{field}: {pat!r} is not a valid regular expression ({err})") from err
        hits = [(n, p) for n, p in named if rx.search(n)]
        if not hits:
            sample = [n for n, _ in named[:8]]
            raise ValueError(f"{field}: pattern {pat!r} matches no trainable parameter; "
                             f"names look like {sample}{' ...' if len(named) > 8 else ''}")
        selected.update(hits)
    return [(n, p) for n, p in named if n in selected]  # model order, no duplicates


def _check_int(field: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{field} must be an integer >= {low}, got {value!r}")


def _check_nonneg(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ValueError(f"{field} must be a finite number >= 0, got {value!r}")


class ManualStepClassifier(MarginClassifier):
    """``MarginClassifier`` trained with manual optimization; the base of SAM and the penalties.

    One optimizer step ("window") covers ``accumulate_grad_batches`` micro-batches; a shorter
    window closes the epoch (as Lightning does). For each micro-batch :meth:`micro_batch` runs the
    forward and backward passes with the loss divided by ``accumulate_grad_batches`` (Lightning's
    convention); at the end of a window :meth:`finish_window` may add more passes, then the base
    optimizer steps, and the LR schedulers step (``interval: step`` by optimizer steps,
    ``interval: epoch`` after the epoch's last step: in manual optimization Lightning leaves this to
    the module).

    Non-finite gradients (checked after the window, on the synchronised gradients under DDP)
    skip the step when no loss scaler is active (bf16 or fp32): the gradients are dropped, the
    BatchNorm running statistics are rolled back to their values before the window, the schedulers
    do not step and ``train/skipped_steps`` counts it. With fp16's GradScaler the scaler decides,
    as in automatic optimization.

    Under DDP every backward except the window's last is run inside ``no_sync``, so gradients are
    all-reduced once per window (Lightning's DDP strategy syncs in ``manual_backward``).

    Args:
        accumulate_grad_batches: micro-batches per optimizer step (use this, not the Trainer
            flag, which Lightning rejects under manual optimization).
        skip_nonfinite: skip steps whose gradients contain NaN/inf.
        **kwargs: the arguments of :class:`~models.MarginClassifier`.
    """

    def __init__(self, *, accumulate_grad_batches: int = 1, skip_nonfinite: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_int("model.accumulate_grad_batches", accumulate_grad_batches, 1)
        self.automatic_optimization = False
        self.accumulate_grad_batches = accumulate_grad_batches
        self.skip_nonfinite = skip_nonfinite
        self._micro = 0  # micro-batches done in the current window
        self._windows = 0  # windows finished (optimizer steps attempted)
        self._skipped = 0  # of which skipped for non-finite gradients
        self._bn_before_window: list[Tensor] | None = None

    # -- helpers for subclasses ------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def backward_scaled(self, loss: Tensor, sync: bool) -> None:
        """``manual_backward(loss / accumulate_grad_batches)``; inside DDP ``no_sync`` unless ``sync``."""
        loss = loss / self.accumulate_grad_batches if self.accumulate_grad_batches > 1 else loss
        strategy = self.trainer.strategy
        if not sync and isinstance(strategy, ParallelStrategy):
            with strategy.block_backward_sync():
                self.manual_backward(loss)
        else:
            self.manual_backward(loss)

    def loss_scale(self) -> float:
        """The fp16 GradScaler's current scale (gradients in ``.grad`` carry it), else 1."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer else None
        return float(scaler.get_scale()) if scaler is not None else 1.0

    def epoch_ending(self) -> bool:
        """Whether the current training batch is the epoch's last (``limit_train_batches`` included)."""
        trainer = self._trainer
        if trainer is None:
            return False
        progress = trainer.fit_loop.epoch_loop.batch_progress
        return bool(progress.is_last_batch) or progress.current.ready == trainer.num_training_batches

    # -- hooks for subclasses --------------------------------------------------------------
    def begin_window(self) -> None:
        """Called before the first micro-batch of every optimizer step."""

    def micro_batch(self, batch: Mapping[str, Tensor], sync: bool) -> tuple[Tensor, Tensor]:
        """Forward and backward of one micro-batch; returns the criterion and logits at the current weights."""
        loss, logits = self.loss_and_logits(batch)
        self.backward_scaled(loss, sync)
        return loss, logits

    def finish_window(self) -> None:
        """Called after the window's last micro-batch, before the optimizer step."""

    # -- the loop --------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        opt = self.optimizers()
        if self._micro == 0:
            opt.zero_grad(set_to_none=True)
            if self.skip_nonfinite:
                self._bn_before_window = [b.clone() for b in batchnorm_buffers(self)]
            self.begin_window()
        last = self._micro + 1 >= self.accumulate_grad_batches or self.epoch_ending()
        loss, logits = self.micro_batch(batch, sync=last)
        self.log_train_metrics(loss, logits, batch["y"])
        self._micro += 1
        if last:
            self.finish_window()
            self._optimizer_step(opt)
            self._micro = 0
            self._windows += 1
            if self.epoch_ending():
                self._step_schedulers("epoch")
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        # Logged once per epoch: a per-step self.log costs as much as a small model's forward on CPU.
        self.log("train/skipped_steps", float(self._skipped), sync_dist=False)

    def _grads_finite(self) -> bool:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return True
        return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())

    def _optimizer_step(self, opt) -> None:
        no_scaler = getattr(self.trainer.precision_plugin, "scaler", None) is None
        if no_scaler and self.skip_nonfinite and not self._grads_finite():
            self._skipped += 1
            if self._bn_before_window is not None:
                with torch.no_grad():
                    for b, saved in zip(batchnorm_buffers(self), self._bn_before_window):
                        b.copy_(saved)
            opt.zero_grad(set_to_none=True)
            return
        opt.step()
        opt.zero_grad(set_to_none=True)
        self._step_schedulers("step")

    def _step_schedulers(self, interval: str) -> None:
        trainer = self.trainer
        for config in trainer.lr_scheduler_configs:
            if config.interval != interval or not config.frequency:
                continue
            index = trainer.global_step if interval == "step" else trainer.current_epoch + 1
            if index % config.frequency == 0:
                config.scheduler.step()

    def configure_optimizers(self):
        out = super().configure_optimizers()
        scheduler = out["lr_scheduler"]["scheduler"] if isinstance(out, dict) else None
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise ValueError(f"model.lr_scheduler: ReduceLROnPlateau is not supported by {type(self).__name__} "
                             "(it needs a monitored metric); use a schedule such as CosineAnnealingLR")
        return out

    # -- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._micro:
            warnings.warn(f"{type(self).__name__}: checkpoint saved in the middle of a gradient-accumulation "
                          f"window ({self._micro}/{self.accumulate_grad_batches} micro-batches); their gradients "
                          "are not saved, so a resumed run starts a fresh window", stacklevel=2)
        checkpoint[_CKPT_KEY] = {"windows": self._windows, "skipped": self._skipped}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(_CKPT_KEY, {})
        self._windows = int(state.get("windows", 0))
        self._skipped = int(state.get("skipped", 0))
        self._micro = 0


class SAMClassifier(ManualStepClassifier):
    r"""Sharpness-aware minimisation (SAM, ASAM, Riemannian SAM) of the discounted cross-entropy.

    Each SAM step: (1) forward/backward at ``w`` gives ``g``; (2) ``ε`` from ``g`` (see
    :mod:`models.sam`): SAM ``ρ g/‖g‖``, ASAM ``ρ T_w² g/‖T_w g‖`` with ``T_w = |w| + η``,
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
            ``null`` detects conv/linear weights that feed a BatchNorm directly.
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
        _check_nonneg("model.rho", rho)
        _check_nonneg("model.eta", eta)
        _check_int("model.sam_every", sam_every, 1)
        if adaptive and riemannian:
            raise ValueError("model.adaptive and model.riemannian cannot both be true: pick ASAM or Riemannian SAM")
        self.rho, self.adaptive, self.eta, self.riemannian = float(rho), adaptive, float(eta), riemannian
        self.sam_every = sam_every
        self.perturb_params, self.scale_invariant_params = perturb_params, scale_invariant_params
        self.perturb_weight_decay, self.sync_perturbation = perturb_weight_decay, sync_perturbation
        perturbed = match_parameters(self, perturb_params, "model.perturb_params")
        self.scale_invariant_names: list[str] = []
        if riemannian:
            if scale_invariant_params is None:
                shape = tuple(self.hparams.input_shape)
                self.scale_invariant_names = find_scale_invariant(self, torch.zeros(2, *shape))
            else:
                self.scale_invariant_names = [n for n, _ in match_parameters(
                    self, scale_invariant_params, "model.scale_invariant_params")]
            chosen = {n for n, _ in perturbed}
            if not chosen.intersection(self.scale_invariant_names):
                raise ValueError("model.riemannian=true, but none of the perturbed parameters is scale-invariant "
                                 f"(detected: {self.scale_invariant_names}); name them in "
                                 "model.scale_invariant_params or use SAM")
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
