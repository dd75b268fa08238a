"""The classifier head ``W ∘ BN``: a BatchNorm without affine, then a (frozen) linear map.

With ``W`` trainable the network could scale its logits up until any gap is meaningless;
freezing ``W`` and dropping the BN affine keeps the logit scale bounded.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from marginboost.errors import ConfigError, check_choice

HEAD_INITS = ("orthogonal", "kaiming", "simplex_etf")


def head_weight(num_classes: int, in_features: int, init: str = "orthogonal",
                scale: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """A ``[K, D]`` head matrix.

    * ``orthogonal``: orthonormal rows (columns if ``K > D``), times ``scale``.
    * ``kaiming``: ``N(0, 2/D)`` entries (Kaiming normal, fan-in), times ``scale``.
    * ``simplex_etf``: the simplex equiangular tight frame
      ``sqrt(K/(K-1)) · (I_K - 11ᵀ/K) Uᵀ`` with ``U ∈ R^{D×K}`` orthonormal columns: unit rows,
      pairwise cosine ``-1/(K-1)``; needs ``D >= K``.
    """
    check_choice("model.head_init", init, HEAD_INITS)
    K, D = num_classes, in_features
    if init == "orthogonal":
        a = torch.randn(max(K, D), min(K, D), generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(a)
        q = q * torch.sign(torch.diagonal(r))  # unique, uniformly distributed factor
        w = q.T if K <= D else q  # [K, D]
    elif init == "kaiming":
        w = torch.randn(K, D, generator=generator, dtype=torch.float64) * math.sqrt(2.0 / D)
    else:
        if D < K:
            raise ConfigError("model.head_init", init, f"orthogonal or kaiming when the feature dimension D={D} is "
                              f"below num_classes K={K} (simplex_etf needs D >= K)")
        u, _ = torch.linalg.qr(torch.randn(D, K, generator=generator, dtype=torch.float64))
        centred = torch.eye(K, dtype=torch.float64) - 1.0 / K
        w = math.sqrt(K / (K - 1)) * centred @ u.T
    return (scale * w).float()


class MarginHead(nn.Module):
    """``BatchNorm1d(D, affine=False)`` followed by a bias-free linear map ``W`` (``[K, D]``)."""

    def __init__(self, in_features: int, num_classes: int, init: str = "orthogonal",
                 scale: float = 1.0, frozen: bool = True, seed: int | None = None) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features, affine=False)
        self.linear = nn.Linear(in_features, num_classes, bias=False)
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.linear.weight.copy_(head_weight(num_classes, in_features, init, scale, gen))
        self.linear.weight.requires_grad_(not frozen)

    @property
    def weight(self) -> Tensor:
        return self.linear.weight

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(self.bn(features))
