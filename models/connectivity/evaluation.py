"""Evaluation along a path: loss and accuracy at every t, BN statistics recomputed per point.

* :func:`reset_bn_statistics` — fresh BatchNorm running statistics for the parameters ``ψ(t)``
  from one pass over training data (Garipov's ``update_bn``; the REPAIR-style reset). Without it a
  network with BN is evaluated with statistics that belong to another point, and a path through
  BN nets shows barriers that are not there.
* :func:`evaluate_path` — ``loss(t)`` and ``acc(t)`` on each given loader.
* :func:`path_metrics` — from those curves:

  - max accuracy loss (the seed's metric, in points): ``max_t [½(acc(0) + acc(1)) − acc(t)]·100``;
  - loss barrier: ``max_t [L(t) − ((1−t)·L(0) + t·L(1))]``;
  - path integral ``∫₀¹ L(ψ(t)) dt`` (trapezoid rule on the grid), the objective a curve minimises.

The model is left exactly as it was found: points are evaluated with ``functional_call`` on
copies of the buffers; module modes and BN momenta are restored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..state import batchnorm_mode, is_batchnorm
from .paths import CurvePath


def has_batchnorm(model: nn.Module) -> bool:
    """Whether the model has BatchNorm layers that track running statistics."""
    return any(is_batchnorm(m) and m.track_running_stats for m in model.modules())


def _xy(batch) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Mapping):
        return batch["x"], batch.get("y")
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def reset_bn_statistics(model: nn.Module, params: Mapping[str, Tensor], loader: Iterable,
                        max_batches: int | None = None) -> dict[str, Tensor]:
    """BN running statistics of ``model`` at ``params``, from one pass over ``loader``.

    Every BN layer starts from zero statistics and accumulates a cumulative average
    (``momentum=None``): ``running_mean`` is the mean of the per-batch means and ``running_var`` the
    mean of the per-batch unbiased variances, ``num_batches_tracked`` the number of batches. With
    equal batch sizes the mean is the exact mean over the pass. Only the BN layers run in training
    mode (dropout stays off, as at evaluation).

    Args:
        model: the base network (left unchanged).
        params: ``{name: tensor}`` parameters to evaluate at (e.g. ``path.point(t)``).
        loader: batches of training inputs (``{"x": ...}``, ``(x, y)`` or ``x``).
        max_batches: stop after this many batches (``None``: the whole loader).

    Returns:
        ``{buffer name: tensor}``: ``running_mean``, ``running_var`` and ``num_batches_tracked`` of
        every BN layer (empty without BN), to pass to ``functional_call`` with ``params``.
    """
    bns = [(n, m) for n, m in model.named_modules() if is_batchnorm(m) and m.track_running_stats]
    buffers: dict[str, Tensor] = {}
    if not bns:
        return buffers
    for n, m in bns:  # fresh copies: the model's own statistics stay as they are
        prefix = f"{n}." if n else ""
        buffers[prefix + "running_mean"] = torch.zeros_like(m.running_mean)
        buffers[prefix + "running_var"] = torch.ones_like(m.running_var)
        buffers[prefix + "num_batches_tracked"] = torch.zeros_like(m.num_batches_tracked)
    momenta = {m: m.momentum for _, m in bns}
    device = _device(model)
    with batchnorm_mode(model, "train"):  # only BN in training mode: no dropout in the pass
        try:
            for _, m in bns:
                m.momentum = None  # cumulative average over the pass
            for b, batch in enumerate(loader):
                if max_batches is not None and b >= max_batches:
                    break
                x, _ = _xy(batch)
                functional_call(model, {**params, **buffers}, (x.to(device),))
        finally:
            for m, mom in momenta.items():
                m.momentum = mom
    return buffers


@torch.no_grad()
def evaluate_point(model: nn.Module, params: Mapping[str, Tensor], loader: Iterable,
                   buffers: Mapping[str, Tensor] | None = None,
                   criterion: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` at ``params`` (eval mode) over ``loader``."""
    state = {**dict(model.named_buffers()), **(buffers or {}), **params}
    modes = {m: m.training for m in model.modules()}
    device = _device(model)
    loss_sum, correct, n = 0.0, 0, 0
    try:
        model.eval()
        for batch in loader:
            x, y = _xy(batch)
            x, y = x.to(device), y.to(device)
            logits = functional_call(model, state, (x,)).float()
            loss_sum += float(criterion(logits, y)) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return {"loss": loss_sum / max(n, 1), "acc": correct / max(n, 1)}


