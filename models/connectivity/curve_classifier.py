"""``CurveClassifier``: train a curve between two checkpoints with ``lightning fit``.

The curve ``ψ(t)`` (Bezier or polygonal chain with fixed endpoints ``θ_A``, ``θ_B``) minimises
``∫₀¹ L(ψ(t)) dt`` (Garipov et al. 2018, arXiv 1802.10026) by stochastic gradient over both the data
and t: every training batch draws one ``t ~ U(0, 1)`` and takes a step on

    ``L(ψ(t); batch) + ½·λ·‖ψ(t)‖²``     (weight decay on the point of the curve, not on the bends)

The network is the unchanged base model (``MarginClassifier`` with checkpoint A's architecture and
buffers); a point is evaluated with ``torch.func.functional_call(self, ψ(t), (x,))``, so the layers
exist once and only the bends are trainable parameters. Under DDP the bends are ordinary
parameters, all-reduced like any weight.

Validation evaluates the points ``val_t`` (BN statistics recomputed at each point for nets with BN)
and logs ``val/loss_t0.50``, ``val/acc_t0.50``, ... and the worst of them as ``val/loss`` (max) and
``val/acc`` (min). At the end of the fit, rank 0 evaluates the curve and the straight line between
the same endpoints on a grid of ``grid_points`` values of t on the training (un-augmented) and
validation sets, logs the curves to TensorBoard (``path/<path>_<split>_<loss|acc>`` with step = grid
index, and a figure) and writes ``path_eval.json`` and ``path_eval.csv`` to the log directory.
"""

from __future__ import annotations

import copy
import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torch.func import functional_call
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from marginboost.errors import ConfigError, check_choice, check_int, check_number

from ..classifier import MarginClassifier
from ..losses import discounted_cross_entropy
from .alignment import align as align_networks
from .evaluation import evaluate_path, has_batchnorm, path_metrics, reset_bn_statistics
from .paths import PATH_KINDS, make_path, t_grid

ARCHITECTURE_KEYS = ("backbone", "backbone_kwargs", "head_init", "head_scale", "freeze_head", "head_seed")
CURVE_ALIGNMENTS = ("none", "weights", "ot")


