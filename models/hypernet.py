"""Hypernetworks ``G(λ)`` giving a variational network for every complexity λ, and their module.

One training covers a whole range of λ: every batch draws ``log₁₀ λ ~ U(a, b)`` and trains
``G(λ) = (m(λ), log σ²(λ))`` on the negative generalized evidence at that λ
(``models.variational.negative_evidence``). The hypernetwork reads λ through the normalised
coordinate ``u = 2·(log₁₀ λ − a)/(b − a) − 1 ∈ [−1, 1]``. Per generated tensor (each weight
matrix and bias, once for ``m`` and once for ``log σ²``):

- low rank: ``G(λ) = B₀ + (h U₁)ᵀ(h U₂)``, ``h = ReLU(W_f u + b_f)`` with ``hidden`` units
  (a tensor of more than two dimensions is generated as a ``[rows, rest]`` matrix; a vector as
  ``B₀ + h U₁``);
- linear: ``G(λ) = B₀ + u·B₁``.

:class:`HyperNetClassifier` trains either hypernetwork, or in ``direct`` mode one
:class:`~models.variational.VariationalModel` at a fixed λ (the baseline of one training per λ).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from marginboost.errors import ConfigError, check_bool, check_choice, check_int, check_number

from .backbones import build_backbone
from .pruning import count_parameter_updates, plot_pruning_curves, pruned_mean, stability
from .variational import VariationalModel, VariationalNet, sample_weights

__all__ = [
    "HYPERNET_MODES",
    "BinnedAccuracy",
    "HyperNetClassifier",
    "HyperNetwork",
    "LinearHyperNet",
    "LowRankHyperNet",
    "lambda_coordinate",
    "sample_log_lambda",
]

HYPERNET_MODES = ("lowrank", "linear", "direct")
Weights = dict[str, Tensor]


def sample_log_lambda(n: int, low: float, high: float, generator: torch.Generator | None = None) -> Tensor:
    """``n`` draws of ``log₁₀ λ ~ U(low, high)`` (float32, CPU)."""
    return low + (high - low) * torch.rand(n, generator=generator)


def lambda_coordinate(lam: float | Tensor, low: float, high: float) -> Tensor:
    """``u = 2·(log₁₀ λ − low)/(high − low) − 1``: the hypernetwork's input, ``[−1, 1]`` on the range."""
    lam = torch.as_tensor(lam, dtype=torch.float32)
    return 2.0 * (torch.log10(lam) - low) / (high - low) - 1.0


class _LowRankTensor(nn.Module):
    """``B₀ + (h U₁)ᵀ(h U₂)`` (matrix) or ``B₀ + h U₁`` (vector), ``h = ReLU(W_f u + b_f)``."""

    def __init__(self, base: Tensor, hidden: int, init_scale: float) -> None:
        super().__init__()
        self.shape = tuple(base.shape)
        self.f = nn.Linear(1, hidden)
        self.base = nn.Parameter(base.clone())
        # Small, not zero: the rank-one term is a product, so a zero start would have no gradient.
        std = init_scale / math.sqrt(hidden)
        self.u_rows = nn.Parameter(torch.randn(hidden, self.shape[0]) * std)
        self.u_cols = None
        if len(self.shape) > 1:
            self.u_cols = nn.Parameter(torch.randn(hidden, math.prod(self.shape[1:])) * std)

    def forward(self, u: Tensor) -> Tensor:
        h = torch.relu(self.f(u.reshape(1, 1).to(self.base.dtype))).squeeze(0)
        rows = h @ self.u_rows
        if self.u_cols is None:
            return self.base + rows
        return self.base + torch.outer(rows, h @ self.u_cols).view(self.shape)


class _LinearTensor(nn.Module):
    """``B₀ + u·B₁``; ``B₁`` starts at zero (the model starts λ-independent)."""

    def __init__(self, base: Tensor) -> None:
        super().__init__()
        self.base = nn.Parameter(base.clone())
        self.slope = nn.Parameter(torch.zeros_like(base))

    def forward(self, u: Tensor) -> Tensor:
        return self.base + u.to(self.base.dtype) * self.slope


