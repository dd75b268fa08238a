"""Normalized margins: exact distances for linear models, total variation, quartiles/fences/moments."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from callbacks import NormalizedMargins, margin_distribution_features, normalized_layer_margins
from datamodules import Toy2DDataModule
from models import MarginClassifier


def _crossing_distance(f, x, y, u, t_max=50.0, iters=50):
    """Smallest t along direction ``u`` at which ``argmax f(x + t u) != y`` (bisection), or inf."""
    def wrong(t):
        return int(f(x + t * u).argmax()) != y
    if not wrong(t_max):
        return math.inf
    lo, hi = 0.0, t_max
    # a linear model's region is convex: along a ray the label changes exactly once
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if wrong(mid) else (mid, hi)
    return hi


def test_linear_model_margin_is_the_exact_distance_to_the_decision_boundary():
    torch.manual_seed(0)
    net = nn.Linear(3, 4).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    with torch.no_grad():
        y = net(x).argmax(1)  # correctly classified points: positive distances
    d = normalized_layer_margins(net, [{"x": x, "y": y}], ["input"]).distances["input"]

    def f(z):
        with torch.no_grad():
            return net(z[None])[0]
    gen = torch.Generator().manual_seed(1)
    for i in range(len(x)):
        # no boundary point is closer than d (random directions), and the nearest one is at d:
        # moving d·(1 ± 1e-6) along the normal of the nearest boundary crosses exactly there
        rays = [_crossing_distance(f, x[i], int(y[i]), u / u.norm())
                for u in torch.randn(24, 3, generator=gen, dtype=torch.float64)]
        assert min(rays) >= float(d[i]) * (1 - 1e-9)
        w = net.weight.detach()
        logits = f(x[i])
        normals = [(j, (w[y[i]] - w[j])) for j in range(4) if j != y[i]]
        j, n = min(normals, key=lambda jn: float((logits[y[i]] - logits[jn[0]]) / jn[1].norm()))
        best = _crossing_distance(f, x[i], int(y[i]), -n / n.norm())
        assert best == pytest.approx(float(d[i]), rel=1e-9)


def test_hidden_layer_distance_total_variation_and_scale_invariance():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.randn(30, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    r = normalized_layer_margins(net, [{"x": x[:17], "y": y[:17]}, {"x": x[17:], "y": y[17:]}], ["1", "output"])
    with torch.no_grad():
        h = torch.relu(net[0](x))
        logits = net[2](h)
    w = net[2].weight.detach()
    expected = torch.stack([min((logits[i, y[i]] - logits[i, j]) / (w[y[i]] - w[j]).norm()
                                for j in range(3) if j != y[i]) for i in range(30)])
    assert torch.allclose(r.distances["1"], expected, atol=1e-12)
    out = torch.stack([min((logits[i, y[i]] - logits[i, j]) / math.sqrt(2) for j in range(3) if j != y[i])
                       for i in range(30)])
    assert torch.allclose(r.distances["output"], out, atol=1e-12)
    tv = math.sqrt(np.var(h.numpy(), axis=0, ddof=1).sum())
    assert r.total_variation["1"] == pytest.approx(tv, rel=1e-12)
    assert torch.allclose(r.normalized["1"], expected / tv, atol=1e-12)
    # scaling the hidden layer by c (and the next weights by 1/c) keeps the function and the
    # normalized margin; the unnormalized distance scales by c
    with torch.no_grad():
        net[0].weight.mul_(5.0)
        net[0].bias.mul_(5.0)
        net[2].weight.div_(5.0)
    r5 = normalized_layer_margins(net, [{"x": x, "y": y}], ["1"])
    assert torch.allclose(r5.distances["1"], 5 * expected, atol=1e-10)
    assert torch.allclose(r5.normalized["1"], r.normalized["1"], atol=1e-12)


def test_unknown_layer_is_an_error():
    with pytest.raises(ValueError, match="not a module"):
        normalized_layer_margins(nn.Linear(2, 2), [{"x": torch.zeros(1, 2), "y": torch.zeros(1).long()}], ["nope"])


def test_quartiles_fences_and_moments_by_hand():
    d = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 100.0])
    f = margin_distribution_features(d)
    # linear-interpolation quantiles of 9 sorted values: positions 2, 4, 6
    assert (f["q1"], f["median"], f["q3"]) == (3.0, 5.0, 7.0)
    assert f["iqr"] == 4.0 and f["lower_fence"] == 3.0 - 6.0 and f["upper_fence"] == 7.0 + 6.0
    mean = sum(d.tolist()) / 9
    var = sum((v - mean) ** 2 for v in d.tolist()) / 9
    skew = sum((v - mean) ** 3 for v in d.tolist()) / 9 / var ** 1.5
    kurt = sum((v - mean) ** 4 for v in d.tolist()) / 9 / var ** 2 - 3
    assert f["mean"] == pytest.approx(mean) and f["skewness"] == pytest.approx(skew)
    assert f["kurtosis"] == pytest.approx(kurt)
    assert f["std"] == pytest.approx(math.sqrt(var * 9 / 8))
    f2 = margin_distribution_features(torch.tensor([0.25, 0.5, 0.75, 1.0]))  # positions 0.75, 1.5, 2.25
    assert (f2["q1"], f2["median"], f2["q3"]) == pytest.approx((0.4375, 0.625, 0.8125))


def test_callback_matches_the_function_and_leaves_the_model_unchanged():
    torch.manual_seed(0)
    dm = Toy2DDataModule(num_train=40, num_val=10, batch_size=8)
    dm.setup()
    model = MarginClassifier(num_classes=2, input_shape=(2,), backbone="mlp", backbone_kwargs={"width": 8})
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cb = NormalizedMargins(every_n_epochs=None, progress=False)
    res = cb.measure_now(None, model, datamodule=dm)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    layers = ["backbone.3", "backbone.6", "head.bn", "output"]
    assert cb.resolved_layers(model) == layers
    direct = normalized_layer_margins(model, dm.train_eval_dataloader(), layers, num_total=40)
    for layer in layers:
        expected = margin_distribution_features(direct.normalized[layer])
        assert res[f"{layer.replace('.', '_')}/median"].value == pytest.approx(expected["median"], rel=1e-6)
        assert res[f"{layer.replace('.', '_')}/total_variation"].value == pytest.approx(
            direct.total_variation[layer], rel=1e-6)
