"""A new metric in a subclass: the trace of the empirical Fisher, ``mean_i ||∇ℓ_i||²``.

The base class supplies the data, BN mode, seeding, restoring the model, the weighted reduction
across ranks, logging and history; the subclass only measures. Use it like any callback:
``Trainer(callbacks=[FisherTrace(every_n_epochs=5, num_batches=4)])``.
"""

import torch
from torch.func import functional_call, grad, vmap

from callbacks import Measurement, SharpnessCallback


class FisherTrace(SharpnessCallback):
    """Empirical Fisher trace ``tr F = mean_i ||∇_θ ℓ_i||²`` (per-sample gradients by vmap)."""

    name = "fisher"
    default_bn_mode = "eval"  # per-sample gradients need running statistics

    def measure(self, pl_module, batches):
        if not len(batches):  # a rank without batches (DDP, tiny subset) weighs 0 in the reduction
            return {"trace": Measurement(0.0, 0.0)}
        params = {n: p.detach() for n, p in pl_module.named_parameters() if p.requires_grad}

        def sample_loss(p, x, y, gap):
            logits = functional_call(pl_module, p, (x[None],))
            return self.criterion_fn(logits, {"y": y[None], "gap": gap[None]})

        per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0, 0))
        sq = torch.cat([sum(g.flatten(1).pow(2).sum(1) for g in per_sample(params, b["x"], b["y"], b["gap"]).values())
                        for b in batches])
        # a mean over this rank's samples: the base weights it by sample counts across ranks
        return {"trace": Measurement(sq.mean(), float(sq.std() / len(sq) ** 0.5))}
