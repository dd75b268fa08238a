"""Snapshot and restore: the whole model, BN statistics, BN mode, RNG."""
import random

import numpy as np
import torch
from torch import nn

from models import batchnorm_mode, preserved_batchnorm_stats, preserved_state
from models.state import get_rng_state, restore_batchnorm_stats, save_batchnorm_stats, set_rng_state


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))


def test_restore_undoes_dtype_changes_and_rebound_tensors():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    net(torch.randn(5, 3)).sum().backward()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    weight, grad, running_mean = net[0].weight, net[0].weight.grad, net[1].running_mean
    with preserved_state(net):
        net.double()
        net[1].running_mean = torch.full((4,), 7.0)
        net[0].weight = torch.nn.Parameter(torch.zeros(4, 3))
    after = net.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert net[0].weight is weight and net[1].running_mean is running_mean
    assert net[0].weight.grad is grad and grad.dtype == torch.float32


def test_preserved_state_restores_grads_modes_and_every_rng():
    net = _net().eval()
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    with preserved_state(net):
        net.train()
        net(torch.randn(8, 3)).sum().backward()  # grads appear, BN stats move, RNGs advance
        np.random.rand(3)
        random.random()
    assert not any(m.training for m in net.modules())
    assert all(p.grad is None for p in net.parameters())
    assert int(net[1].num_batches_tracked) == 0 and torch.equal(net[1].running_mean, torch.zeros(4))
    assert torch.equal(torch.get_rng_state(), states[0])
    assert (np.random.get_state()[1] == states[1]).all() and random.getstate() == states[2]


def test_batchnorm_stats_saved_and_restored_with_the_step_count():
    net = _net().train()
    net(torch.randn(8, 3))
    saved = save_batchnorm_stats(net)
    with preserved_batchnorm_stats(net):
        net(torch.randn(8, 3) * 5)
    assert torch.equal(net[1].running_mean, saved[0]) and int(net[1].num_batches_tracked) == 1
    net(torch.randn(8, 3))
    restore_batchnorm_stats(net, saved)
    assert all(torch.equal(a, b) for a, b in zip([net[1].running_mean, net[1].running_var,
                                                  net[1].num_batches_tracked], saved))


def test_batchnorm_mode_trains_only_the_batchnorms_and_restores_flags():
    net = _net().train()
    net[3].eval()  # a module with its own flag
    with batchnorm_mode(net, "train"):
        assert [m.training for m in net] == [False, True, False, False]
    assert [m.training for m in net] == [True, True, True, False]
    with batchnorm_mode(net, "eval"):
        assert not any(m.training for m in net.modules())


def test_rng_state_replays_dropout_masks():
    net = _net().train()
    x = torch.randn(8, 3)
    state = get_rng_state(torch.device("cpu"))
    first = net(x)
    set_rng_state(state, torch.device("cpu"))
    torch.testing.assert_close(net(x), first, rtol=0, atol=0)