class HyperNetwork(nn.Module):
    """Base class: ``forward(λ) -> (mean, log_var)``, one generator per target tensor.

    Args:
        initial_mean: the target's initial weights by name (``VariationalNet.initial_mean``);
            they start ``B₀`` of the means.
        init_log_var: the start of ``B₀`` of every ``log σ²``.
        log_lambda_range: ``(a, b)``: ``log₁₀ λ`` of the training range, mapped to ``u ∈ [−1, 1]``.
    """

    def __init__(self, initial_mean: Mapping[str, Tensor], init_log_var: float = -6.0,
                 log_lambda_range: Sequence[float] = (-1.0, 2.0)) -> None:
        super().__init__()
        self.names = list(initial_mean)
        self.log_lambda_range = (float(log_lambda_range[0]), float(log_lambda_range[1]))
        self.mean = nn.ModuleDict({_key(n): self.generator(m) for n, m in initial_mean.items()})
        self.log_var = nn.ModuleDict({_key(n): self.generator(torch.full_like(m, init_log_var))
                                      for n, m in initial_mean.items()})

    def generator(self, base: Tensor) -> nn.Module:
        raise NotImplementedError

    def variational_parameters(self, lam: float | Tensor) -> tuple[Weights, Weights]:
        u = lambda_coordinate(lam, *self.log_lambda_range).to(next(self.parameters()).device)
        return ({n: self.mean[_key(n)](u) for n in self.names},
                {n: self.log_var[_key(n)](u) for n in self.names})

    forward = variational_parameters


class LowRankHyperNet(HyperNetwork):
    """``G(λ) = B₀ + (h U₁)ᵀ(h U₂)``, ``h = ReLU(W_f u + b_f)`` with ``hidden`` units.

    Example:
        >>> G = LowRankHyperNet({"w": torch.zeros(3, 2), "b": torch.zeros(3)}, hidden=8)
        >>> mean, log_var = G(1.0)
        >>> mean["w"].shape, log_var["b"].shape
        (torch.Size([3, 2]), torch.Size([3]))
    """

    def __init__(self, initial_mean: Mapping[str, Tensor], hidden: int = 50, init_log_var: float = -6.0,
                 log_lambda_range: Sequence[float] = (-1.0, 2.0), init_scale: float = 0.1) -> None:
        self.hidden = check_int("model.hidden", hidden, low=1)
        self.init_scale = init_scale
        super().__init__(initial_mean, init_log_var, log_lambda_range)

    def generator(self, base: Tensor) -> nn.Module:
        return _LowRankTensor(base, self.hidden, self.init_scale)


class LinearHyperNet(HyperNetwork):
    """``G(λ) = B₀ + u·B₁`` (linear in the normalised ``log₁₀ λ``)."""

    def generator(self, base: Tensor) -> nn.Module:
        return _LinearTensor(base)


def _key(name: str) -> str:
    return name.replace(".", "/")  # ModuleDict keys cannot contain "."


