"""Parameters by regex (the one naming convention) and the global norm."""
import pytest
import torch
from torch import nn

from marginboost import ConfigError
from models import global_norm, match_parameters


def test_global_norm_hand_built():
    assert float(global_norm([torch.tensor([3.0]), torch.tensor([4.0])])) == 5.0
    assert float(global_norm([torch.tensor([3.0]), torch.tensor([4.0])], squared=True)) == 25.0
    # half precision accumulates in float32: 300² overflows float16, not the result
    half = [torch.full((4,), 300.0, dtype=torch.float16)]
    assert float(global_norm(half)) == pytest.approx(600.0)
    # differentiable: d‖w‖/dw = w/‖w‖
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    (g,) = torch.autograd.grad(global_norm([w]), [w])
    torch.testing.assert_close(g, torch.tensor([0.6, 0.8]))


def test_match_parameters_regex_search_in_model_order():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 2))
    assert [n for n, _ in match_parameters(net, None, "f")] == ["0.weight", "0.bias", "1.weight", "1.bias",
                                                                 "2.weight", "2.bias"]
    assert [n for n, _ in match_parameters(net, ["2\\.", "^0\\.weight$"], "f")] == ["0.weight", "2.weight",
                                                                                  "2.bias"]
    net[0].weight.requires_grad_(False)
    assert [n for n, _ in match_parameters(net, "weight", "f")] == ["1.weight", "2.weight"]


@pytest.mark.parametrize("patterns, match", [
    ("nothing_here", r"model\.perturb_params: 'nothing_here'; allowed: regular expressions matching"),
    ("(", r"model\.perturb_params: '\('; allowed: a valid regular expression"),
    ([], r"model\.perturb_params: \[\]; allowed: a list of regular expressions"),
])
def test_match_parameters_errors_name_the_field(patterns, match):
    with pytest.raises(ConfigError, match=match):
        match_parameters(nn.Linear(2, 2), patterns, "model.perturb_params")
