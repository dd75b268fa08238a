"""Hessian-vector products, trace estimators and Lanczos against the exact float64 Hessian."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from callbacks import (
    HessianOperator,
    hessian_top_eigenvalues,
    hessian_trace,
    hutchinson,
    hutchpp,
    lanczos_top_eigenvalues,
)


def _tiny_bn_net() -> nn.Module:
    # conv -> BN -> tanh -> linear: smooth, BN used with running statistics (eval mode)
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)).double()
    with torch.no_grad():  # non-trivial running statistics
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def _batches(n_sizes=(7, 5)):
    g = torch.Generator().manual_seed(2)
    return [{"x": torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64),
             "y": torch.randint(0, 3, (n,), generator=g), "gap": torch.rand(n, generator=g, dtype=torch.float64)}
            for n in n_sizes]


def _exact_hessian(net, batches):
    """The Hessian of the per-sample mean discounted CE, by torch.func.hessian on flat params."""
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    params = [net.get_parameter(n).detach() for n in names]
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    flat = torch.cat([p.reshape(-1) for p in params])
    total = sum(b["y"].shape[0] for b in batches)
    net.eval()

    def loss(f):
        d = {n: t.reshape(s) for n, t, s in zip(names, f.split(sizes), shapes)}
        out = 0.0
        for b in batches:
            logits = functional_call(net, d, (b["x"],))
            shifted = logits - F.one_hot(b["y"], 3) * b["gap"][:, None]
            out = out + F.cross_entropy(shifted, b["y"], reduction="sum")
        return out / total

    return torch.func.hessian(loss)(flat), names, sizes


@pytest.fixture(scope="module")
def setup():
    net, batches = _tiny_bn_net(), _batches()
    H, names, sizes = _exact_hessian(net, batches)
    return net, batches, H, names, sizes


@pytest.mark.parametrize("backend", ["func", "double_backward"])
def test_hvp_matches_exact_hessian(setup, backend):
    net, batches, H, _, _ = setup
    op = HessianOperator(net, None, batches, backend=backend, chunk_size=2)
    V = torch.randn(3, op.dim, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(V), V @ H, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(op.matvec(V[0]), V[0] @ H, atol=1e-12, rtol=1e-10)
    assert op.backend == backend and op.num_matvecs == 4


def test_hutchinson_trace_within_three_stderr_and_per_layer_sums(setup):
    net, batches, H, names, sizes = setup
    est = hessian_trace(net, None, batches, probes=200, seed=3, chunk_size=50)
    exact = H.trace().item()
    assert est.probes == 200 and est.stderr > 0
    assert abs(est.value - exact) <= 3 * est.stderr, (est.value, exact, est.stderr)
    assert sum(v for v, _ in est.per_layer.values()) == pytest.approx(est.value, rel=1e-12, abs=1e-12)
    # per-module traces vs the exact diagonal blocks
    diag, start, blocks = H.diagonal(), 0, {}
    for n, s in zip(names, sizes):
        key = n.rpartition(".")[0]
        blocks[key] = blocks.get(key, 0.0) + diag[start:start + s].sum().item()
        start += s
    assert set(blocks) == set(est.per_layer)
    for key, (value, se) in est.per_layer.items():
        assert abs(value - blocks[key]) <= 4 * se + 1e-12, (key, value, blocks[key], se)


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
    H, _, _ = _exact_hessian(net, [dict(b, gap=torch.zeros(2, dtype=torch.float64)) for b in batches])
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


def test_functions_leave_model_untouched(setup):
    net, batches, _, _, _ = setup
    net.train()
    before = copy.deepcopy(net.state_dict())
    hessian_trace(net, None, batches, probes=4)
    hessian_top_eigenvalues(net, None, batches, k=1, max_iter=5)
    HessianOperator(net, None, batches, bn_mode="train").matvec(torch.ones(sum(p.numel() for p in net.parameters()),
                                                                           dtype=torch.float64))
    assert net.training and all(m.training for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_arguments_are_named():
    net = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="method must be one of"):
        hessian_trace(net, "ce", [(torch.randn(2, 2), torch.tensor([0, 1]))], method="girard")
    with pytest.raises(ValueError, match="backend must be one of"):
        HessianOperator(net, "ce", [], backend="jax")
    with pytest.raises(ValueError, match="loss_fn: unknown criterion 'mse'"):
        HessianOperator(net, "mse", [])
    with pytest.raises(ValueError, match="hutch\\+\\+ needs probes >= 3"):
        hutchpp(lambda v: v, 3, 2, torch.Generator())
