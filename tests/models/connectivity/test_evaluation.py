"""Evaluation along paths: BN reset against statistics computed by hand, metrics by hand."""

import pytest
import torch
from torch import nn

from marginboost.errors import ConfigError
from models import LinearPath, evaluate_path, path_metrics, reset_bn_statistics
from models.connectivity import parameters_of


def _bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3))
    net.train()
    for _ in range(3):  # non-trivial running statistics that the reset must replace
        net(torch.randn(16, 4) * 3 + 1)
    return net


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_bn_reset_gives_the_statistics_of_a_fresh_pass():
    a, b = _bn_net(0), _bn_net(1)
    path = LinearPath(parameters_of(a), parameters_of(b))
    batches = [torch.randn(10, 4) * 2 - 1 for _ in range(4)]  # equal sizes
    before = _state(a)
    a.eval()
    params = path.point(0.3)
    buffers = reset_bn_statistics(a, params, batches)
    # By hand: pre-BN activations of the interpolated first layer, batch by batch.
    w, bias = params["0.weight"], params["0.bias"]
    pre = [x @ w.T + bias for x in batches]
    torch.testing.assert_close(buffers["1.running_mean"], torch.stack([p.mean(0) for p in pre]).mean(0))
    torch.testing.assert_close(buffers["1.running_var"], torch.stack([p.var(0, unbiased=True) for p in pre]).mean(0))
    torch.testing.assert_close(buffers["1.running_mean"], torch.cat(pre).mean(0))  # equal batch sizes: exact mean
    assert int(buffers["1.num_batches_tracked"]) == 4
    # the model is left as it was: buffers, momentum, mode
    after = _state(a)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert a[1].momentum == 0.1 and not a.training and not a[1].training


def test_evaluate_path_uses_the_reset_and_leaves_the_model_alone():
    a, b = _bn_net(0), _bn_net(1)
    a.train()
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    loaders = {"test": [(x[:20], y[:20]), (x[20:], y[20:])]}
    bn_loader = [torch.randn(20, 4) for _ in range(2)]
    before = _state(a)
    recs = evaluate_path(a, LinearPath(parameters_of(a), parameters_of(b)), loaders, [0.0, 0.5, 1.0],
                         bn_loader=bn_loader)
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items()) and a.training
    # at t = 1 with fresh statistics, the result is B's own network with those statistics
    b.eval()
    b_fresh = reset_bn_statistics(b, parameters_of(b), bn_loader)
    b.load_state_dict(b_fresh, strict=False)
    logits = b(x)
    expected = torch.nn.functional.cross_entropy(logits, y).item()
    assert recs[-1]["test_loss"] == pytest.approx(expected, rel=1e-5)
    assert recs[-1]["test_acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    with pytest.raises(ConfigError, match="bn_loader"):
        evaluate_path(a, LinearPath(parameters_of(a), parameters_of(b)), loaders, [0.0, 1.0])


def test_path_metrics_by_hand():
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    acc = [0.90, 0.80, 0.60, 0.85, 0.94]
    loss = [0.2, 0.5, 1.0, 0.4, 0.6]
    m = path_metrics(ts, loss, acc)
    assert m["max_acc_loss"] == pytest.approx((0.92 - 0.60) * 100)
    # barrier: L(t) − ((1−t)·0.2 + t·0.6) = 0, 0.2, 0.6, −0.1, 0 → 0.6
    assert m["loss_barrier"] == pytest.approx(0.6)
    # trapezoid: 0.25·(0.35 + 0.75 + 0.7 + 0.5) = 0.575
    assert m["integral"] == pytest.approx(0.575)
    with pytest.raises(ConfigError, match="path_metrics.ts"):
        path_metrics([0.0, 0.5], [1, 2], [1, 2])