def default_curve_optimizer(params) -> torch.optim.Optimizer:
    """SGD with momentum 0.9, lr 0.05 and no weight decay (the decay is on ψ(t) in the loss)."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _load_checkpoint(field: str, path: str) -> dict[str, Any]:
    if not isinstance(path, str) or not Path(path).is_file():
        raise ConfigError(field, path, "the path of a MarginClassifier checkpoint (.ckpt)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ConfigError(field, path, "a Lightning checkpoint with state_dict and hyper_parameters")
    return ckpt


class CurveClassifier(MarginClassifier):
    """A trainable curve between two ``MarginClassifier`` checkpoints of one architecture.

    Args:
        checkpoint_a, checkpoint_b: paths of the endpoint checkpoints (``lightning fit`` or a
            boosting run's ``round_t/member.ckpt``); the architecture is read from A.
        curve: ``bezier`` or ``chain`` (trained); ``linear`` and ``arc`` have nothing to train and
            are only evaluated (``max_epochs: 0``).
        num_bends: trainable control points (1: the quadratic Bezier curve / a 2-segment chain).
        align: ``none``, ``weights`` (weight matching) or ``ot`` (optimal transport, needs POT):
            B's hidden units are aligned to A's before the curve is built (same function as B).
        curve_weight_decay: λ of the ``½·λ·‖ψ(t)‖²`` term.
        val_t: the points evaluated at every validation.
        grid_points: points of the fit-end grid (21; Garipov et al. use 61; 0 turns it off).
        reset_bn: recompute BN statistics at every evaluated t; ``None``: on if the net has BN.
        bn_batches: batches of the un-augmented training loader per BN reset (``None``: all).
        optimizer, lr_scheduler, scheduler_interval: as in ``MarginClassifier``; the optimizer
            sees only the bends.
        num_classes, input_shape: linked from the data module; checked against the checkpoints.
    """

    def __init__(
        self,
        checkpoint_a: str,
        checkpoint_b: str,
        curve: str = "bezier",
        num_bends: int = 1,
        align: str = "none",
        curve_weight_decay: float = 5e-4,
        val_t: Sequence[float] = (0.25, 0.5, 0.75),
        grid_points: int = 21,
        reset_bn: bool | None = None,
        bn_batches: int | None = 10,
        optimizer: OptimizerCallable = default_curve_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        num_classes: int | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        check_choice("model.curve", curve, PATH_KINDS)
        check_choice("model.align", align, CURVE_ALIGNMENTS)
        check_int("model.num_bends", num_bends, low=1)
        check_number("model.curve_weight_decay", curve_weight_decay, low=0.0)
        if grid_points != 0:
            check_int("model.grid_points", grid_points, low=2)
        if reset_bn is not None and not isinstance(reset_bn, bool):
            raise ConfigError("model.reset_bn", reset_bn, "true, false or null (on for nets with BN)")
        if bn_batches is not None:
            check_int("model.bn_batches", bn_batches, low=1)
        val_t = [check_number("model.val_t", float(t) if isinstance(t, int) and not isinstance(t, bool) else t,
                              0.0, 1.0) for t in val_t]
        ckpt_a = _load_checkpoint("model.checkpoint_a", checkpoint_a)
        ckpt_b = _load_checkpoint("model.checkpoint_b", checkpoint_b)
        hp = ckpt_a["hyper_parameters"]
        # The data module links its own values in: they must describe the checkpoints' inputs.
        if num_classes is not None and num_classes != hp["num_classes"]:
            raise ConfigError("model.num_classes", num_classes, f"the checkpoints' value {hp['num_classes']}")
        if input_shape is not None and list(input_shape) != list(hp["input_shape"]):
            raise ConfigError("model.input_shape", list(input_shape), f"the checkpoints' value {list(hp['input_shape'])}")
        arch = {k: hp[k] for k in ARCHITECTURE_KEYS if k in hp}
        super().__init__(num_classes=hp["num_classes"], input_shape=hp["input_shape"], **arch,
                         optimizer=optimizer, lr_scheduler=lr_scheduler, scheduler_interval=scheduler_interval)
        base_a = MarginClassifier(num_classes=hp["num_classes"], input_shape=hp["input_shape"], **arch)
        base_b = copy.deepcopy(base_a)
        for field, base, ckpt in (("model.checkpoint_a", base_a, ckpt_a), ("model.checkpoint_b", base_b, ckpt_b)):
            try:
                base.load_state_dict(ckpt["state_dict"], strict=False)
            except RuntimeError as err:
                raise ConfigError(field, ckpt.get("hyper_parameters", {}).get("backbone"),
                                  f"a checkpoint of checkpoint_a's architecture ({err})".splitlines()[0]) from err
            missing = set(base.state_dict()) - set(ckpt["state_dict"])
            if missing:
                raise ConfigError(field, f"missing {sorted(missing)[:3]}", "a checkpoint of checkpoint_a's architecture",
                                  describe=True)
        self.load_state_dict(base_a.state_dict(), strict=False)  # A's parameters and BN buffers
        base_b = align_networks(base_a, base_b, align)
        trainable = [n for n, p in self.named_parameters() if p.requires_grad]
        for p in self.parameters():  # the base network is only ever evaluated at ψ(t)
            p.requires_grad_(False)
        theta_a = {n: p.detach() for n, p in base_a.named_parameters()}
        theta_b = {n: p.detach() for n, p in base_b.named_parameters()}
        self.curve = make_path(curve, theta_a, theta_b, num_bends=num_bends, trainable=trainable)
        self.curve_kind, self.curve_weight_decay = curve, curve_weight_decay
        self.val_t, self.grid_points = val_t, grid_points
        self.reset_bn = has_batchnorm(self) if reset_bn is None else reset_bn
        self.bn_batches = bn_batches
        self.val_t_loss = torch.nn.ModuleList(MeanMetric() for _ in val_t)
        self.val_t_acc = torch.nn.ModuleList(MulticlassAccuracy(hp["num_classes"], average="micro") for _ in val_t)
        self._val_buffers: list[dict[str, Tensor] | None] = []
        self.path_results: dict[str, Any] | None = None

    # ------------------------------------------------------------------ the curve as a network
    def forward_at(self, x: Tensor, t: float, buffers: Mapping[str, Tensor] | None = None) -> Tensor:
        """Logits of the network at ``ψ(t)`` (the base model's own buffers unless given)."""
        return functional_call(self, {**(buffers or {}), **self.curve.point(t)}, (x,))

    def _bn_loader(self):
        dm = self.trainer.datamodule
        if hasattr(dm, "train_eval_dataloader"):
            return dm.train_eval_dataloader(distributed=False)
        return dm.train_dataloader()

    def _buffers_at(self, t: float) -> dict[str, Tensor] | None:
        if not self.reset_bn:
            return None
        params = {n: p.detach() for n, p in self.curve.point(t).items()}
        return reset_bn_statistics(self, params, self._bn_loader(), self.bn_batches)

    def sample_t(self) -> float:
        """One ``t ~ U(0, 1)`` per batch, from the global RNG (seeded by ``seed_everything``)."""
        return float(torch.rand(()))

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        t = self.sample_t()
        point = self.curve.point(t)
        logits = functional_call(self, point, (batch["x"],))
        data_loss = discounted_cross_entropy(logits, batch["y"], batch.get("gap", 0.0))
        self.log_train_metrics(data_loss, logits, batch["y"])
        if self.curve_weight_decay == 0.0:
            return data_loss
        # Weight decay on the point ψ(t) (the prior on the network), over the coordinates that move.
        sq = sum(point[n].pow(2).sum() for n, moves in zip(self.curve.names, self.curve.trainable) if moves)
        return data_loss + 0.5 * self.curve_weight_decay * sq

    def on_train_epoch_end(self) -> None:
        """Logs the curve's bends' distance from the straight line (the base class's head bound
        belongs to one network, not to a curve)."""
        self._log_train_epoch()  # the training metrics of an epoch cut short (max_steps)
        line = self.curve.endpoint("a"), self.curve.endpoint("b")
        k = self.curve.num_bends + 1
        dist = sum((self.curve.control_point(j, i) - torch.lerp(line[0][n], line[1][n], j / k)).pow(2).sum()
                   for j in range(1, k) for i, n in enumerate(self.curve.names) if self.curve.trainable[i])
        self.log("train/bend_distance", torch.as_tensor(dist).sqrt(), sync_dist=True)  # equal on all ranks

    # ------------------------------------------------------------------ validation at val_t
    def on_validation_epoch_start(self) -> None:
        self._val_buffers = [self._buffers_at(t) for t in self.val_t]

    def on_test_epoch_start(self) -> None:
        self._val_buffers = [self._buffers_at(t) for t in self.val_t]

    def _points_step(self, batch: Mapping[str, Tensor]) -> None:
        x, y = batch["x"], batch["y"]
        for i, t in enumerate(self.val_t):
            logits = self.forward_at(x, t, self._val_buffers[i])
            self.val_t_loss[i].update(discounted_cross_entropy(logits, y), weight=y.shape[0])
            self.val_t_acc[i].update(logits, y)

    def _points_epoch_end(self, prefix: str) -> None:
        losses, accs = [], []
        for i, t in enumerate(self.val_t):
            loss, acc = self.val_t_loss[i].compute(), self.val_t_acc[i].compute()  # synchronised
            self.val_t_loss[i].reset()
            self.val_t_acc[i].reset()
            # already synchronised (identical on every rank); sync_dist keeps Lightning's DDP
            # check quiet and costs one all-reduce of a scalar
            self.log(f"{prefix}/loss_t{t:.2f}", loss, sync_dist=True)
            self.log(f"{prefix}/acc_t{t:.2f}", acc, sync_dist=True)
            losses.append(loss)
            accs.append(acc)
        if losses:  # the worst evaluated point
            self.log(f"{prefix}/loss", torch.stack(losses).max(), prog_bar=True, sync_dist=True)
            self.log(f"{prefix}/acc", torch.stack(accs).min(), prog_bar=True, sync_dist=True)
        self._val_buffers = []

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._points_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._points_epoch_end("val")

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._points_step(batch)

    def on_test_epoch_end(self) -> None:
        self._points_epoch_end("test")

    def configure_optimizers(self):
        params = [p for p in self.curve.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("model.curve", self.curve_kind, "bezier or chain for training "
                              "(linear and arc have no trainable points)")
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}

    # ------------------------------------------------------------------ the grid at fit end
    def evaluate_grid(self, points: int | None = None) -> dict[str, Any]:
        """The curve and the straight line on a t grid: records and metrics per split."""
        dm = self.trainer.datamodule
        loaders = {"train": self._bn_loader(), "val": dm.val_dataloader()}
        ts = t_grid(points or self.grid_points)
        line = make_path("linear", self.curve.endpoint("a"), self.curve.endpoint("b"))
        out: dict[str, Any] = {"t": ts, "reset_bn": self.reset_bn, "curve_kind": self.curve_kind}
        for name, path in (("curve", self.curve), ("linear", line)):
            records = evaluate_path(self, path, loaders, ts, bn_loader=loaders["train"], reset_bn=self.reset_bn,
                                    bn_batches=self.bn_batches)
            metrics = {split: path_metrics(ts, [r[f"{split}_loss"] for r in records],
                                           [r[f"{split}_acc"] for r in records]) for split in loaders}
            out[name] = {"records": records, "metrics": metrics}
        return out

    def on_fit_end(self) -> None:
        if not self.grid_points:
            return
        # `trainer.log_dir` broadcasts under DDP: every rank asks, then only rank 0 evaluates.
        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if not self.trainer.is_global_zero:
            return
        was_training = self.training
        self.eval()
        try:
            self.path_results = self.evaluate_grid()
        finally:
            self.train(was_training)
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "path_eval.json").write_text(json.dumps(self.path_results, indent=1))
        with open(log_dir / "path_eval.csv", "w", newline="") as f:
            writer = csv.writer(f)
            keys = [k for k in self.path_results["curve"]["records"][0] if k != "t"]
            writer.writerow(["path", "t", *keys])
            for name in ("curve", "linear"):
                for rec in self.path_results[name]["records"]:
                    writer.writerow([name, rec["t"], *(rec[k] for k in keys)])
        self._log_grid_to_tensorboard()

    def _log_grid_to_tensorboard(self) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger
        from matplotlib.figure import Figure

        res = self.path_results
        for logger in self.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            exp = logger.experiment
            for name in ("curve", "linear"):
                for k, rec in enumerate(res[name]["records"]):
                    for key, value in rec.items():
                        if key != "t":
                            exp.add_scalar(f"path/{name}_{key}", value, global_step=k)
                for split, metrics in res[name]["metrics"].items():
                    for key in ("max_acc_loss", "loss_barrier", "integral"):
                        exp.add_scalar(f"path/{name}_{split}_{key}", metrics[key], global_step=self.global_step)
            fig = Figure(figsize=(9, 3.5), layout="constrained")
            ax_loss, ax_acc = fig.subplots(1, 2)
            for name, style in (("curve", "-"), ("linear", "--")):
                for split in ("train", "val"):
                    recs = res[name]["records"]
                    ax_loss.plot(res["t"], [r[f"{split}_loss"] for r in recs], style, label=f"{name} {split}")
                    ax_acc.plot(res["t"], [r[f"{split}_acc"] for r in recs], style, label=f"{name} {split}")
            ax_loss.set_xlabel("t")
            ax_loss.set_ylabel("loss")
            ax_acc.set_xlabel("t")
            ax_acc.set_ylabel("accuracy")
            ax_acc.legend(fontsize=7)
            exp.add_figure("path/curves", fig, global_step=self.global_step)
            exp.flush()
