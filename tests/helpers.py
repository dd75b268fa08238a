"""Small problems with known answers, shared by the tests of several modules."""
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


def tiny_bn_net() -> nn.Module:
    # conv -> BN -> tanh -> linear: smooth, BN used with running statistics (eval mode)
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)).double()
    with torch.no_grad():  # non-trivial running statistics
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def float64_batches(n_sizes=(7, 5)):
    g = torch.Generator().manual_seed(2)
    return [{"x": torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64),
             "y": torch.randint(0, 3, (n,), generator=g), "gap": torch.rand(n, generator=g, dtype=torch.float64)}
            for n in n_sizes]


def exact_hessian(net, batches):
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


def hessian_problem():
    """``(net, batches, H, names, sizes)``: a float64 conv-BN net, two batches, the exact Hessian."""
    net, batches = tiny_bn_net(), float64_batches()
    H, names, sizes = exact_hessian(net, batches)
    return net, batches, H, names, sizes


def image_batches(n_batches=3, size=16, shape=(2, 4, 4), classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(size, *shape, generator=g), "y": torch.randint(0, classes, (size,), generator=g)}
            for _ in range(n_batches)]


def tiny_boosting_run(run_dir, rounds=2, gap_rule=None, epochs=1, num_train=64, num_val=32, batch_size=32,
                      seed=0, callbacks=(), **orchestrator_kwargs):
    """A real boosting run of a tiny MLP on Toy2D, in seconds: ``(summary, orchestrator)``.

    ``callbacks`` are factories, called once per member's trainer.
    """
    import lightning as L

    from datamodules import Toy2DDataModule
    from lightning_app import BoostingOrchestrator, ClippedGapRule
    from models import MarginClassifier

    def make_model(t, member_seed):
        return MarginClassifier(num_classes=2, input_shape=(2,), backbone="mlp", backbone_kwargs={"width": 8})

    def make_trainer(t, round_dir):
        return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, default_root_dir=str(round_dir),
                         callbacks=[factory() for factory in callbacks])

    orch = BoostingOrchestrator(rounds, gap_rule if gap_rule is not None else ClippedGapRule(0.0, 2.0), run_dir,
                                seed=seed, **orchestrator_kwargs)
    summary = orch.run(make_model, make_trainer,
                       Toy2DDataModule(num_train=num_train, num_val=num_val, batch_size=batch_size))
    return summary, orch
