r"""``ManualStepClassifier``: the base of every training method that takes several passes per step.

It owns what every two-pass method (SAM and its relatives in :mod:`models.sam`, the curvature
penalties in :mod:`models.penalties`) needs from Lightning's loop and what the SAM users' common
complaints are about: gradient accumulation, skipping steps with non-finite gradients (bf16
autocast has no loss scaler to do it), stepping the LR schedulers of the base optimizer, DDP
gradient synchronisation, and the counters a resumed run needs.

It keeps the training criterion of :class:`~models.MarginClassifier` (``loss_and_logits(batch)``,
the discounted cross-entropy with the batch's gaps), so its subclasses combine with the gaps set by
the boosting orchestrator: name the class in the config's ``model.class_path``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.strategies import ParallelStrategy
from torch import Tensor, nn

from marginboost.errors import ConfigError, check_bool, check_int

from .classifier import MarginClassifier
from .state import restore_batchnorm_stats, save_batchnorm_stats

_CKPT_KEY = "manual_step_state"


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
        self.automatic_optimization = False
        self.accumulate_grad_batches = check_int("model.accumulate_grad_batches", accumulate_grad_batches, low=1)
        self.skip_nonfinite = check_bool("model.skip_nonfinite", skip_nonfinite)
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
                self._bn_before_window = save_batchnorm_stats(self)
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
                restore_batchnorm_stats(self, self._bn_before_window)
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
            raise ConfigError("model.lr_scheduler", "ReduceLROnPlateau", f"a schedule that needs no monitored metric "
                              f"(e.g. CosineAnnealingLR): {type(self).__name__} steps schedulers itself",
                              describe=True)
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
