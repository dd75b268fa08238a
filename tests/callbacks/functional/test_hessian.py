"""hessian_trace and hessian_top_eigenvalues (plain functions) against the exact float64 Hessian."""
import copy

import pytest
import torch
from torch import nn

from callbacks import (
    HessianOperator,
    hessian_top_eigenvalues,
    hessian_trace,
    hutchpp,
)


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
