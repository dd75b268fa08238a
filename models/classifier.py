"""``MarginClassifier``: backbone, ``W ∘ BN`` head and the discounted cross-entropy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from marginboost.distributed import all_reduce_sum
from marginboost.errors import ConfigError, check_bool, check_choice, check_int, check_number

from .backbones import build_backbone
from .heads import build_head
from .losses import discounted_cross_entropy, margins
from .margin_bounds import seed_mean_margin_value

SCHEDULER_INTERVALS = ("epoch", "step")


def default_optimizer(params) -> torch.optim.Optimizer:
    """SGD with momentum 0.9, lr 0.05, weight decay 5e-4 (the λ‖θ‖² term)."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


# Training steps whose logits are kept before their accuracy and margins are summed together.
TRAIN_METRIC_BLOCK = 32


def _sum_block(sums: dict[str, Any]) -> None:
    """Add the kept batches' correct predictions and margin sum to ``sums`` and empty the block."""
    block, sums["block"] = sums["block"], []
    if not block:
        return
    logits, y = torch.cat([b[0] for b in block]), torch.cat([b[1] for b in block])
    dtype = sums["values"].dtype
    with torch.no_grad():
        sums["values"] += torch.stack([(logits.argmax(1) == y).sum().to(dtype), margins(logits, y).to(dtype).sum()])