def evaluate_path(model: nn.Module, path: CurvePath, loaders: Mapping[str, Iterable],
                  ts: Sequence[float], bn_loader: Iterable | None = None, reset_bn: bool | None = None,
                  bn_batches: int | None = None,
                  criterion: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> list[dict[str, float]]:
    """Loss and accuracy at every ``t`` on every loader.

    Args:
        model: the base network, evaluated at ``path.point(t)`` through ``functional_call``.
        path: a :class:`CurvePath` over ``model``'s parameters.
        loaders: ``{"train": loader, "test": loader, ...}``.
        ts: the grid of t (e.g. :func:`t_grid` ``(21)``).
        bn_loader: training batches for the BN reset (needed when it is on).
        reset_bn: recompute BN statistics at every t; ``None`` (default): on if the model has BN.
        bn_batches: batches of ``bn_loader`` used per reset (``None``: all).

    Returns:
        one record per t: ``{"t": t, "<name>_loss": ..., "<name>_acc": ...}``.
    """
    if reset_bn is None:
        reset_bn = has_batchnorm(model)
    if reset_bn and bn_loader is None:
        from marginboost.errors import ConfigError

        raise ConfigError("evaluate_path.bn_loader", None, "a loader of training batches when reset_bn is on")
    records = []
    for t in ts:
        params = {n: p.detach() for n, p in path.point(t).items()}
        buffers = reset_bn_statistics(model, params, bn_loader, bn_batches) if reset_bn else None
        rec = {"t": float(t)}
        for name, loader in loaders.items():
            res = evaluate_point(model, params, loader, buffers, criterion)
            rec[f"{name}_loss"], rec[f"{name}_acc"] = res["loss"], res["acc"]
        records.append(rec)
    return records


def path_metrics(ts: Sequence[float], loss: Sequence[float], acc: Sequence[float]) -> dict[str, float]:
    """Max accuracy loss (points), loss barrier and path integral of one split's curves.

    ``ts`` must start at 0 and end at 1 (the endpoints).

    >>> m = path_metrics([0, 0.5, 1], [0.1, 0.5, 0.3], [0.9, 0.7, 0.8])
    >>> round(m["max_acc_loss"], 6), round(m["loss_barrier"], 6), round(m["integral"], 6)
    (15.0, 0.3, 0.35)
    """
    ts = [float(t) for t in ts]
    if len(ts) < 2 or ts[0] != 0.0 or ts[-1] != 1.0 or any(b <= a for a, b in zip(ts, ts[1:])):
        from marginboost.errors import ConfigError

        raise ConfigError("path_metrics.ts", ts, "an increasing grid from 0 to 1")
    mid_acc = 0.5 * (acc[0] + acc[-1])
    max_acc_loss = max(mid_acc - a for a in acc) * 100.0
    barrier = max(l_t - ((1 - t) * loss[0] + t * loss[-1]) for t, l_t in zip(ts, loss))
    integral = sum(0.5 * (t1 - t0) * (l0 + l1) for t0, t1, l0, l1 in zip(ts, ts[1:], loss, loss[1:]))
    return {"max_acc_loss": max_acc_loss, "loss_barrier": barrier, "integral": integral,
            "acc_endpoints_mean": mid_acc, "min_acc": min(acc), "max_loss": max(loss)}
