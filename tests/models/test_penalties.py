"""CurvaturePenaltyClassifier and composite BatchNorm, against finite differences."""
import copy

import lightning as L
import pytest
import torch
from torch.func import functional_call
from torch.utils.data import DataLoader

from models import (
    CurvaturePenaltyClassifier,
    MarginClassifier,
    composite_batchnorm,
    discounted_cross_entropy,
    global_norm,
    hutchinson_forms,
)

DIM, K, BS = 3, 3, 6


def make_batches(n: int = 1, seed: int = 0, dtype=torch.float32) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(BS, DIM, generator=g, dtype=dtype), "y": torch.randint(0, K, (BS,), generator=g),
             "idx": torch.arange(BS), "gap": 0.5 * torch.rand(BS, generator=g, dtype=dtype)} for _ in range(n)]


def build(cls=CurvaturePenaltyClassifier, lr=1.0, momentum=0.0, **kw):
    torch.manual_seed(0)
    return cls(num_classes=K, input_shape=(DIM,), backbone="mlp", backbone_kwargs={"width": 4, "depth": 1},
               head_seed=0, optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum), **kw)


def fit(model, batches, **trainer_kw):
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, **trainer_kw)
    trainer.fit(model, DataLoader(batches, batch_size=None))
    return trainer


def objective(model, names, batch, gn_weight=0.0, squared=False, trace_weight=0.0, probes=None, graph=True):
    """J(θ) = L + λ_g ‖∇L‖^p + λ_t mean_j v_jᵀ H v_j, as a function of the parameter list ``names``."""
    def J(*theta):
        params = dict(zip(names, theta))
        with composite_batchnorm(model):  # fused BN has wrong third derivatives (pytorch#186256)
            logits = functional_call(model, params, (batch["x"],))
        loss = discounted_cross_entropy(logits, batch["y"], batch["gap"])
        if not gn_weight and not trace_weight:
            return loss
        grads = torch.autograd.grad(loss, theta, create_graph=True)
        out = loss
        if gn_weight:
            out = out + gn_weight * global_norm(grads, squared)
        if trace_weight:
            out = out + trace_weight * hutchinson_forms(grads, theta, probes, create_graph=graph).mean()
        return out
    return J


def central_differences(J, theta, h=1e-6):
    out = []
    for j, t in enumerate(theta):
        g = torch.zeros_like(t)
        for i in range(t.numel()):
            plus, minus = [x.detach().clone() for x in theta], [x.detach().clone() for x in theta]
            plus[j].view(-1)[i] += h
            minus[j].view(-1)[i] -= h
            value = J(*[x.requires_grad_(True) for x in plus]) - J(*[x.requires_grad_(True) for x in minus])
            g.view(-1)[i] = value.detach() / (2 * h)
        out.append(g)
    return out


def tiny_float64():
    model = build(MarginClassifier).double().train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    theta = [model.get_parameter(n).detach().clone().requires_grad_(True) for n in names]
    return model, names, theta, make_batches(1, dtype=torch.float64)[0]


def step_gradient(accumulate=1, n_batches=1, **opts):
    model = build(accumulate_grad_batches=accumulate, **opts)
    fixed = {}

    def probes(params):  # fixed probes, so that the reference sees the same ones
        gen = torch.Generator().manual_seed(7)
        fixed["p"] = [[torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1 for p in params]
                      for _ in range(model.trace_probes)]
        return fixed["p"]

    model.draw_probes = probes
    before = copy.deepcopy(model).double()
    batches = make_batches(n_batches)
    fit(model, batches, precision="64-true")
    names = [n for n, p in before.named_parameters() if p.requires_grad]
    step = [before.get_parameter(n).detach() - model.get_parameter(n).detach() for n in names]
    return before, names, batches, step, fixed.get("p")


def reference_gradient(before, names, batch, probes=None, **weights):
    theta = [before.get_parameter(n).detach().clone().requires_grad_(True) for n in names]
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    J = objective(copy.deepcopy(before).train(), names, batch, probes=probes, **weights)
    return torch.autograd.grad(J(*theta), theta)


@pytest.mark.parametrize("squared", [False, True])
def test_exact_gradient_norm_penalty_gradient_matches_finite_differences(squared):
    model, names, theta, batch = tiny_float64()
    J = objective(model, names, batch, gn_weight=0.3, squared=squared)
    exact = torch.autograd.grad(J(*theta), theta)
    for e, f in zip(exact, central_differences(J, theta)):
        torch.testing.assert_close(e, f, rtol=1e-5, atol=1e-7)


