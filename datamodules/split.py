"""``Split``: the tensors of one part (train, val or test) of a data set."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Split:
    """Inputs (uint8 images ``[N, C, H, W]`` or float features ``[N, ...]``) and labels ``[N]``."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return self.y.shape[0]
