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
    hutchpp,
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
    with pytest.raises(ValueError, match=r"method: 'girard'; allowed: 'hutchinson', 'hutch\+\+'"):
        hessian_trace(net, "ce", [(torch.randn(2, 2), torch.tensor([0, 1]))], method="girard")
    with pytest.raises(ValueError, match=r"backend: 'jax'; allowed: 'auto', 'func', 'double_backward'"):
        HessianOperator(net, "ce", [], backend="jax")
    with pytest.raises(ValueError, match=r"loss_fn: 'mse'; allowed: 'ce', 'discounted_ce' or a callable"):
        HessianOperator(net, "mse", [])
    with pytest.raises(ValueError, match=r"probes: 2; allowed: an integer >= 3"):
        hutchpp(lambda v: v, 3, 2, torch.Generator())
