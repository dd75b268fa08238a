"""The shipped metric callbacks: margins, gradient-norm width, Hessian trace and eigenvalues."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from .base import Measurement, MeasurementBatches, SharpnessCallback
from .distributed import gather_by_index
from .functional import collect_margins, margin_summary, trainable_parameters
from .hessian import BACKENDS, TRACE_METHODS, hessian_top_eigenvalues, hessian_trace
from .width import (
    detect_scale_invariant,
    example_input,
    gradient_norm_width,
    scale_invariant_structure,
    unit_norm_copy,
)


class PerSampleMargins(SharpnessCallback):
    r"""Margins :math:`m_i = f(x_i)_{y_i} - \max_{j\ne y_i} f(x_i)_j` of every training object.

    Raw logits, eval mode, un-augmented inputs, fp32; under DDP gathered across ranks by index
    (every object exactly once). Logs the quartiles, Tukey fences, min, mean and the fraction of
    negative margins (:func:`~callbacks.functional.margin_summary`) as scalars and the whole
    distribution as a histogram; rank 0 saves the ``[num_train]`` tensor to
    ``<save_dir or trainer.log_dir/margins>/margins_<tag>.pt`` (``tag`` = ``epoch0004``,
    ``fit_end`` or what :meth:`measure_now` was given, e.g. ``round2``).

    Attributes:
        margins: the latest full margin tensor ``[num_train]`` (CPU), ``None`` before the first.
        latest_path: where it was saved.
    """

    name = "margins"
    default_bn_mode = "eval"
    reduce_values = False

    def __init__(self, every_n_epochs: int | None = 1, at_fit_end: bool = True, save: bool = True,
                 save_dir: str | None = None, histogram: bool = True, batch_size: int | None = None,
                 prefix: str | None = None, progress: bool = True) -> None:
        super().__init__(every_n_epochs, at_fit_end, batch_size=batch_size, prefix=prefix, cache_batches=False,
                         progress=progress)
        self.save, self.save_dir, self.histogram = save, save_dir, histogram
        self.margins: Tensor | None = None
        self.latest_path: str | None = None

    def measure(self, pl_module: L.LightningModule, batches: MeasurementBatches) -> dict[str, Any]:
        if len(batches):
            m = collect_margins(pl_module, batches, batches.dataset_size)
        else:  # more ranks than batches: this rank only joins the gather
            device = pl_module.device
            m = gather_by_index(torch.zeros(0, device=device), torch.zeros(0, dtype=torch.long, device=device),
                                batches.dataset_size)
        self.margins = m.detach().cpu()
        out: dict[str, Any] = dict(margin_summary(m))
        if self.histogram:
            out["distribution"] = self.margins
        return out

    def on_measured(self, trainer: L.Trainer | None, pl_module: L.LightningModule,
                    results: dict[str, Measurement], tag: str) -> None:
        if not self.save:
            return
        if self.save_dir is not None:
            folder = self.save_dir
        elif trainer is not None:
            folder = os.path.join(trainer.log_dir, "margins")  # log_dir broadcasts: every rank calls it
        else:
            return
        path = os.path.join(folder, f"margins_{tag}.pt")
        if trainer is None or trainer.is_global_zero:
            os.makedirs(folder, exist_ok=True)
            torch.save(self.margins, path)
        self.latest_path = path


class _ScaleInvariance:
    """Which weights are scale-invariant, detected once per architecture or given by name."""

    normalize: bool
    per_channel: bool
    scale_invariant: list[str] | None
    tol: float

    def _init_scale(self, normalize: bool, per_channel: bool, scale_invariant: Sequence[str] | None,
                    tol: float) -> None:
        if scale_invariant is not None and (isinstance(scale_invariant, str) or
                                            not all(isinstance(n, str) for n in scale_invariant)):
            raise ValueError(f"{type(self).__name__}.scale_invariant must be a list of parameter names or null, "
                             f"got {scale_invariant!r}")
        if not tol > 0:
            raise ValueError(f"{type(self).__name__}.tol must be > 0, got {tol!r}")
        self.normalize, self.per_channel, self.tol = normalize, per_channel, tol
        self.scale_invariant = list(scale_invariant) if scale_invariant is not None else None
        self.detected: dict[str, list[str]] | None = None
        self._detected_for: tuple[str, ...] | None = None

    def _check_names(self, pl_module: torch.nn.Module) -> None:
        if self.scale_invariant is None:
            return
        trainable = trainable_parameters(pl_module)
        unknown = [n for n in self.scale_invariant if n not in trainable]
        if unknown:
            raise ValueError(f"{type(self).__name__}.scale_invariant: {unknown} are not trainable parameters of "
                             f"{type(pl_module).__name__}; allowed: {sorted(trainable)}")

    def invariant(self, pl_module: torch.nn.Module, batches: MeasurementBatches) -> dict[str, list[str]]:
        """``{weight: [BN names]}`` to rescale (empty with ``normalize=False``)."""
        if not self.normalize:
            return {}
        if self.scale_invariant is not None:
            self._check_names(pl_module)
            first = next(iter(batches), None)
            x = first["x"] if first is not None else example_input(pl_module)
            structure = scale_invariant_structure(pl_module, x)  # the BNs to rescale with them
            return {n: structure.get(n, []) for n in self.scale_invariant}
        key = tuple(trainable_parameters(pl_module))
        if self.detected is None or self._detected_for != key:
            first = next(iter(batches), None)
            self.detected = detect_scale_invariant(pl_module, self.criterion_fn, first, self.tol)
            self._detected_for = key
            rank_zero_info(f"{type(self).__name__}: {len(self.detected)} scale-invariant weights rescaled to unit "
                           f"norm{' per channel' if self.per_channel else ''}: {sorted(self.detected)}")
        return self.detected

    def scale_settings(self) -> dict[str, Any]:
        names = self.scale_invariant if self.scale_invariant is not None else sorted(self.detected or {})
        return {"normalize": self.normalize, "per_channel": self.per_channel,
                "scale_invariant": len(names) if self.normalize else 0}


class GradientNormWidth(_ScaleInvariance, SharpnessCallback):
    r"""Gradient-norm minimum width: :math:`\frac1B\sum_b\|\nabla_\theta L_b\|_2` over one pass.

    As defined in DESIGN.md: trainable parameters; scale-invariant weights (detected by structure
    and confirmed by :math:`\langle\nabla L, w\rangle\approx 0`, or listed in ``scale_invariant``)
    rescaled to unit norm in a copy (per output channel with ``per_channel``); BN with batch
    statistics on full minibatches (``drop_last``), running statistics untouched. The batch size
    defaults to the DataModule's training ``batch_size`` (the figure depends on it) and is recorded.
    Logs ``width/width`` with its standard error over batches.
    """

    name = "width"
    default_bn_mode = "train"
    reduce_values = False

    def __init__(self, every_n_epochs: int | None = 1, at_fit_end: bool = True, normalize: bool = True,
                 per_channel: bool = False, scale_invariant: list[str] | None = None, tol: float = 1e-3,
                 num_batches: int | None = None, batch_size: int | None = None, drop_last: bool = True,
                 seed: int = 0, criterion: Any = "discounted_ce", bn_mode: str | None = None,
                 prefix: str | None = None, cache_batches: bool = False, progress: bool = True) -> None:
        super().__init__(every_n_epochs, at_fit_end, num_batches, batch_size, drop_last, seed, criterion, bn_mode,
                         prefix, cache_batches, progress)
        self._init_scale(normalize, per_channel, scale_invariant, tol)

    def default_batch_size(self, datamodule: Any, loader: Any) -> int:
        return getattr(datamodule, "batch_size", None) or loader.batch_size or 1

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_names(pl_module)

    def settings(self) -> dict[str, Any]:
        return self.scale_settings()

    def measure(self, pl_module: L.LightningModule, batches: MeasurementBatches) -> dict[str, Any]:
        invariant = self.invariant(pl_module, batches)
        est = gradient_norm_width(pl_module, self.criterion_fn, batches, invariant, normalize=self.normalize,
                                  per_channel=self.per_channel, bn_mode=self.bn_mode)
        return {"width": Measurement(est.value, est.stderr, {"num_batches": est.num_batches}),
                "scale_invariant_tensors": float(len(est.scale_invariant))}


class _HessianCallback(_ScaleInvariance, SharpnessCallback):
    name = "hessian"
    default_bn_mode = "eval"
    reduce_values = False

    def _init_hessian(self, backend: str, normalize: bool, per_channel: bool,
                      scale_invariant: Sequence[str] | None, tol: float) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"{type(self).__name__}.backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
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
    ``hessian/trace_layer/<module>`` from the same products (they sum to the total). Products:
    ``torch.func`` forward-over-reverse, ``chunk_size`` probes per ``vmap`` (double backward as
    fallback). ``normalize`` evaluates at the unit-norm copy of the scale-invariant weights
    (``H`` scales by ``1/c²``).
    """

    def __init__(self, every_n_epochs: int | None = 1, at_fit_end: bool = True, probes: int = 32,
                 method: str = "hutchinson", per_layer: bool = True, chunk_size: int = 8, backend: str = "auto",
                 normalize: bool = False, per_channel: bool = False, scale_invariant: list[str] | None = None,
                 tol: float = 1e-3, num_batches: int | None = None, batch_size: int | None = None,
                 drop_last: bool = False, seed: int = 0, criterion: Any = "discounted_ce",
                 bn_mode: str | None = None, prefix: str | None = None, cache_batches: bool = True,
                 progress: bool = True) -> None:
        super().__init__(every_n_epochs, at_fit_end, num_batches, batch_size, drop_last, seed, criterion, bn_mode,
                         prefix, cache_batches, progress)
        if method not in TRACE_METHODS:
            raise ValueError(f"HessianTrace.method must be one of {TRACE_METHODS}, got {method!r}")
        low = 3 if method == "hutch++" else 2  # two probes at least for a standard error
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < low:
            raise ValueError(f"HessianTrace.probes must be an integer >= {low} for method={method!r}, got {probes!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"HessianTrace.chunk_size must be an integer >= 1, got {chunk_size!r}")
        self.probes, self.method, self.per_layer, self.chunk_size = probes, method, per_layer, chunk_size
        self._init_hessian(backend, normalize, per_channel, scale_invariant, tol)

    def expected_passes(self) -> int:
        return 3 if self.method == "hutch++" else math.ceil(self.probes / self.chunk_size)

    def settings(self) -> dict[str, Any]:
        return {"probes": self.probes, "method": self.method, **self.scale_settings()}

    def measure(self, pl_module: L.LightningModule, batches: MeasurementBatches) -> dict[str, Any]:
        params, buffers = self._point(pl_module, batches)
        est = hessian_trace(pl_module, self.criterion_fn, batches, self.probes, self.method, self.seed,
                            self.per_layer, params, buffers, self.bn_mode, self.backend, self.chunk_size)
        out: dict[str, Any] = {"trace": Measurement(est.value, est.stderr)}
        for layer, (value, se) in est.per_layer.items():
            out[f"trace_layer/{layer}"] = Measurement(value, se)
        return out


class HessianEigenvalues(_HessianCallback):
    r"""Top-``k`` Hessian eigenvalues by Lanczos (full re-orthogonalisation) on the same products
    as :class:`HessianTrace`; logs ``hessian/eig1`` ≥ ... ≥ ``hessian/eig<k>``."""

    def __init__(self, every_n_epochs: int | None = 1, at_fit_end: bool = True, k: int = 1, max_iter: int = 100,
                 lanczos_tol: float = 1e-5, backend: str = "auto", normalize: bool = False,
                 per_channel: bool = False, scale_invariant: list[str] | None = None, tol: float = 1e-3,
                 num_batches: int | None = None, batch_size: int | None = None, drop_last: bool = False,
                 seed: int = 0, criterion: Any = "discounted_ce", bn_mode: str | None = None,
                 prefix: str | None = None, cache_batches: bool = True, progress: bool = True) -> None:
        super().__init__(every_n_epochs, at_fit_end, num_batches, batch_size, drop_last, seed, criterion, bn_mode,
                         prefix, cache_batches, progress)
        for field_name, value in (("k", k), ("max_iter", max_iter)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HessianEigenvalues.{field_name} must be an integer >= 1, got {value!r}")
        if max_iter < k:
            raise ValueError(f"HessianEigenvalues.max_iter must be >= k={k}, got {max_iter}")
        if not lanczos_tol > 0:
            raise ValueError(f"HessianEigenvalues.lanczos_tol must be > 0, got {lanczos_tol!r}")
        self.k, self.max_iter, self.lanczos_tol = k, max_iter, lanczos_tol
        self._init_hessian(backend, normalize, per_channel, scale_invariant, tol)

    def expected_passes(self) -> int:
        return self.max_iter

    def settings(self) -> dict[str, Any]:
        return {"k": self.k, "max_iter": self.max_iter, "lanczos_tol": self.lanczos_tol, **self.scale_settings()}

    def measure(self, pl_module: L.LightningModule, batches: MeasurementBatches) -> dict[str, Any]:
        params, buffers = self._point(pl_module, batches)
        values, info = hessian_top_eigenvalues(pl_module, self.criterion_fn, batches, self.k, self.max_iter,
                                               self.lanczos_tol, self.seed, params, buffers, self.bn_mode,
                                               self.backend)
        return {f"eig{i + 1}": Measurement(float(v), None, dict(info)) for i, v in enumerate(values)}
