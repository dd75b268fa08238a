r"""Normalized margins at the output and hidden layers (Jiang et al., ICLR 2019), as plain functions.

For an object ``x`` of class ``y`` and a layer ``l`` with activation ``h_l(x)``, the first-order
distance of ``h_l`` to the decision boundary between ``y`` and another class ``j`` is

.. math::
    d_{l,j}(x) = \frac{f_y(x) - f_j(x)}{\lVert \nabla_{h_l} (f_y - f_j)(x) \rVert_2 + \epsilon},
    \qquad d_l(x) = \min_{j \ne y} d_{l,j}(x)

(positive when ``x`` is classified correctly; for a network linear in ``h_l`` it is the exact
Euclidean distance of ``h_l(x)`` to the boundary of its decision region). It is divided by the
layer's total variation :math:`\nu_l = \sqrt{\operatorname{tr} \operatorname{Cov}(h_l)}` over the
measured objects, so that rescaling a layer does not change it: :math:`\hat d_l = d_l / \nu_l`.

The distribution of :math:`\hat d_l` over the training set is summarised by
:func:`margin_distribution_features`: quartiles, Tukey fences, the interquartile range and the
first four moments (Jiang et al.'s signature uses the quartiles and fences of each layer).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from marginboost.batches import as_batch, batch_to
from marginboost.distributed import comm_device, gather_by_index, is_distributed

from .margins import margin_summary

__all__ = ["INPUT", "OUTPUT", "NormalizedMarginResult", "margin_distribution_features", "normalized_layer_margins"]

INPUT = "input"    # the layer name of the network's input x
OUTPUT = "output"  # the layer name of the logits f(x) (the gradient of f_y - f_j is e_y - e_j)
EPS = 1e-12


@dataclass
class NormalizedMarginResult:
    """Per layer: ``distances[layer]`` ``[N]`` (unnormalized :math:`d_l`, in ``idx`` order when the
    batches carry ``idx``), ``total_variation[layer]`` (:math:`\\nu_l`) and ``normalized[layer]``
    (:math:`d_l/\\nu_l`)."""

    distances: dict[str, Tensor]
    total_variation: dict[str, float]
    normalized: dict[str, Tensor]


def _named_module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(f"normalized_layer_margins: layer {name!r} is not a module of the model; modules: "
                         f"{[n for n in modules if n][:20]}... or {INPUT!r}/{OUTPUT!r}")
    return modules[name]


def normalized_layer_margins(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], layers: Sequence[str],
                       num_total: int | None = None, distributed: bool | None = None) -> NormalizedMarginResult:
    r"""First-order distances to the decision boundary at ``layers``, and their normalized values.

    ``layers`` are module names of ``model`` (the distance is taken at that module's output), or
    ``"input"`` / ``"output"``. Call with the model in eval mode (BN running statistics, no dropout):
    the per-object gradients are taken as gradients of the batch sum, which is exact only when the
    objects do not interact. Costs one forward and ``K`` backward passes per batch.

    With ``num_total`` the batches' ``idx`` place each object (and, under DDP, every rank receives
    all objects and the total variation over all of them); without it the distances are in batch
    order.

    Args:
        model: maps ``x [N, ...]`` to logits ``[N, K]``.
        batches: mappings with ``x``, ``y`` (and ``idx`` when ``num_total`` is given).
        layers: where to measure.
        num_total: size of the whole measured set (see above).
        distributed: gather across ranks (``None``: when a process group is initialised).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3))
        >>> batch = {"x": torch.tensor([[1.0, 0.0]]), "y": torch.tensor([0])}
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.eye(3, 2)); _ = net[0].bias.zero_()
        >>> r = normalized_layer_margins(net, [batch], ["input"])
        >>> round(float(r.distances["input"][0]), 4)  # |x1 - x2| / |(1, -1)| = 1/sqrt(2)
        0.7071
    """
    distributed = is_distributed() if distributed is None else distributed
    if not layers:
        raise ValueError("normalized_layer_margins: give at least one layer")
    captured: dict[str, Tensor] = {}
    hooks = []

    def capture(name: str):
        def hook(_module, _inputs, output):
            if not output.requires_grad:  # frozen layers still need the gradient w.r.t. their output
                output = output.detach().requires_grad_(True)
            captured[name] = output
            return output
        return hook

    for name in layers:
        if name not in (INPUT, OUTPUT):
            hooks.append(_named_module(model, name).register_forward_hook(capture(name)))
    per_layer: dict[str, list[Tensor]] = {name: [] for name in layers}
    sums: dict[str, Tensor] = {}
    indices: list[Tensor] = []
    count = 0
    try:
        with torch.enable_grad():
            for raw in batches:
                batch = batch_to(as_batch(raw), next(model.parameters()).device)
                x = batch["x"].detach().clone().requires_grad_(INPUT in layers)
                captured.clear()
                logits = model(x)
                logits = logits if logits.dtype == torch.float64 else logits.float()  # fp32 at least
                acts = {name: (x if name == INPUT else logits if name == OUTPUT else captured[name])
                        for name in layers}
                y = batch["y"]
                n, k = logits.shape
                # G[name][c] = d f_c / d h_l for every object (objects are independent in eval mode)
                hidden = [name for name in layers if name != OUTPUT]
                grads: dict[str, list[Tensor]] = {name: [] for name in hidden}
                for c in range(k):
                    if hidden:
                        gs = torch.autograd.grad(logits[:, c].sum(), [acts[name] for name in hidden],
                                                 retain_graph=True)
                        for name, g in zip(hidden, gs):
                            grads[name].append(g.reshape(n, -1).double())
                true = logits.gather(1, y[:, None]).double()                            # [n, 1]
                diff = true - logits.double()                                            # f_y - f_j, [n, K]
                others = torch.ones_like(diff, dtype=torch.bool).scatter_(1, y[:, None], False)
                for name in layers:
                    if name == OUTPUT:
                        norms = torch.full_like(diff, 2.0 ** 0.5)                        # ‖e_y - e_j‖
                    else:
                        g = torch.stack(grads[name], 1)                                   # [n, K, D]
                        g_true = g[torch.arange(n), y][:, None]                          # [n, 1, D]
                        norms = (g_true - g).norm(dim=2)
                    d = torch.where(others, diff / (norms + EPS), torch.full_like(diff, float("inf")))
                    per_layer[name].append(d.min(1).values.detach())
                    h = acts[name].detach().reshape(n, -1).double()
                    s = torch.stack([h.sum(0), h.pow(2).sum(0)])                          # [2, D]
                    sums[name] = s if name not in sums else sums[name] + s
                if num_total is not None:
                    indices.append(batch["idx"])
                count += n
    finally:
        for h in hooks:
            h.remove()
    if count == 0 and not distributed:
        raise ValueError("normalized_layer_margins: no batches to measure")
    distances = {}
    for name in layers:
        local = torch.cat(per_layer[name]) if per_layer[name] else torch.zeros(0, dtype=torch.float64)
        idx = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
        distances[name] = (gather_by_index(local, idx, num_total) if num_total is not None else local).cpu()
    total_variation = {}
    for name in layers:
        s = sums[name] if name in sums else torch.zeros(2, 1, dtype=torch.float64)
        c = torch.tensor(float(count), dtype=torch.float64)
        if distributed:  # sums over all ranks (DistributedSampler's padding repeats count twice)
            s, c = s.to(comm_device()), c.to(comm_device())
            torch.distributed.all_reduce(s)
            torch.distributed.all_reduce(c)
            s, c = s.cpu(), c.cpu()
        mean = s[0] / c
        var = (s[1] / c - mean.pow(2)).clamp_min(0.0) * (c / (c - 1).clamp_min(1.0))
        total_variation[name] = float(var.sum().sqrt())
    normalized = {name: distances[name] / max(total_variation[name], EPS) for name in layers}
    return NormalizedMarginResult(distances, total_variation, normalized)


def margin_distribution_features(d: Tensor) -> dict[str, float]:
    r"""The signature of a margin distribution ``d [N]``: quartiles, fences, moments.

    ``q1, median, q3, iqr, lower_fence = q1 - 1.5 iqr, upper_fence = q3 + 1.5 iqr`` (linear
    interpolation quantiles), ``mean``, ``std`` (ddof 1), ``skewness`` :math:`E[(d-\mu)^3]/\sigma^3`
    and excess ``kurtosis`` :math:`E[(d-\mu)^4]/\sigma^4 - 3` (population moments), ``min``,
    ``max``, ``frac_negative``.

    Example:
        >>> f = margin_distribution_features(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
        >>> f["q1"], f["median"], f["upper_fence"], f["skewness"]
        (2.0, 3.0, 7.0, 0.0)
    """
    base = margin_summary(d)
    x = d.detach().double().flatten()
    mu = x.mean()
    sigma = x.std(unbiased=False)
    centred = x - mu
    if sigma > 0:
        skew = float(centred.pow(3).mean() / sigma ** 3)
        kurt = float(centred.pow(4).mean() / sigma ** 4 - 3.0)
    else:
        skew, kurt = 0.0, 0.0
    keys = ("q1", "median", "q3", "iqr", "lower_fence", "upper_fence", "mean", "std", "min", "max",
            "frac_negative")
    return {**{k: base[k] for k in keys}, "skewness": skew, "kurtosis": kurt}
