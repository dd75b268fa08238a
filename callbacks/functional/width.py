"""The gradient-norm minimum width, without Lightning."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

from marginboost.batches import Batch, as_batch, batch_len, batch_to, reiterable
from marginboost.distributed import comm_device, is_distributed
from models.losses import Criterion, resolve_criterion
from models.scale_invariance import scale_invariant_parameters, unit_norm_copy
from models.state import batchnorm_mode


@dataclass
class WidthEstimate:
    """``value``: mean over minibatches of ``‖∇L_b‖``; ``stderr`` over batches; the batch count and
    sizes; the weights rescaled to unit norm (empty when ``normalize=False``)."""

    value: float
    stderr: float
    num_batches: int
    batch_size: int
    scale_invariant: list[str]


def gradient_norm_width(model: nn.Module, loss_fn: Criterion | str | None, batches: Iterable[Batch],
                        scale_invariant: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
                        normalize: bool = True, per_channel: bool = False, bn_mode: str = "train",
                        tol: float = 1e-3, distributed: bool | None = None) -> WidthEstimate:
    r"""Gradient-norm minimum width: :math:`\frac1B\sum_b \|\nabla_\theta L_b(\tilde\theta)\|_2`.

    :math:`\tilde\theta` is a copy of the trainable parameters with every scale-invariant weight
    rescaled to unit norm (``normalize``; per output channel with ``per_channel``), so the figure
    does not depend on the arbitrary scale of those weights. ``scale_invariant=None`` detects them
    (:func:`~models.scale_invariance.scale_invariant_parameters`: structure + gradient check on the
    first batch). BN uses batch statistics (``bn_mode="train"``)
    on buffer copies, so the running statistics are not touched. Under DDP each rank passes whole
    minibatches and the mean is over all of them.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> batches = [{"x": torch.randn(16, 4), "y": torch.randint(0, 3, (16,))} for _ in range(2)]
        >>> est = gradient_norm_width(net, "ce", batches)
        >>> est.scale_invariant, est.num_batches
        (['0.weight'], 2)
    """
    loss_fn, _ = resolve_criterion(loss_fn, "loss_fn")
    batches = reiterable(batches)
    distributed = is_distributed() if distributed is None else distributed
    if not normalize:
        invariant: Mapping[str, Sequence[str]] | Sequence[str] = {}
    elif scale_invariant is None:
        first = next(iter(batches), None)
        invariant = scale_invariant_parameters(model, loss_fn, first, tol, distributed)
    else:
        invariant = scale_invariant
    copy = unit_norm_copy(model, invariant, per_channel)
    device = next(iter(copy.params.values())).device
    dtype = next(iter(copy.params.values())).dtype
    norms, size = [], 0
    with batchnorm_mode(model, bn_mode), torch.enable_grad():
        for raw in batches:
            batch = batch_to(as_batch(raw), device, dtype)
            size = max(size, batch_len(batch))
            params = {n: p.detach().requires_grad_(True) for n, p in copy.params.items()}
            buffers = {n: b.clone() for n, b in copy.buffers.items()}
            loss = loss_fn(functional_call(model, (params, buffers), (batch["x"],)), batch)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            sq = sum((g.double().pow(2).sum() for g in grads if g is not None), torch.zeros((), dtype=torch.float64,
                                                                                               device=device))
            norms.append(sq.sqrt())
    local = torch.stack(norms).cpu() if norms else torch.zeros(0, dtype=torch.float64)
    stats = torch.tensor([float(local.sum()), float(local.pow(2).sum()), float(local.numel()), float(size)],
                         dtype=torch.float64)
    if distributed:
        buf = stats[:3].to(comm_device())
        dist.all_reduce(buf)
        top = stats[3:].to(comm_device())
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        stats = torch.cat([buf.cpu(), top.cpu()])
    total, total_sq, count, size = stats.tolist()
    if count == 0:
        raise ValueError("gradient_norm_width: no batches to measure")
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0) * count / max(count - 1, 1)
    return WidthEstimate(mean, math.sqrt(var / count) if count > 1 else float("nan"), int(count), int(size),
                         sorted(invariant))
