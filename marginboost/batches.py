"""Batches as the framework passes them around: mappings with ``x``, ``y`` (``idx``, ``gap``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

Batch = Mapping[str, Tensor]


def as_batch(batch: Batch | Sequence[Tensor]) -> dict[str, Tensor]:
    """A batch as a dict with ``x``, ``y`` (and ``idx``/``gap`` when present); ``(x, y)`` tuples too.

    >>> sorted(as_batch((torch.zeros(2, 3), torch.zeros(2))))
    ['x', 'y']
    """
    if isinstance(batch, Mapping):
        return dict(batch)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return {"x": batch[0], "y": batch[1]}
    raise TypeError(f"a batch must be a mapping with keys x, y (idx, gap) or an (x, y) pair, got {type(batch).__name__}")


def batch_to(batch: Batch, device: torch.device, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Move a batch to ``device``; floating tensors are cast to ``dtype`` when given."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, dtype if (dtype is not None and v.is_floating_point()) else None, non_blocking=True)
        out[k] = v
    return out


def batch_len(batch: Batch) -> int:
    """The number of samples in a batch."""
    return int(batch["y"].shape[0] if "y" in batch else batch["x"].shape[0])


def reiterable(batches: Iterable) -> Iterable:
    """Batches that can be iterated more than once (a one-shot iterator is listed)."""
    return list(batches) if iter(batches) is batches else batches
