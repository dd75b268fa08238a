"""Paths: endpoints, the arc's midpoint, Bezier and chain points against their formulas by hand."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from marginboost.errors import ConfigError
from models import ArcPath, BezierCurve, LinearPath, PolygonalChain, make_path, t_grid
from models.connectivity import parameters_of


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


@pytest.mark.parametrize("kind", ["linear", "arc", "bezier", "chain"])
def test_endpoints_of_every_path_are_the_checkpoints(kind):
    a, b = _mlp(0), _mlp(1)
    path = make_path(kind, parameters_of(a), parameters_of(b), mu=0.3, num_bends=2)
    if kind in ("bezier", "chain"):  # bends moved off the line must not move the endpoints
        with torch.no_grad():
            for p in path.bends:
                p.add_(torch.randn_like(p))
    x = torch.randn(11, 5)
    for t, net in ((0.0, a), (1.0, b)):
        point = path.point(t)
        for n, p in net.named_parameters():
            assert torch.equal(point[n], p.detach()), (kind, t, n)
        assert torch.equal(functional_call(a, point, (x,)), net(x))


def test_arc_midpoint_formula():
    a = {"w": torch.randn(4, 3)}
    b = {"w": torch.randn(4, 3)}
    mu = {"w": torch.randn(4, 3)}
    expected = mu["w"] + (a["w"] - mu["w"]) / math.sqrt(2) + (b["w"] - mu["w"]) / math.sqrt(2)
    torch.testing.assert_close(ArcPath(a, b, mu).point(0.5)["w"], expected, rtol=0, atol=1e-6)
    # a scalar μ is the same value everywhere; μ = 0 by default
    torch.testing.assert_close(ArcPath(a, b).point(0.5)["w"], (a["w"] + b["w"]) / math.sqrt(2))


def test_linear_bezier_and_chain_against_hand_formulas():
    a, b = {"w": torch.randn(6)}, {"w": torch.randn(6)}
    t = 0.3
    torch.testing.assert_close(LinearPath(a, b).point(t)["w"], 0.7 * a["w"] + 0.3 * b["w"])
    bez = BezierCurve(a, b, num_bends=1)
    # initialised on the line: the quadratic curve through the midpoint is the straight line
    torch.testing.assert_close(bez.point(t)["w"], 0.7 * a["w"] + 0.3 * b["w"])
    theta1 = torch.randn(6)
    with torch.no_grad():
        bez.bends[0].copy_(theta1)
    quad = (1 - t) ** 2 * a["w"] + 2 * t * (1 - t) * theta1 + t**2 * b["w"]
    torch.testing.assert_close(bez.point(t)["w"], quad)
    chain = PolygonalChain(a, b, num_bends=1)
    with torch.no_grad():
        chain.bends[0].copy_(theta1)
    torch.testing.assert_close(chain.point(0.25)["w"], 0.5 * (a["w"] + theta1))
    torch.testing.assert_close(chain.point(0.5)["w"], theta1)
    torch.testing.assert_close(chain.point(0.75)["w"], 0.5 * (theta1 + b["w"]))


def test_cubic_bezier_and_frozen_names_follow_the_line():
    a = {"w": torch.randn(3), "frozen": torch.randn(3)}
    b = {"w": torch.randn(3), "frozen": torch.randn(3)}
    bez = BezierCurve(a, b, num_bends=2, trainable=["w"])
    assert len(bez.bends) == 2  # one tensor per bend, only for the trainable name
    t1, t2 = torch.randn(3), torch.randn(3)
    with torch.no_grad():
        bez.bends[0].copy_(t1)
        bez.bends[1].copy_(t2)
    t = 0.4
    cubic = (1 - t) ** 3 * a["w"] + 3 * t * (1 - t) ** 2 * t1 + 3 * t**2 * (1 - t) * t2 + t**3 * b["w"]
    torch.testing.assert_close(bez.point(t)["w"], cubic)
    torch.testing.assert_close(bez.point(t)["frozen"], torch.lerp(a["frozen"], b["frozen"], t))


def test_bad_input_is_a_config_error():
    a = {"w": torch.zeros(2)}
    with pytest.raises(ConfigError, match="path.kind: 'spline'"):
        make_path("spline", a, a)
    with pytest.raises(ConfigError, match="path.endpoints"):
        LinearPath(a, {"w": torch.zeros(3)})
    with pytest.raises(ConfigError, match="path.num_bends: 0"):
        BezierCurve(a, a, num_bends=0)
    with pytest.raises(ConfigError, match="path.grid_points"):
        t_grid(1)
    assert t_grid(21)[10] == 0.5 and len(t_grid(61)) == 61
