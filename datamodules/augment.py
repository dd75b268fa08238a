"""Crop-and-flip augmentation as a pure function of its random parameters.

Drawing the parameters (:func:`sample_crop_flip`) is separate from applying them
(:func:`crop_flip`), so the per-sample CPU path and a batched accelerator path produce the same
images from the same draws.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_crop_flip(n: int, pad: int, flip: bool, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Draw ``offsets [n, 2]`` uniform in ``[0, 2·pad]`` and ``flips [n]`` (bool, p=0.5 if ``flip``)."""
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator, device=device)
    flips = torch.rand(n, generator=generator, device=device) < 0.5
    if not flip:
        flips = torch.zeros_like(flips)
    return offsets, flips


def crop_flip(images: Tensor, offsets: Tensor, flips: Tensor, pad: int) -> Tensor:
    """Zero-pad ``images [B, C, H, W]`` by ``pad``, crop ``H×W`` at ``offsets``, mirror where ``flips``.

    Same semantics as torchvision's ``RandomCrop(size, padding=pad)`` followed by
    ``RandomHorizontalFlip`` on unnormalised pixels.
    """
    if pad == 0 and not flips.is_cuda and not bool(flips.any()):  # no host sync on an accelerator
        return images
    b, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    rows = offsets[:, 0, None] + torch.arange(h, device=images.device)  # [B, H]
    cols = offsets[:, 1, None] + torch.arange(w, device=images.device)  # [B, W]
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=images.device)[:, None, None, None]
    ci = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def normalize(images: Tensor, mean: Tensor | None, std: Tensor | None) -> Tensor:
    """uint8 pixels to float in [0, 1], then ``(x - mean) / std`` per channel (dim 1 of a batch)."""
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    if mean is not None:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        x = (x - mean.to(x.device).view(shape)) / std.to(x.device).view(shape)
    return x
