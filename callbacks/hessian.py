"""``HessianTrace`` and ``HessianEigenvalues``: curvature of the training loss as metric callbacks."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
from torch import Tensor

from marginboost.errors import check_bool, check_choice, check_int, check_number
from models.scale_invariance import unit_norm_copy

from .base import Measurement, MeasurementBatches, SharpnessCallback
from .functional.hessian import BACKENDS, TRACE_METHODS, hessian_top_eigenvalues, hessian_trace
from .rescaling import UnitNormRescaling


class _HessianCallback(UnitNormRescaling, SharpnessCallback):
    name = "hessian"
    default_bn_mode = "eval"
    reduce_values = False

    def _init_hessian(self, backend: str, reuse_graph: bool | None, normalize: bool, per_channel: bool,
                      scale_invariant: Sequence[str] | None, tol: float) -> None:
        self.backend = check_choice(f"{type(self).__name__}.backend", backend, BACKENDS)
        if reuse_graph is not None:
            check_bool(f"{type(self).__name__}.reuse_graph", reuse_graph)
        self.reuse_graph = reuse_graph
        self._init_scale(normalize, per_channel, scale_invariant, tol)

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_names(pl_module)

    def _point(self, pl_module: L.LightningModule,
               batches: MeasurementBatches) -> tuple[Mapping[str, Tensor] | None, Mapping[str, Tensor] | None]:
        if not self.normalize:
            return None, None
        copy = unit_norm_copy(pl_module, self.invariant(pl_module, batches), self.per_channel)
        return copy.params, copy.buffers


class HessianTrace(_HessianCallback):
    r"""Hessian trace :math:`\mathrm{tr}\,\nabla^2_\theta L` by Hutchinson (Rademacher probes) or Hutch++.

    Over the measurement set (the training set, or ``num_batches`` seeded batches), BN in eval
    mode, trainable parameters. Logs ``hessian/trace`` ± stderr and, with ``per_layer``,
    ``hessian/trace_layer/<module>`` from the same products (they sum to the total). Products
    (:class:`~models.curvature.HessianOperator`): ``chunk_size`` probes per call; with
    ``reuse_graph`` (default: when the measurement set is one batch) each batch's gradient graph
    is built once and differentiated again for every probe, otherwise ``torch.func``
    forward-over-reverse per chunk. ``normalize`` evaluates at the unit-norm copy of the
    scale-invariant weights (``H`` scales by ``1/c²``).
    """

    def __init__(self, probes: int = 32, method: str = "hutchinson", per_layer: bool = True, chunk_size: int = 8,
                 backend: str = "auto", reuse_graph: bool | None = None, normalize: bool = False,
                 per_channel: bool = False, scale_invariant: list[str] | None = None, tol: float = 1e-3,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.method = check_choice("HessianTrace.method", method, TRACE_METHODS)
        # two probes at least for a standard error; hutch++ spends a third on each of its parts
        self.probes = check_int("HessianTrace.probes", probes, low=3 if method == "hutch++" else 2)
        self.chunk_size = check_int("HessianTrace.chunk_size", chunk_size, low=1)
        self.per_layer = check_bool("HessianTrace.per_layer", per_layer)
        self._init_hessian(backend, reuse_graph, normalize, per_channel, scale_invariant, tol)

    def expected_passes(self) -> int:
        return 3 if self.method == "hutch++" else math.ceil(self.probes / self.chunk_size)

    def settings(self) -> dict[str, Any]:
        return {"probes": self.probes, "method": self.method, **self.scale_settings()}

    def measure(self, pl_module: L.LightningModule, batches: MeasurementBatches) -> dict[str, Any]:
        params, buffers = self._point(pl_module, batches)
        est = hessian_trace(pl_module, self.criterion_fn, batches, self.probes, self.method, self.seed,
                            self.per_layer, params, buffers, self.bn_mode, self.backend, self.chunk_size,
                            reuse_graph=self.reuse_graph)
        out: dict[str, Any] = {"trace": Measurement(est.value, est.stderr)}
        for layer, (value, se) in est.per_layer.items():
            out[f"trace_layer/{layer}"] = Measurement(value, se)
        return out


class HessianEigenvalues(_HessianCallback):
    r"""Top-``k`` Hessian eigenvalues by restarted Lanczos on the same products as
    :class:`HessianTrace`; logs ``hessian/eig1`` ≥ ... ≥ ``hessian/eig<k>``. The Krylov basis holds
    at most ``basis_size`` vectors of the parameter count (its memory bound); ``max_iter`` caps the
    products."""

    def __init__(self, k: int = 1, max_iter: int = 100, lanczos_tol: float = 1e-5, basis_size: int = 20,
                 backend: str = "auto", reuse_graph: bool | None = None, normalize: bool = False,
                 per_channel: bool = False, scale_invariant: list[str] | None = None, tol: float = 1e-3,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.k = check_int("HessianEigenvalues.k", k, low=1)
        self.max_iter = check_int("HessianEigenvalues.max_iter", max_iter, low=k)
        self.lanczos_tol = check_number("HessianEigenvalues.lanczos_tol", lanczos_tol, low=0.0, low_open=True)
        self.basis_size = check_int("HessianEigenvalues.basis_size", basis_size, low=2)
        self._init_hessian(backend, reuse_graph, normalize, per_channel, scale_invariant, tol)

    def expected_passes(self) -> int:
        return self.max_iter

    def settings(self) -> dict[str, Any]:
        return {"k": self.k, "max_iter": self.max_iter, "lanczos_tol": self.lanczos_tol, "basis_size": self.basis_size,
                **self.scale_settings()}

    def measure(self, pl_module: L.LightningModule, batches: MeasurementBatches) -> dict[str, Any]:
        params, buffers = self._point(pl_module, batches)
        values, info = hessian_top_eigenvalues(pl_module, self.criterion_fn, batches, self.k, self.max_iter,
                                               self.lanczos_tol, self.seed, params, buffers, self.bn_mode,
                                               self.backend, basis_size=self.basis_size,
                                               reuse_graph=self.reuse_graph)
        return {f"eig{i + 1}": Measurement(float(v), None, dict(info)) for i, v in enumerate(values)}
