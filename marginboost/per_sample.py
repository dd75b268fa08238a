"""One pass over a loader that places per-sample outputs by the batches' ``idx``.

Shared by the margin measurements and the boosting loop: every object of the training set gets
its value exactly once, also under DDP (see :func:`~marginboost.distributed.gather_by_index`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from .batches import batch_to
from .distributed import gather_by_index


@torch.no_grad()
def per_sample_outputs(model: nn.Module, loader: Iterable[Mapping[str, Tensor]], num_total: int,
                       outputs: Callable[[Tensor, Mapping[str, Tensor]], tuple[Tensor, ...]],
                       device: torch.device | str | None = None) -> tuple[Tensor, ...]:
    """One eval-mode, fp32 (autocast off) pass; ``outputs(logits, batch)`` per batch, placed by ``idx``.

    Restores the model's train/eval mode. Under DDP each rank passes its shard and every rank
    receives the same full ``[num_total, ...]`` tensors.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts, indices = [], []
    try:
        with torch.autocast(device.type, enabled=False):
            for batch in loader:
                batch = batch_to(batch, device)
                parts.append(outputs(model(batch["x"]).float(), batch))
                indices.append(batch["idx"])
    finally:
        model.train(was_training)
    if not parts:
        raise ValueError("per_sample_outputs: the loader yielded no batches")
    idx = torch.cat(indices)
    return tuple(gather_by_index(torch.cat(column), idx, num_total) for column in zip(*parts))


def collect_logits(model: nn.Module, loader: Iterable[Mapping[str, Tensor]], num_total: int,
                   device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """fp32 logits ``[num_total, K]`` and labels ``[num_total]`` of every object, by ``idx``."""
    return per_sample_outputs(model, loader, num_total, lambda logits, b: (logits, b["y"]), device)
