"""Head initialisations by their defining properties."""
import pytest
import torch

from models import head_weight


def test_head_inits():
    g = torch.Generator().manual_seed(3)
    w = head_weight(10, 32, "orthogonal", generator=g).double()
    torch.testing.assert_close(w @ w.T, torch.eye(10, dtype=torch.float64), atol=1e-6, rtol=0)
    etf = head_weight(10, 32, "simplex_etf", generator=g).double()
    gram = etf @ etf.T
    torch.testing.assert_close(gram.diagonal(), torch.ones(10, dtype=torch.float64), atol=1e-6, rtol=0)
    off = gram[~torch.eye(10, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1 / 9), atol=1e-6, rtol=0)
    k = head_weight(10, 5000, "kaiming", generator=g)
    assert abs(k.var().item() - 2 / 5000) < 2e-5
    a = head_weight(4, 8, generator=torch.Generator().manual_seed(1))
    b = head_weight(4, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="head_init"):
        head_weight(3, 4, "xavier")
    with pytest.raises(ValueError, match="simplex_etf"):
        head_weight(10, 5, "simplex_etf")
