"""The unit-norm rescaling option of the width and Hessian metric callbacks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from marginboost.errors import ConfigError, check_bool, check_number
from models.parameters import match_parameters
from models.scale_invariance import (
    example_input,
    scale_invariant_parameters,
    select_scale_invariant,
)
from models.state import trainable_tensors

from .base import MeasurementBatches


class UnitNormRescaling:
    """The option shared by the width and the Hessian metrics: measure at the unit-norm copy of
    the scale-invariant weights (:mod:`models.scale_invariance`), detected once per architecture or
    named by regular expressions (``scale_invariant``, the convention of
    :func:`~models.parameters.match_parameters`)."""

    normalize: bool
    per_channel: bool
    scale_invariant: list[str] | None
    tol: float

    def _init_scale(self, normalize: bool, per_channel: bool, scale_invariant: Sequence[str] | None,
                    tol: float) -> None:
        owner = type(self).__name__
        if scale_invariant is not None and (isinstance(scale_invariant, str) or not scale_invariant or
                                            not all(isinstance(n, str) for n in scale_invariant)):
            raise ConfigError(f"{owner}.scale_invariant", scale_invariant,
                              "a list of regular expressions over parameter names, or null to detect them")
        self.tol = check_number(f"{owner}.tol", tol, low=0.0, low_open=True)
        self.normalize = check_bool(f"{owner}.normalize", normalize)
        self.per_channel = check_bool(f"{owner}.per_channel", per_channel)
        self.scale_invariant = list(scale_invariant) if scale_invariant is not None else None
        self.detected: dict[str, list[str]] | None = None
        self._last: dict[str, list[str]] = {}  # what the latest measurement rescaled
        self._detected_for: tuple[str, ...] | None = None

    def _check_names(self, pl_module: torch.nn.Module) -> None:
        if self.scale_invariant is not None:
            match_parameters(pl_module, self.scale_invariant, f"{type(self).__name__}.scale_invariant")

    def invariant(self, pl_module: torch.nn.Module, batches: MeasurementBatches) -> dict[str, list[str]]:
        """``{weight: [BN names]}`` to rescale (empty with ``normalize=False``)."""
        if not self.normalize:
            return {}
        if self.scale_invariant is not None:
            first = next(iter(batches), None)
            x = first["x"] if first is not None else example_input(pl_module)
            self._last = select_scale_invariant(pl_module, self.scale_invariant,
                                                f"{type(self).__name__}.scale_invariant", x)
            return self._last
        key = tuple(trainable_tensors(pl_module))
        if self.detected is None or self._detected_for != key:
            first = next(iter(batches), None)
            self.detected = scale_invariant_parameters(pl_module, self.criterion_fn, first, self.tol)
            self._detected_for = key
            rank_zero_info(f"{type(self).__name__}: {len(self.detected)} scale-invariant weights rescaled to unit "
                           f"norm{' per channel' if self.per_channel else ''}: {sorted(self.detected)}")
        self._last = self.detected
        return self._last

    def scale_settings(self) -> dict[str, Any]:
        return {"normalize": self.normalize, "per_channel": self.per_channel,
                "scale_invariant": len(self._last) if self.normalize else 0}
