"""Plain-function forms of the measurements, usable without Lightning."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from models.losses import margins as margins_from_logits

from .distributed import gather_by_index


def _to(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def collect_margins(model: nn.Module, loader: Iterable[Mapping[str, Tensor]], num_total: int,
                    device: torch.device | str | None = None) -> Tensor:
    r"""Margins :math:`f_y - \max_{j\ne y} f_j` of every object, indexed by the batches' ``idx``.

    Runs the model in eval mode, fp32 (autocast off), and restores its train/eval mode. Under
    DDP each rank passes its shard and all receive the same full ``[num_total]`` tensor.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    values, indices = [], []
    try:
        with torch.autocast(device.type, enabled=False):
            for batch in loader:
                batch = _to(batch, device)
                logits = model(batch["x"]).float()
                values.append(margins_from_logits(logits, batch["y"]))
                indices.append(batch["idx"])
    finally:
        model.train(was_training)
    if not values:
        raise ValueError("collect_margins: the loader yielded no batches")
    return gather_by_index(torch.cat(values), torch.cat(indices), num_total)