class MarginClassifier(L.LightningModule):
    """``f(x) = W ∘ BN ∘ backbone(x)`` trained with the discounted cross-entropy.

    Batches are mappings with keys ``x``, ``y``, ``idx`` and ``gap`` (a missing ``gap`` means 0).

    Args:
        num_classes: K (linked from the DataModule by the CLI).
        input_shape: shape of one input, e.g. ``[3, 32, 32]`` (linked from the DataModule).
        backbone: a registered name (``resnet18``, ``resnet20``, ``small_cnn``, ``mlp``) or the
            import path of an ``nn.Module`` class.
        backbone_kwargs: keyword arguments for the backbone builder (e.g. ``width``).
        head: ``margin`` (``W ∘ BN``, the discounted loss; default), ``linear`` (plain CE),
            ``l2_softmax``, ``cosface`` or ``arcface`` (see :mod:`models.heads`).
        head_kwargs: the head's own arguments (``l2_softmax``: ``alpha``, ``learn_alpha``,
            ``bias``; ``cosface``/``arcface``: ``s``, ``m``; ``linear``: ``bias``).
        head_init: ``orthogonal``, ``kaiming`` or ``simplex_etf``.
        head_scale: multiplies the head matrix (the logit scale).
        freeze_head: keep ``W`` fixed; ``None`` (default) takes the head's default: frozen for
            ``margin``, trainable for the others.
        head_seed: seed of the head initialisation; ``None`` draws from the global RNG.
        optimizer: a callable ``params -> Optimizer`` (``class_path``/``init_args`` in YAML).
        lr_scheduler: optional callable ``optimizer -> LRScheduler``.
        scheduler_interval: ``epoch`` or ``step``.
        channels_last: store the backbone's 4-D weights and feed 4-D inputs in NHWC layout (faster
            convolutions with tensor cores under mixed precision; neutral on CPU).
        compile_backbone: ``torch.compile`` the backbone, lazily at the first training-mode
            forward. Only training-mode forwards use it; eval-mode forwards (validation, margins,
            Hessian metrics) run eagerly, so measurements never depend on compilation.
    """

    def __init__(
        self,
        num_classes: int = 10,
        input_shape: Sequence[int] = (3, 32, 32),
        backbone: str = "resnet18",
        backbone_kwargs: dict[str, Any] | None = None,
        head: str = "margin",
        head_kwargs: dict[str, Any] | None = None,
        head_init: str = "orthogonal",
        head_scale: float = 1.0,
        freeze_head: bool | None = None,
        head_seed: int | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        channels_last: bool = False,
        compile_backbone: bool = False,
    ) -> None:
        super().__init__()
        check_int("model.num_classes", num_classes, low=2)
        check_choice("model.scheduler_interval", scheduler_interval, SCHEDULER_INTERVALS)
        if freeze_head is not None:  # None: the head's default
            check_bool("model.freeze_head", freeze_head)
        check_number("model.head_scale", head_scale, low=0.0, low_open=True)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.backbone = build_backbone(backbone, input_shape, **(backbone_kwargs or {}))
        self.head = build_head(head, self.backbone.out_features, num_classes, init=head_init,
                               scale=head_scale, frozen=freeze_head, seed=head_seed, **(head_kwargs or {}))
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.scheduler_interval = scheduler_interval
        for name, value in (("channels_last", channels_last), ("compile_backbone", compile_backbone)):
            check_bool(f"model.{name}", value)
        if channels_last and len(input_shape) != 3:
            raise ConfigError("model.channels_last", True, f"false for inputs of shape {list(input_shape)} (it needs "
                              "images [C, H, W])")
        self.channels_last, self.compile_backbone = channels_last, compile_backbone
        if channels_last:
            # Converted here rather than at fit start so the optimizer, checkpoints and copies made
            # by callbacks all see one layout from the beginning.
            self.backbone.to(memory_format=torch.channels_last)
        # Kept out of the module tree (no duplicate parameters in state_dict); built on first use.
        self.__dict__["_compiled_backbone"] = None
        # Evaluation metrics as metric objects, synchronised once per epoch. The training ones are
        # running sums on the device instead (see log_train_metrics).
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:  # a plain flag, so torch.fx can still trace forward
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self._backbone_for_forward()(x))

    def _backbone_for_forward(self) -> torch.nn.Module:
        if not (self.compile_backbone and self.training):
            return self.backbone
        if self.__dict__["_compiled_backbone"] is None:
            self.__dict__["_compiled_backbone"] = torch.compile(self.backbone)
        return self.__dict__["_compiled_backbone"]

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets this name around every hook call, 44 times a training step; nn.Module's
        # __setattr__ first looks through parameters, buffers and submodules (1.3 µs against
        # 0.2 µs), which shows once the host sets the pace of a small model's steps.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __getstate__(self) -> dict[str, Any]:
        # Compiled wrappers do not pickle or deep-copy; a copy recompiles on its first use.
        state = dict(super().__getstate__())
        state["_compiled_backbone"] = None
        return state

    def seed_mean_margin_value(self) -> Tensor:
        """Seed 004's ``2/K · ‖W‖₁`` (entrywise L1 norm of the head), logged next to the mean margin.

        Not an upper bound on the mean margin for ``K ≥ 3`` (see :mod:`models.margin_bounds`);
        ``callbacks.MarginTheoryCheck`` logs the actual maximum for this head.
        """
        return seed_mean_margin_value(self.head.weight)

    def loss_and_logits(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The training criterion (the head's loss with the batch's gaps) and the logits."""
        logits = self(batch["x"])
        return self.head.loss(logits, batch["y"], batch.get("gap", 0.0)), logits

    def on_train_start(self) -> None:
        # A head that refuses gaps (``linear``) says so before the first step, not mid-training.
        # (on_train_start, not on_fit_start: the manual-step subclasses override the latter.)
        gaps = getattr(getattr(self.trainer, "datamodule", None), "gaps", None)
        if torch.is_tensor(gaps):
            self.head.check_gaps(gaps)

    def log_train_metrics(self, loss: Tensor, logits: Tensor, y: Tensor) -> None:
        """Accumulate the epoch's ``train/loss``, ``train/acc`` and ``train/margin_mean``.

        Per step one in-place update on the device (the loss times the batch size, added in the
        sums' precision) and the detached logits and labels kept; every
        :data:`TRAIN_METRIC_BLOCK` steps, and at the epoch's end, the kept batches' correct
        predictions and margins are summed in one batched pass. The count stays on the host. No
        host sync and no ``self.log`` call per step: per step those, and a dozen small kernels,
        cost more host time than the arithmetic, which shows as soon as the host, not the
        device, sets the pace. The sums are reduced over ranks and logged once, at the epoch's
        last batch (or at its end when the epoch is cut short), so callbacks read them at the
        epoch's end.
        """
        if self._trainer is None:  # a step outside a Trainer (a test, a custom loop): nothing to log to
            return
        sums = self._train_sums(logits.device)
        with torch.no_grad():
            sums["loss"].add_(loss.detach(), alpha=y.shape[0])  # a bf16 loss is widened before scaling
        sums["block"].append((logits.detach(), y))
        sums["count"] += y.shape[0]
        if len(sums["block"]) >= TRAIN_METRIC_BLOCK:
            _sum_block(sums)
        if self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._log_train_epoch()

    def _train_sums(self, device: torch.device) -> dict[str, Any]:
        # New at every epoch, fit and resumed fit (the fit loop's epoch counter). Not a buffer:
        # DDP would overwrite every rank's sums with rank 0's at each forward.
        epoch = (id(self.trainer.fit_loop), self.trainer.fit_loop.epoch_progress.total.started)
        sums = self.__dict__.get("_train_sums_state")
        if sums is None or sums["epoch"] != epoch:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            sums = {"epoch": epoch, "loss": torch.zeros((), device=device, dtype=dtype),
                    "values": torch.zeros(2, device=device, dtype=dtype), "block": [], "count": 0, "logged": False}
            self.__dict__["_train_sums_state"] = sums
        return sums

    def _log_train_epoch(self) -> None:
        """Reduce the epoch's sums over ranks (a collective: every rank calls it) and log them."""
        sums = self.__dict__.get("_train_sums_state")
        if sums is None or sums["logged"]:
            return
        sums["logged"] = True
        _sum_block(sums)
        values = sums["values"]
        totals = all_reduce_sum(torch.cat([sums["loss"].view(1), values, values.new_tensor([sums["count"]])])).tolist()
        if totals[3] == 0:
            return
        loss, correct, margin_sum, n = totals
        kwargs = {"on_step": False, "on_epoch": True, "sync_dist": False, "batch_size": 1}
        self.log("train/loss", loss / n, prog_bar=True, **kwargs)
        self.log("train/acc", correct / n, prog_bar=True, **kwargs)
        self.log("train/margin_mean", margin_sum / n, **kwargs)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss, logits = self.loss_and_logits(batch)
        self.log_train_metrics(loss, logits, batch["y"])
        return loss

    def on_train_epoch_end(self) -> None:
        self._log_train_epoch()  # an epoch cut short (max_steps) had no last batch
        self.log("train/seed_mean_margin_value", self.seed_mean_margin_value(), sync_dist=False)

    def _eval_step(self, batch: Mapping[str, Tensor], loss_metric: MeanMetric,
                   acc_metric: MulticlassAccuracy, prefix: str) -> None:
        x, y = batch["x"], batch["y"]
        logits = self(x)
        n = y.shape[0]
        loss_metric.update(discounted_cross_entropy(logits, y), weight=n)
        acc_metric.update(logits, y)
        self.log(f"{prefix}/loss", loss_metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        self.log(f"{prefix}/acc", acc_metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_loss, self.val_acc, "val")

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_loss, self.test_acc, "test")

    def predict_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        out = {"logits": self(batch["x"]), "y": batch["y"]}
        if "idx" in batch:
            out["idx"] = batch["idx"]
        return out

    def _schedule_horizon(self) -> int | None:
        """The run's length in scheduler steps: ``max_epochs``, or optimizer steps for interval ``step``."""
        trainer = self._trainer
        if trainer is None:
            return None
        if self.scheduler_interval == "step":
            return int(trainer.estimated_stepping_batches)
        return trainer.max_epochs

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if hasattr(scheduler, "set_horizon"):  # a schedule over the run's length (CosineAnnealingRunLR)
            scheduler.set_horizon(self._schedule_horizon())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}