def test_trace_penalty_gradient_matches_finite_differences():
    model, names, theta, batch = tiny_float64()
    gen = torch.Generator().manual_seed(5)
    probes = [[torch.randint(0, 2, t.shape, generator=gen).double() * 2 - 1 for t in theta] for _ in range(2)]
    J = objective(model, names, batch, trace_weight=0.2, probes=probes)
    exact = torch.autograd.grad(J(*theta), theta)  # third-order autograd
    assert max(float(e.abs().max()) for e in exact) > 0
    for e, f in zip(exact, central_differences(J, theta)):
        torch.testing.assert_close(e, f, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape,momentum", [((6, 4), 0.1), ((5, 3, 2, 2), None)])
def test_composite_batchnorm_matches_native(shape, momentum):
    x = torch.randn(*shape, dtype=torch.float64)
    bn = torch.nn.BatchNorm1d(shape[1]) if len(shape) == 2 else torch.nn.BatchNorm2d(shape[1])
    bn = bn.double()
    bn.momentum = momentum
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    twin = copy.deepcopy(bn)
    for _ in range(2):
        want = bn(x)
        with composite_batchnorm(twin):
            got = twin(x)
        torch.testing.assert_close(got, want)
    for name, buf in bn.named_buffers():
        torch.testing.assert_close(twin.get_buffer(name), buf)
    assert "forward" not in vars(twin)  # restored
    bn.eval(), twin.eval()
    with composite_batchnorm(twin):
        torch.testing.assert_close(twin(x), bn(x))


@pytest.mark.parametrize("opts,weights,tol", [
    ({"grad_norm_weight": 0.3, "grad_norm_form": "exact"}, {"gn_weight": 0.3}, 1e-10),
    ({"grad_norm_weight": 0.3, "grad_norm_form": "exact", "grad_norm_squared": True},
     {"gn_weight": 0.3, "squared": True}, 1e-10),
    ({"trace_weight": 0.2, "trace_probes": 2}, {"trace_weight": 0.2}, 1e-10),
    # the finite-difference form approximates the exact gradient to O(r)
    ({"grad_norm_weight": 0.3, "grad_norm_radius": 1e-6}, {"gn_weight": 0.3}, 1e-4),
    ({"grad_norm_weight": 0.3, "grad_norm_radius": 1e-6, "grad_norm_squared": True},
     {"gn_weight": 0.3, "squared": True}, 1e-4),
    ({"grad_norm_weight": 0.3, "grad_norm_radius": 1e-6, "trace_weight": 0.2},
     {"gn_weight": 0.3, "trace_weight": 0.2}, 1e-4),
])
def test_classifier_step_follows_gradient_of_penalised_objective(opts, weights, tol):
    before, names, batches, step, probes = step_gradient(**opts)
    ref = reference_gradient(before, names, batches[0], probes=probes, **weights)
    plain = reference_gradient(before, names, batches[0])
    for n, s, r in zip(names, step, ref):
        torch.testing.assert_close(s, r, rtol=tol, atol=tol, msg=n)
    assert max(float((r - p).abs().max()) for r, p in zip(ref, plain)) > 1e-3  # the penalty matters


def test_penalties_with_gradient_accumulation_average_micro_batch_objectives():
    opts = {"grad_norm_weight": 0.3, "grad_norm_form": "exact"}
    before, names, batches, step, _ = step_gradient(accumulate=2, n_batches=2, **opts)
    refs = [reference_gradient(before, names, b, gn_weight=0.3) for b in batches]
    for s, r1, r2 in zip(step, *refs):
        torch.testing.assert_close(s, (r1 + r2) / 2, rtol=1e-10, atol=1e-10)


def test_finite_difference_form_keeps_first_pass_batchnorm_statistics():
    batch = make_batches(1)[0]
    model = build(grad_norm_weight=0.1, grad_norm_radius=0.5)
    ref = copy.deepcopy(model).train()
    fit(model, [batch])
    with torch.no_grad():
        ref(batch["x"])
    for name in ("backbone.2", "head.bn"):
        got, want = model.get_submodule(name), ref.get_submodule(name)
        assert torch.equal(got.running_mean, want.running_mean) and torch.equal(got.running_var, want.running_var)
        assert int(got.num_batches_tracked) == 1


def test_zero_weights_reproduce_the_base_optimizer():
    data = make_batches(3)
    base = build(MarginClassifier, lr=0.1, momentum=0.9)
    fit(base, data)
    pen = build(lr=0.1, momentum=0.9, grad_norm_weight=0.0, trace_weight=0.0)
    fit(pen, data)
    for k, v in base.state_dict().items():
        assert torch.equal(v, pen.state_dict()[k]), k


@pytest.mark.parametrize("kwargs,match", [
    ({"grad_norm_weight": -1.0}, "model.grad_norm_weight"),
    ({"trace_weight": float("inf")}, "model.trace_weight"),
    ({"grad_norm_form": "analytic"}, "model.grad_norm_form.*finite_difference"),
    ({"grad_norm_radius": 0.0}, "model.grad_norm_radius"),
    ({"trace_probes": 0}, "model.trace_probes"),
    ({"penalty_every": 0}, "model.penalty_every"),
    ({"penalty_params": "nothing_here"}, "model.penalty_params"),
    ({"trace_weight": 0.1, "compile_backbone": True}, "model.compile_backbone.*double backward"),
])
def test_bad_options_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(**kwargs)
