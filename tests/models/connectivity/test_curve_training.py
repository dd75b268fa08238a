"""A trained Bezier curve beats the straight line between the same endpoints (toy problem)."""

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import make_moons
from torch import nn
from torch.func import functional_call

from models import BezierCurve, LinearPath, evaluate_path, path_metrics, t_grid
from models.connectivity import parameters_of


def _endpoint(seed: int, x, y) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net


@pytest.fixture
def one_thread():
    # Tiny networks: two threads only add synchronisation (and stall on a busy CI machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_trained_bezier_has_lower_max_loss_than_the_line(one_thread):
    xs, ys = make_moons(400, noise=0.15, random_state=0)
    x, y = torch.tensor(xs, dtype=torch.float32), torch.tensor(ys)
    a, b = _endpoint(0, x, y), _endpoint(1, x, y)
    theta_a, theta_b = parameters_of(a), parameters_of(b)
    curve = BezierCurve(theta_a, theta_b, num_bends=1)
    opt = torch.optim.Adam(curve.parameters(), lr=0.02)
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):  # one t ~ U(0, 1) per step, functional_call on the unchanged base net
        t = float(torch.rand((), generator=gen))
        loss = F.cross_entropy(functional_call(a, curve.point(t), (x,)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ts = t_grid(21)
    data = {"train": [(x, y)]}

    def max_loss(path):
        recs = evaluate_path(a, path, data, ts)
        return path_metrics(ts, [r["train_loss"] for r in recs], [r["train_acc"] for r in recs])

    line, bez = max_loss(LinearPath(theta_a, theta_b)), max_loss(curve)
    endpoints = max(evaluate_path(a, curve, data, [0.0, 1.0])[i]["train_loss"] for i in (0, 1))
    assert line["max_loss"] > 2 * endpoints  # the straight line has a barrier here
    assert bez["max_loss"] < 0.5 * line["max_loss"]
    assert bez["loss_barrier"] < line["loss_barrier"] and bez["max_acc_loss"] < line["max_acc_loss"]
