"""Hessian-vector products, Hutchinson forms, Hutch++ and restarted Lanczos against exact answers."""
import itertools

import pytest
import torch
from torch import nn

from callbacks import (
    HessianOperator,
    hessian_top_eigenvalues,
    hessian_trace,
    hutchinson,
    hutchpp,
    lanczos_top_eigenvalues,
)
from models import hutchinson_forms
from tests.helpers import exact_hessian


@pytest.mark.parametrize("backend, reuse", [("func", False), ("double_backward", False), ("double_backward", True),
                                            ("auto", True)])
def test_hvp_matches_exact_hessian(setup, backend, reuse):
    net, batches, H, _, _ = setup
    op = HessianOperator(net, None, batches, backend=backend, chunk_size=2, reuse_graph=reuse)
    V = torch.randn(3, op.dim, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(V), V @ H, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(op.matvec(V[0]), V[0] @ H, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(op.matvec(V), V @ H, atol=1e-12, rtol=1e-10)  # a kept graph serves again
    assert op.backend == backend and op.num_matvecs == 7
    assert (op._graphs is not None) == reuse


def test_graphs_are_kept_only_for_a_single_batch_by_default(setup):
    net, batches, _, _, _ = setup
    assert not HessianOperator(net, None, batches).reuse_graph
    assert HessianOperator(net, None, batches[:1]).reuse_graph


def test_lanczos_top_eigenvalues_match_exact(setup):
    net, batches, H, _, _ = setup
    exact = torch.linalg.eigvalsh(H).flip(0)[:3]
    values, info = hessian_top_eigenvalues(net, None, batches, k=3, max_iter=200, tol=1e-10)
    torch.testing.assert_close(values, exact, rtol=1e-4, atol=0)
    assert info["iterations"] <= H.shape[0]


def test_lanczos_on_matrix_with_repeated_and_negative_eigenvalues():
    q, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64))
    lam = torch.cat([torch.tensor([4.0, 4.0, 2.5, -6.0]), torch.linspace(-1, 1, 26)]).double()
    A = q @ torch.diag(lam) @ q.T
    values, _ = lanczos_top_eigenvalues(lambda v: v @ A, 30, k=3, max_iter=30, tol=1e-10,
                                        dtype=torch.float64)
    # Krylov from one vector sees a repeated eigenvalue once; the restart finds its copy
    torch.testing.assert_close(values, torch.tensor([4.0, 4.0, 2.5], dtype=torch.float64), rtol=1e-6, atol=1e-8)


def test_hutchpp_exact_on_low_rank_hessian():
    # A linear softmax model on 2 samples: H = sum_i (x_i x_iᵀ) ⊗ (diag p_i - p_i p_iᵀ), rank <= 2·(K-1) = 4
    torch.manual_seed(4)
    net = nn.Linear(10, 3, bias=False).double()
    batches = [{"x": torch.randn(2, 10, dtype=torch.float64), "y": torch.tensor([0, 2])}]
    H, _, _ = exact_hessian(net, [dict(b, gap=torch.zeros(2, dtype=torch.float64)) for b in batches])
    assert torch.linalg.matrix_rank(H).item() <= 4
    est = hessian_trace(net, "ce", batches, probes=15, method="hutch++", seed=5)
    assert est.value == pytest.approx(H.trace().item(), rel=1e-10)
    assert est.stderr < 1e-10
    assert sum(v for v, _ in est.per_layer.values()) == pytest.approx(est.value, rel=1e-12)


def test_hutchinson_and_hutchpp_on_explicit_matrices():
    g = torch.Generator().manual_seed(0)
    A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    est = hutchinson(lambda V: V @ A, 5, 8, g, torch.float64)
    assert est.value == 15.0 and est.stderr == 0.0  # diagonal: every Rademacher form is exact
    B = torch.randn(40, 40, dtype=torch.float64, generator=g)
    B = B @ B.T
    runs = torch.tensor([hutchpp(lambda V: V @ B, 40, 30, g, torch.float64).value for _ in range(30)])
    # unbiased: the mean of 30 runs is within 4 of its standard errors of the trace
    assert abs(runs.mean() - B.trace()) <= 4 * runs.std() / 30 ** 0.5


def test_hutchinson_forms_hand_built():
    a = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, -1.0], [0.0, -1.0, 4.0]], dtype=torch.float64)
    w = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(0.5 * w @ a @ w, [w], create_graph=True)
    signs = [torch.tensor(s, dtype=torch.float64) for s in itertools.product([-1.0, 1.0], repeat=3)]
    values = hutchinson_forms([g], [w], probes=[[s] for s in signs])
    torch.testing.assert_close(values, torch.stack([s @ a @ s for s in signs]))  # vᵀ A v per probe
    torch.testing.assert_close(values.mean(), a.trace())  # all 8 sign vectors: the exact trace
    drawn = hutchinson_forms([g], [w], probes=5)
    assert drawn.shape == (5,) and all(float(v) in {float(s @ a @ s) for s in signs} for v in drawn)
    with pytest.raises(ValueError, match="probes"):
        hutchinson_forms([g], [w], probes=0)


def test_restarted_lanczos_with_a_small_basis_matches_exact(setup):
    net, batches, H, _, _ = setup
    exact = torch.linalg.eigvalsh(H).flip(0)[:1]
    values, info = hessian_top_eigenvalues(net, None, batches, k=1, max_iter=300, tol=1e-9, basis_size=4)
    torch.testing.assert_close(values, exact, rtol=1e-4, atol=0)
    assert info["basis_size"] == 4 and info["restarts"] >= 1  # the bound held and restarts happened


def test_restarted_lanczos_on_a_large_spread_spectrum():
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64, generator=g))
    lam = torch.cat([torch.tensor([10.0, 9.5, 9.0]), torch.rand(197, dtype=torch.float64, generator=g) * 8 - 4])
    A = q @ torch.diag(lam) @ q.T
    products = []

    def matvec(v):
        products.append(1)
        return v @ A

    values, info = lanczos_top_eigenvalues(matvec, 200, k=3, max_iter=2000, tol=1e-10, dtype=torch.float64,
                                           basis_size=8)
    torch.testing.assert_close(values, torch.tensor([10.0, 9.5, 9.0], dtype=torch.float64), rtol=1e-8, atol=0)
    assert info["restarts"] >= 1 and info["iterations"] == len(products)
    assert info["max_residual"] <= 1e-10 * 10.0


def test_lanczos_arguments_are_checked():
    with pytest.raises(ValueError, match=r"k: 5; allowed: an integer in \[1, 4\]"):
        lanczos_top_eigenvalues(lambda v: v, 4, k=5)
    with pytest.raises(ValueError, match=r"basis_size: 1; allowed: an integer >= 2"):
        lanczos_top_eigenvalues(lambda v: v, 4, k=1, basis_size=1)
