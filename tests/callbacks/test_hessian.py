"""HessianTrace / HessianEigenvalues callbacks against the exact float64 Hessian of the same data."""

import copy

import pytest
import torch
from torch.func import functional_call

from callbacks import HessianEigenvalues, HessianTrace
from datamodules import DigitsDataModule
from models import MarginClassifier, discounted_cross_entropy


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    dm = DigitsDataModule(eval_batch_size=40)
    dm.setup()
    dm.set_gaps(torch.rand(dm.num_train))  # the criterion must include the gaps
    model = MarginClassifier(num_classes=10, input_shape=(1, 8, 8), backbone="mlp",
                             backbone_kwargs={"width": 4, "depth": 1}, head_seed=0).double()
    with torch.no_grad():  # running statistics that are not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    # the seeded subset, rebuilt by hand: 1 batch of 40 from randperm(seed 7)
    ds = dm.train_eval_dataloader(distributed=False).dataset
    idx = torch.randperm(dm.num_train, generator=torch.Generator().manual_seed(7))[:40].tolist()
    x = torch.stack([ds[i]["x"] for i in idx]).double()
    y = torch.stack([ds[i]["y"] for i in idx])
    gap = torch.stack([ds[i]["gap"] for i in idx]).double()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [model.get_parameter(n).detach() for n in names]
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    model.eval()

    def loss(flat):
        d = {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        return discounted_cross_entropy(functional_call(model, d, (x,)), y, gap)

    H = torch.func.hessian(loss)(torch.cat([p.reshape(-1) for p in params]))
    model.train()
    return dm, model, H


def test_trace_callback_matches_exact_hessian(problem):
    dm, model, H = problem
    cb = HessianTrace(probes=96, chunk_size=32, num_batches=1, seed=7)
    out = cb.measure_now(None, model, datamodule=dm)
    exact = H.trace().item()
    assert abs(out["trace"].value - exact) <= 3 * out["trace"].stderr, (out["trace"].value, exact)
    layers = [v.value for k, v in out.items() if k.startswith("trace_layer/")]
    assert len(layers) == 2 and sum(layers) == pytest.approx(out["trace"].value, rel=1e-9)
    rec = cb.history[0]
    assert rec["probes"] == 96 and rec["method"] == "hutchinson" and rec["bn_mode"] == "eval"
    assert rec["dtype"] == "float64" and rec["num_samples"] == 40 and rec["criterion"] == "discounted_ce"
    assert rec["stderr"] == out["trace"].stderr
    hpp = HessianTrace(probes=30, method="hutch++", num_batches=1, seed=7).measure_now(None, model, datamodule=dm)
    assert abs(hpp["trace"].value - exact) <= 3 * hpp["trace"].stderr + 1e-9


def test_eigenvalue_callback_matches_exact_hessian(problem):
    dm, model, H = problem
    cb = HessianEigenvalues(k=2, max_iter=H.shape[0], lanczos_tol=1e-10, num_batches=1, seed=7)
    out = cb.measure_now(None, model, datamodule=dm)
    exact = torch.linalg.eigvalsh(H).flip(0)[:2]
    assert out["eig1"].value == pytest.approx(exact[0].item(), rel=1e-4)
    assert out["eig2"].value == pytest.approx(exact[1].item(), rel=1e-4)


def test_normalized_trace_ignores_the_scale_of_invariant_weights(problem):
    dm, model, _ = problem
    scaled = copy.deepcopy(model)
    with torch.no_grad():  # the same function in eval mode: weight x10, BN statistics to match
        scaled.backbone[1].weight.mul_(10.0)
        scaled.backbone[2].running_mean.mul_(10.0)
        scaled.backbone[2].running_var.mul_(100.0)
    kw = dict(probes=8, num_batches=1, seed=7, per_layer=False)
    a = HessianTrace(normalize=True, **kw).measure_now(None, model, datamodule=dm)["trace"].value
    b = HessianTrace(normalize=True, **kw).measure_now(None, scaled, datamodule=dm)["trace"].value
    assert b == pytest.approx(a, rel=1e-6)
    raw_a = HessianTrace(**kw).measure_now(None, model, datamodule=dm)["trace"].value
    raw_b = HessianTrace(**kw).measure_now(None, scaled, datamodule=dm)["trace"].value
    assert abs(raw_b - raw_a) > 0.01 * abs(raw_a)


def test_bad_hessian_settings_name_the_field():
    with pytest.raises(ValueError, match=r"HessianTrace.probes: 1; allowed: an integer >= 2"):
        HessianTrace(probes=1)
    with pytest.raises(ValueError, match=r"HessianTrace.method: 'girard'; allowed: 'hutchinson', 'hutch\+\+'"):
        HessianTrace(method="girard")
    with pytest.raises(ValueError, match=r"HessianTrace.probes: 2; allowed: an integer >= 3"):
        HessianTrace(method="hutch++", probes=2)
    with pytest.raises(ValueError, match=r"HessianEigenvalues.max_iter: 3; allowed: an integer >= 5"):
        HessianEigenvalues(k=5, max_iter=3)
    with pytest.raises(ValueError, match=r"HessianEigenvalues.backend: 'jax'; allowed: 'auto', 'func', 'double_backward'"):
        HessianEigenvalues(backend="jax")