class BinnedAccuracy(Metric):
    """Accuracy per bin of ``log₁₀ λ``: ``num_bins`` equal bins over ``[low, high]``.

    ``update(logits [B, K], target [B], log_lambda)`` puts the whole batch in the bin of its λ;
    ``compute()`` gives ``[num_bins]`` accuracies (NaN for an empty bin). Synchronised like any
    torchmetrics metric (sums of correct and total counts).
    """

    full_state_update = False

    def __init__(self, num_bins: int, low: float, high: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_bins, self.low, self.high = num_bins, low, high
        self.add_state("correct", torch.zeros(num_bins, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_bins, dtype=torch.long), dist_reduce_fx="sum")

    def bin_of(self, log_lambda: float) -> int:
        position = (log_lambda - self.low) / (self.high - self.low) * self.num_bins
        return min(max(int(math.floor(position)), 0), self.num_bins - 1)

    def update(self, logits: Tensor, target: Tensor, log_lambda: float) -> None:
        b = self.bin_of(log_lambda)
        self.correct[b] += (logits.argmax(-1) == target).sum()
        self.total[b] += target.numel()

    def compute(self) -> Tensor:
        return self.correct.double() / self.total.double()  # 0/0 = NaN marks an empty bin

    def edges(self) -> list[float]:
        return [self.low + (self.high - self.low) * i / self.num_bins for i in range(self.num_bins + 1)]


def _lambda_tag(lam: float) -> str:
    return f"{lam:g}"


class HyperNetClassifier(L.LightningModule):
    """A variational classifier trained for every λ at once (hypernetwork) or at one λ (direct).

    The target network is ``Linear ∘ backbone`` (``relu_mlp`` with ``width=100``: the study's
    ``784→100→10`` ReLU MLP on 28×28 inputs), made variational by
    :class:`~models.variational.VariationalNet` with prior ``N(prior_mean, prior_var·I)``.
    The loss of a batch is the per-object negative generalized evidence
    ``mean_i CE(f(x_i; w̃), y_i) + λ·KL(q_λ‖p)/N`` with one sample ``w̃ ~ q_λ``, ``N`` the
    training-set size (from the DataModule unless ``data_size`` is given). Plain cross-entropy on
    the variational network's logits: the discounted loss and the frozen ``W ∘ BN`` head of
    :class:`~models.MarginClassifier` are not used here (the head's BN has running statistics,
    which are not part of a weight posterior, and the study trains the whole network).

    Args:
        num_classes, input_shape: linked from the DataModule by the CLI.
        backbone, backbone_kwargs: the target's feature extractor (no buffers allowed).
        mode: ``lowrank`` or ``linear`` (hypernetworks), ``direct`` (one model at ``lam``).
        hidden: hidden units of the low-rank hypernetwork's ``f`` (the study: 50).
        lam: the λ of ``direct`` mode; in hypernetwork modes the reference λ of ``val/acc`` and
            ``val/loss``.
        log_lambda_range: ``(a, b)``: training draws ``log₁₀ λ ~ U(a, b)`` per batch.
        prior_mean, prior_var: the prior ``N(μ, A⁻¹)``, ``A⁻¹ = prior_var·I`` (study: 0.1).
        init_log_var: initial ``log σ²`` of every weight.
        data_size: ``N``; ``None`` reads the DataModule's ``num_train`` at setup.
        eval_lambdas: λ values evaluated every validation epoch (``val/acc@λ`` etc.); a direct
            model is evaluated at its own ``lam``.
        lambda_bins: bins of ``log₁₀ λ`` for the training accuracy (``train/acc_bin…``).
        prune_fractions: removed fractions of the pruning sweep at the end of fit.
        log_pruning_figure: at the end of fit, sweep pruning on the validation set for every
            ``eval_lambdas`` and add the figure (and stability S at 90%) to TensorBoard.
        eval_seed: seed of the weight samples of the evidence estimate in evaluation.
        balance_lambdas: optimise ``L(λ)/(1+λ)`` instead of ``L(λ)``: the minimiser at each λ is
            the same, but every λ of the range pulls on the hypernetwork's shared parameters with
            a comparable force (``train/loss`` still logs ``L(λ)``).
        optimizer, lr_scheduler: as in ``MarginClassifier`` (default Adam, lr 1e-3).

    Logged: ``train/loss``, ``train/nll``, ``train/kl`` (KL/N), ``train/log_lambda``,
    ``train/acc_bin<i>`` (with the bin edges in the tag), ``train/parameter_updates``;
    ``val/acc@λ``, ``val/nll@λ`` (mean weights), ``val/expected_nll@λ`` (one sample),
    ``val/kl@λ`` (KL/N), ``val/evidence@λ`` (per object), ``val/acc``, ``val/loss`` (at ``lam``).
    """

    def __init__(
        self,
        num_classes: int = 10,
        input_shape: Sequence[int] = (1, 28, 28),
        backbone: str = "relu_mlp",
        backbone_kwargs: dict[str, Any] | None = None,
        mode: str = "lowrank",
        hidden: int = 50,
        lam: float = 1.0,
        log_lambda_range: Sequence[float] = (-1.0, 2.0),
        prior_mean: float = 0.0,
        prior_var: float = 0.1,
        init_log_var: float = -6.0,
        data_size: int | None = None,
        eval_lambdas: Sequence[float] = (0.1, 1.0, 10.0, 100.0),
        lambda_bins: int = 3,
        prune_fractions: Sequence[float] = tuple(i / 20 for i in range(21)),
        log_pruning_figure: bool = True,
        eval_seed: int = 0,
        balance_lambdas: bool = False,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.mode = check_choice("model.mode", mode, HYPERNET_MODES)
        check_int("model.num_classes", num_classes, low=2)
        self.lam = check_number("model.lam", lam, low=0.0, low_open=mode != "direct")
        if len(log_lambda_range) != 2 or not log_lambda_range[0] < log_lambda_range[1]:
            raise ConfigError("model.log_lambda_range", list(log_lambda_range), "[a, b] with a < b")
        self.log_lambda_range = tuple(check_number("model.log_lambda_range", v) for v in log_lambda_range)
        self.eval_lambdas = [check_number("model.eval_lambdas", v, low=0.0, low_open=True)
                             for v in eval_lambdas]
        if mode == "direct":  # a direct model has one λ: its scores are reported at that λ
            self.eval_lambdas = [self.lam]
        if not self.eval_lambdas:
            raise ConfigError("model.eval_lambdas", [], "a non-empty list of λ > 0")
        self.data_size = None if data_size is None else check_int("model.data_size", data_size, low=1)
        self.prune_fractions = [check_number("model.prune_fractions", f, 0.0, 1.0) for f in prune_fractions]
        self.eval_seed = check_int("model.eval_seed", eval_seed, low=0)
        self.log_pruning_figure = check_bool("model.log_pruning_figure", log_pruning_figure)
        self.balance_lambdas = check_bool("model.balance_lambdas", balance_lambdas)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])

        backbone_kwargs = {"width": 100, "depth": 1} if backbone_kwargs is None else dict(backbone_kwargs)
        features = build_backbone(backbone, input_shape, **backbone_kwargs)
        net = nn.Sequential(features, nn.Linear(features.out_features, num_classes))
        if mode == "direct":
            self.generator = VariationalModel(net, prior_mean, prior_var, init_log_var)
            self.target = self.generator.target
        else:
            self.target = VariationalNet(net, prior_mean, prior_var)
            cls = LowRankHyperNet if mode == "lowrank" else LinearHyperNet
            kwargs = {"hidden": hidden} if mode == "lowrank" else {}
            self.generator = cls(self.target.initial_mean, init_log_var=init_log_var,
                                 log_lambda_range=self.log_lambda_range, **kwargs)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler

        self.train_loss, self.train_nll, self.train_kl = MeanMetric(), MeanMetric(), MeanMetric()
        self.train_log_lambda = MeanMetric()
        self.train_binned_acc = BinnedAccuracy(check_int("model.lambda_bins", lambda_bins, low=1),
                                               *self.log_lambda_range)
        k = len(self.eval_lambdas)
        self.val_acc = nn.ModuleList(MulticlassAccuracy(num_classes, average="micro") for _ in range(k))
        self.val_nll = nn.ModuleList(MeanMetric() for _ in range(k))
        self.val_expected_nll = nn.ModuleList(MeanMetric() for _ in range(k))
        self.pruning_results: dict[float, dict[str, Any]] = {}

    # -- the model at a λ ------------------------------------------------------------------
    def variational_parameters(self, lam: float | None = None) -> tuple[Weights, Weights]:
        """``(mean, log_var)`` of the posterior at λ (``G(λ)``; the direct model ignores λ)."""
        return self.generator.variational_parameters(self.lam if lam is None else lam)

    def forward(self, x: Tensor, lam: float | None = None) -> Tensor:
        """Logits at λ: sampled weights in training mode, the means in eval mode."""
        return self.target(x, *self.variational_parameters(lam))

    def kl(self, lam: float | None = None) -> Tensor:
        """``KL(q_λ‖p)`` of the whole network."""
        return self.target.kl(*self.variational_parameters(lam))

    def direct_at(self, lam: float) -> HyperNetClassifier:
        """A ``direct``-mode copy whose posterior is ``G(λ)``: evaluate it or fine-tune it at λ."""
        hparams = dict(self.hparams)
        hparams.update(mode="direct", lam=lam, data_size=self.data_size, balance_lambdas=False)
        model = HyperNetClassifier(**hparams, optimizer=self.optimizer_factory,
                                   lr_scheduler=self.scheduler_factory)
        with torch.no_grad():
            model.generator.load_variational(*self.variational_parameters(lam))
        return model.to(self.device)

    @property
    def num_weights(self) -> int:
        return self.target.num_weights

    # -- training --------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.data_size is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is None or not hasattr(datamodule, "num_train"):
                raise ConfigError("model.data_size", None, "an integer >= 1 when the DataModule has no num_train")
            self.data_size = int(datamodule.num_train)
            self.hparams["data_size"] = self.data_size  # so a checkpoint evaluates without a DataModule

    def draw_lambda(self) -> float:
        """λ of the next training batch: fixed in direct mode, ``10^U(a, b)`` otherwise."""
        if self.mode == "direct":
            return self.lam
        return float(10.0 ** sample_log_lambda(1, *self.log_lambda_range)[0])

    def objective(self, x: Tensor, y: Tensor, lam: float,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(loss, nll, kl, logits)`` of a batch at λ with one weight sample; ``kl`` is the total."""
        mean, log_var = self.variational_parameters(lam)
        logits = self.target(x, mean, log_var, sample=True, generator=generator)
        nll = F.cross_entropy(logits, y)
        kl = self.target.kl(mean, log_var)
        return nll + lam * kl / self._data_size(), nll, kl, logits

    def _data_size(self) -> int:
        if self.data_size is None:
            raise ConfigError("model.data_size", None, "an integer >= 1 (or fit with a DataModule)")
        return self.data_size

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        x, y = batch["x"], batch["y"]
        lam = self.draw_lambda()
        loss, nll, kl, logits = self.objective(x, y, lam)
        n = y.shape[0]
        # Per-λ minimisers are unchanged by a positive λ-dependent factor; without it the batches
        # of large λ (loss ~ λ·KL/N) dominate the shared parameters of a hypernetwork.
        step_loss = loss / (1.0 + lam) if self.balance_lambdas else loss
        log_lambda = math.log10(lam) if lam > 0 else self.log_lambda_range[0]
        self.train_loss.update(loss.detach(), weight=n)
        self.train_nll.update(nll.detach(), weight=n)
        self.train_kl.update(kl.detach() / self._data_size())
        self.train_log_lambda.update(log_lambda)
        self.train_binned_acc.update(logits.detach(), y, log_lambda)
        for name, metric in (("loss", self.train_loss), ("nll", self.train_nll), ("kl", self.train_kl),
                             ("log_lambda", self.train_log_lambda)):
            self.log(f"train/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "loss",
                     batch_size=n)
        return step_loss

    def on_train_epoch_end(self) -> None:
        accs, edges = self.train_binned_acc.compute(), self.train_binned_acc.edges()
        for i, acc in enumerate(accs.tolist()):
            if not math.isnan(acc):
                self.log(f"train/acc_bin{i}_loglam_{edges[i]:+.2f}_{edges[i + 1]:+.2f}", acc, sync_dist=False)
        self.train_binned_acc.reset()
        self.log("train/parameter_updates", float(self.parameter_updates()), sync_dist=False)

    def parameter_updates(self) -> int:
        """Trainable parameters × optimizer steps so far (the study's cost measure)."""
        steps = self.trainer.global_step if self._trainer is not None else 0
        return count_parameter_updates(self, steps)

    # -- evaluation ------------------------------------------------------------------------
    def _sample_generator(self, batch_idx: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.eval_seed * 1_000_003 + batch_idx)
        return gen

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        x, y = batch["x"], batch["y"]
        n = y.shape[0]
        gen = self._sample_generator(batch_idx)
        for i, lam in enumerate(self.eval_lambdas):
            mean, log_var = self.variational_parameters(lam)
            logits = self.target(x, mean, log_var, sample=False)
            sampled = self.target(x, mean, log_var, sample=True, generator=gen)
            self.val_acc[i].update(logits, y)
            self.val_nll[i].update(F.cross_entropy(logits, y), weight=n)
            self.val_expected_nll[i].update(F.cross_entropy(sampled, y), weight=n)

    def on_validation_epoch_end(self) -> None:
        reference = None
        for i, lam in enumerate(self.eval_lambdas):
            tag = _lambda_tag(lam)
            kl = float(self.kl(lam)) / self._data_size()
            acc, nll = self.val_acc[i].compute(), self.val_nll[i].compute()
            expected_nll = self.val_expected_nll[i].compute()
            evidence = -expected_nll - lam * kl
            values = {"acc": acc, "nll": nll, "expected_nll": expected_nll, "kl": kl, "evidence": evidence}
            for name, value in values.items():
                self.log(f"val/{name}@{tag}", value, sync_dist=False)
            if math.isclose(lam, self.lam):
                reference = values
            for metric in (self.val_acc[i], self.val_nll[i], self.val_expected_nll[i]):
                metric.reset()
        if reference is not None:
            self.log("val/acc", reference["acc"], prog_bar=True, sync_dist=False)
            self.log("val/loss", -reference["evidence"], sync_dist=False)

    @torch.no_grad()
    def evaluate(self, loader, lam: float | None = None, mean: Mapping[str, Tensor] | None = None,
                 mc_samples: int = 1) -> dict[str, float]:
        """Accuracy, NLL, KL and generalized evidence at λ, without training and without side effects.

        ``acc`` and ``nll`` use the mean weights (``mean`` overrides them, e.g. pruned means);
        ``expected_nll`` averages ``mc_samples`` weight samples drawn from a seeded local
        generator (the global RNG is untouched); ``kl`` is ``KL(q_λ‖p)/N`` and
        ``evidence = −expected_nll − λ·kl`` (per object); ``mc_samples=0`` skips the samples
        (NaN evidence). The model's mode is restored.
        """
        lam = self.lam if lam is None else lam
        was_training = self.training
        self.eval()
        # The loader's iterator draws its base seed from the global RNG: fork it, so evaluating
        # never changes what training draws next.
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            try:
                return self._evaluate(loader, lam, mean, mc_samples)
            finally:
                self.train(was_training)

    def _evaluate(self, loader, lam: float, mean: Mapping[str, Tensor] | None,
                  mc_samples: int) -> dict[str, float]:
        post_mean, log_var = self.variational_parameters(lam)
        run_mean = post_mean if mean is None else mean
        correct = total = 0
        nll_sum = expected_sum = 0.0
        for batch_idx, batch in enumerate(loader):
            x, y = batch["x"].to(self.device), batch["y"].to(self.device)
            logits = self.target(x, run_mean, log_var, sample=False)
            correct += int((logits.argmax(-1) == y).sum())
            total += y.numel()
            nll_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            gen = self._sample_generator(batch_idx)
            for _ in range(mc_samples):
                sampled = self.target(x, sample_weights(post_mean, log_var, gen), log_var, sample=False)
                expected_sum += float(F.cross_entropy(sampled, y, reduction="sum")) / mc_samples
        kl = float(self.target.kl(post_mean, log_var)) / self._data_size()
        expected_nll = expected_sum / total if mc_samples > 0 else math.nan  # 0 samples: skipped
        return {"acc": correct / total, "nll": nll_sum / total, "expected_nll": expected_nll,
                "kl": kl, "evidence": -expected_nll - lam * kl}

    @torch.no_grad()
    def pruning_sweep(self, loader, lam: float | None = None,
                      fractions: Sequence[float] | None = None) -> dict[str, Any]:
        """Accuracy vs removed fraction at λ (pruning by relative density, model untouched).

        Returns ``{"fractions", "acc", "stability_90"}``; ``stability_90 = acc(0)/acc(0.9)``.
        """
        lam = self.lam if lam is None else lam
        fractions = list(self.prune_fractions if fractions is None else fractions)
        mean, log_var = self.variational_parameters(lam)
        acc = {f: self.evaluate(loader, lam, mean=pruned_mean(mean, log_var, f), mc_samples=0)["acc"]
               for f in sorted({*fractions, 0.0, 0.9})}
        return {"fractions": fractions, "acc": [acc[f] for f in fractions],
                "stability_90": stability(acc[0.0], acc[0.9])}

    def on_fit_end(self) -> None:
        if not self.log_pruning_figure:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return
        try:
            loader = list(datamodule.val_dataloader())  # materialised once: the sweep reads it often
        except MisconfigurationException:  # a DataModule without validation data: nothing to sweep
            return
        lambdas = [self.lam] if self.mode == "direct" else self.eval_lambdas
        self.pruning_results = {lam: self.pruning_sweep(loader, lam) for lam in lambdas}
        logger = self.logger
        if not self.trainer.is_global_zero or logger is None or not hasattr(logger.experiment, "add_figure"):
            return
        curves = {f"λ={_lambda_tag(lam)}": (r["fractions"], r["acc"]) for lam, r in self.pruning_results.items()}
        fig = plot_pruning_curves(curves, title=f"{self.mode}: accuracy vs removed fraction")
        logger.experiment.add_figure("pruning/accuracy_vs_removed", fig, self.global_step)
        for lam, r in self.pruning_results.items():
            logger.experiment.add_scalar(f"pruning/stability_90@{_lambda_tag(lam)}", r["stability_90"],
                                         self.global_step)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = (self.optimizer_factory(params) if self.optimizer_factory is not None
                     else torch.optim.Adam(params, lr=1e-3))
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer)}}
