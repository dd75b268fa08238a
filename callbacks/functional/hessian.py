"""The Hessian metrics as plain functions: trace (Hutchinson, Hutch++) and top eigenvalues.

The operator and the estimators live in :mod:`models.curvature`; these functions pick the
measurement (criterion, batches, BN mode, the point to evaluate at) and return the estimates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from marginboost.batches import Batch
from marginboost.errors import check_choice
from models.curvature import (
    BACKENDS,
    HessianOperator,
    TraceEstimate,
    hutchinson,
    hutchpp,
    lanczos_top_eigenvalues,
)
from models.losses import Criterion

__all__ = ["BACKENDS", "TRACE_METHODS", "hessian_top_eigenvalues", "hessian_trace"]

TRACE_METHODS = ("hutchinson", "hutch++")


def hessian_trace(model: nn.Module, loss_fn: Criterion | str | None, batches: Iterable[Batch], probes: int = 32,
                  method: str = "hutchinson", seed: int = 0, per_layer: bool = True,
                  params: Mapping[str, Tensor] | None = None, buffers: Mapping[str, Tensor] | None = None,
                  bn_mode: str = "eval", backend: str = "auto", chunk_size: int = 8,
                  distributed: bool | None = None, reuse_graph: bool | None = None) -> TraceEstimate:
    r"""Trace of the Hessian of the mean criterion over ``batches``, by Hutchinson or Hutch++.

    ``chunk_size`` probes share one product call; ``reuse_graph`` keeps each batch's gradient
    graph for all of them (default: when ``batches`` is a single batch; see
    :class:`~models.curvature.HessianOperator`).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 2))
        >>> batch = {"x": torch.randn(8, 3), "y": torch.randint(0, 2, (8,))}
        >>> est = hessian_trace(net, "ce", [batch], probes=16)
        >>> est.value > 0 and est.probes == 16
        True
    """
    check_choice("method", method, TRACE_METHODS)
    op = HessianOperator(model, loss_fn, batches, params, buffers, bn_mode, backend, chunk_size, distributed,
                         reuse_graph)
    gen = torch.Generator().manual_seed(seed)
    slices = op.slices() if per_layer else None
    if method == "hutch++":
        return hutchpp(op.matvec, op.dim, probes, gen, op.dtype, op.device, slices)
    return hutchinson(op.matvec, op.dim, probes, gen, op.dtype, op.device, chunk_size, slices)


def hessian_top_eigenvalues(model: nn.Module, loss_fn: Criterion | str | None, batches: Iterable[Batch], k: int = 1,
                            max_iter: int = 100, tol: float = 1e-5, seed: int = 0,
                            params: Mapping[str, Tensor] | None = None,
                            buffers: Mapping[str, Tensor] | None = None, bn_mode: str = "eval",
                            backend: str = "auto", distributed: bool | None = None,
                            basis_size: int = 20, reuse_graph: bool | None = None) -> tuple[Tensor, dict[str, float]]:
    """Top-``k`` Hessian eigenvalues by restarted Lanczos
    (:func:`~models.curvature.lanczos_top_eigenvalues`, at most ``basis_size`` vectors of the
    parameter count in memory) on a :class:`~models.curvature.HessianOperator`.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 2))
        >>> batch = {"x": torch.randn(8, 3), "y": torch.randint(0, 2, (8,))}
        >>> values, info = hessian_top_eigenvalues(net, "ce", [batch], k=2)
        >>> bool(values[0] >= values[1])
        True
    """
    op = HessianOperator(model, loss_fn, batches, params, buffers, bn_mode, backend, 1, distributed, reuse_graph)
    return lanczos_top_eigenvalues(op.matvec, op.dim, k, max_iter, tol, torch.Generator().manual_seed(seed),
                                   op.dtype, op.device, basis_size)
